"""The loadgen's config dataclasses: bad values are refused with the flag of the field named, and
their flags read the command line only (no KVWEAVE_* environment overrides, see kvweave.config_flags)."""
from __future__ import annotations

import pytest

from cli.main import build_parser
from loadgen.backends import SendOptions, TargetConfig
from loadgen.cli import config_from_args
from loadgen.report import ReportConfig
from loadgen.runner import RunConfig
from loadgen.types import WorkloadError
from loadgen.workloads import WorkloadConfig
from loadgen.workloads.chat import AgentOptions, ChatOptions
from loadgen.workloads.rag import RagOptions
from loadgen.workloads.replay import TraceOptions
from loadgen.workloads.synthetic import PrefixRepetitionOptions, RandomOptions


def parse(*argv: str):
    return build_parser("loadgen").parse_args(["loadgen", *argv])


@pytest.mark.parametrize(("cls", "kwargs", "says"), [
    (TargetConfig, {"backend": "http"}, "--backend must be one of grpc, openai"),
    (RunConfig, {"request_rate": 0.0}, "--request-rate must be > 0"),
    (RunConfig, {"burstiness": float("inf")}, "--burstiness must be a finite number > 0"),
    (RunConfig, {"max_concurrency": 0}, "--max-concurrency must be >= 1"),
    (RunConfig, {"num_requests": 0}, "--num-requests must be >= 1"),
    (RunConfig, {"duration": -1.0}, "--duration must be a finite number of seconds > 0"),
    (RunConfig, {"seed": -1}, "--seed must be at least 0"),
    (SendOptions, {"temperature": -0.5}, "--temperature must be a finite number >= 0"),
    (SendOptions, {"request_timeout": 0.0}, "--request-timeout must be a finite number of seconds > 0"),
    (ReportConfig, {"goodput": ["ttft"]}, "invalid --goodput 'ttft'"),
    (ReportConfig, {"metric_percentiles": (50.0, 101.0)}, "--metric-percentiles must be numbers in [0, 100]"),
    (WorkloadConfig, {"workload": "chat"}, "unknown workload 'chat'"),
    (WorkloadConfig, {"output_len": 0}, "--output-len must be at least 1"),
    (WorkloadConfig, {"token_range": "5:5"}, "--token-range '5:5': need 0 <= LO < HI"),
    (RandomOptions, {"range_ratio": 1.0}, "--range-ratio must be in [0, 1)"),
    (PrefixRepetitionOptions, {"suffix_len": -1}, "--suffix-len must be at least 0"),
    (RagOptions, {"num_docs": 0}, "--num-docs must be at least 1"),
    (ChatOptions, {"system_prompt_len": -1}, "--system-prompt-len must be at least 0"),
    (AgentOptions, {"tool_pause_dist": "uniform"}, "--tool-pause-dist must be one of exponential"),
    (TraceOptions, {"time_scale": 0.0}, "--time-scale must be a positive number"),
])
def test_bad_values_are_refused_naming_the_field(cls, kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError) as e:
        cls(**kwargs)
    assert says in str(e.value)
    if cls.__module__.startswith("loadgen.workloads"):
        assert isinstance(e.value, WorkloadError)


def test_flags_map_onto_the_dataclasses() -> None:
    config = config_from_args(parse("--backend", "openai", "--request-rate", "inf", "--no-progress",
                                    "--no-ignore-eos", "--goodput", "ttft:500", "tpot:50",
                                    "--metric-percentiles", "50,99.9"))
    assert config.target == TargetConfig(backend="openai")
    assert config.run == RunConfig(request_rate=float("inf"), progress=False)
    assert config.send == SendOptions(ignore_eos=False)
    assert config.report.slos() == {"ttft": 500.0, "tpot": 50.0} and config.report.metric_percentiles == [50.0, 99.9]


def test_num_requests_default_depends_on_duration() -> None:
    assert config_from_args(parse()).run.num_requests == 100
    assert config_from_args(parse("--duration", "5")).run.num_requests is None
    assert config_from_args(parse("--duration", "5", "--num-requests", "7")).run.num_requests == 7


def test_loadgen_flags_ignore_the_environment(monkeypatch) -> None:
    """KVWEAVE_BLOCK_SIZE and KVWEAVE_MODEL configure a server started from the same shell; they
    must not change what a load test sends (mooncake's --block-size, --model)."""
    for name, value in {"KVWEAVE_BLOCK_SIZE": "16", "KVWEAVE_MODEL": "m", "KVWEAVE_SEED": "3",
                        "KVWEAVE_NUM_REQUESTS": "9", "KVWEAVE_BACKEND": "openai"}.items():
        monkeypatch.setenv(name, value)
    args = parse()
    assert (args.block_size, args.model, args.seed, args.num_requests, args.backend) == (512, None, 0, None, "grpc")
    help_text = build_parser("loadgen")._subparsers._group_actions[0].choices["loadgen"].format_help()
    assert "KVWEAVE_" not in help_text
