"""The layering of the packages (../shared/ARCHITECTURE.md, "Layers"): no cycle between packages or
modules, no private name imported across modules, and the light processes import no torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS_TOOL = REPO.parent / "shared" / "tools" / "layers.py"
ALLOWED = ("benchmarks/rag.py:", " imports _Sequence from worker.chunk_reuse")
"""The one finding allowed for now: benchmarks/rag.py's probe baseline takes worker.chunk_reuse's
_Sequence. It goes away with the chunk-reuse probe path, which is being replaced; then the tool must
exit 0 with no exception."""


def _findings(report: str) -> list[str]:
    lines, section = [], None
    for line in report.splitlines():
        if line.startswith("== "):
            section = line
        elif section and not section.startswith("== packages") and line.strip():
            lines.append(line.strip())
    return lines


def test_layers_tool_finds_nothing_but_the_chunk_reuse_probe():
    if not LAYERS_TOOL.is_file():
        pytest.skip(f"{LAYERS_TOOL} is absent (it lives next to the repository, in ../shared/tools)")
    proc = subprocess.run([sys.executable, str(LAYERS_TOOL), "--strict", "--torch-free", "controlplane,loadgen"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "CYCLE" not in proc.stdout, proc.stdout
    unexpected = [f for f in _findings(proc.stdout)
                  if not (f.startswith(ALLOWED[0]) and f.endswith(ALLOWED[1]))]
    assert not unexpected, proc.stdout
    assert proc.returncode == 0 or _findings(proc.stdout), proc.stdout + proc.stderr


@pytest.mark.parametrize("module", ["controlplane.router_main", "kvweave", "kvweave.client", "loadgen.cli",
                                    "cli.main"])
def test_light_processes_import_no_torch(module):
    code = (f"import sys, {module}\n"
            "import kvweave; kvweave.Client, kvweave.AsyncClient\n"
            "loaded = [m for m in ('torch', 'worker') if m in sys.modules]\n"
            "assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_router_command_starts_without_torch():
    """`kvweave router --help` goes through the CLI's lazy subcommand import: no torch, no worker."""
    code = ("import sys\nfrom cli.main import main\n"
            "try:\n    main(['router', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'worker' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
