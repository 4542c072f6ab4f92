"""The layering of the packages (../shared/ARCHITECTURE.md, "Layers"): no cycle between packages or
modules, no private name imported across modules, and the light processes import no torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS_TOOL = REPO.parent / "shared" / "tools" / "layers.py"


def test_layers_tool_finds_nothing():
    """`layers.py --strict --torch-free controlplane,loadgen` exits 0: no cycle, no private import,
    no torch reachable from the control plane or the load generator."""
    if not LAYERS_TOOL.is_file():
        pytest.skip(f"{LAYERS_TOOL} is absent (it lives next to the repository, in ../shared/tools)")
    proc = subprocess.run([sys.executable, str(LAYERS_TOOL), "--strict", "--torch-free", "controlplane,loadgen"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("== 0 finding(s)"), proc.stdout


@pytest.mark.parametrize("module", ["controlplane.router_main", "kvweave", "kvweave.client", "loadgen.cli",
                                    "cli.main", "cli.planner"])
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
