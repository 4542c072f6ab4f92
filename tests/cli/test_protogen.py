"""The committed stubs in kvweave/v1 are exactly what the .proto files generate."""
from pathlib import Path

from cli.protogen import ROOT, generate


def test_regenerated_stubs_are_identical(tmp_path: Path):
    generated = generate(tmp_path)
    assert generated, "no stubs generated"
    for path in generated:
        committed = ROOT / "kvweave" / "v1" / path.name
        assert committed.exists(), f"{path.name} is generated but not committed"
        assert committed.read_text() == path.read_text(), f"{path.name} differs from its .proto"
    committed_names = {p.name for p in (ROOT / "kvweave" / "v1").glob("*_pb2*.py*")}
    assert committed_names == {p.name for p in generated}
