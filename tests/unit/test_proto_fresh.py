"""The generated code in client/vattn/v1 matches proto/ (run scripts/gen_proto.py if not)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the proto code")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    committed = sorted(p.relative_to(ROOT / "client") for p in (ROOT / "client").rglob("*_pb2*.py*"))
    assert generated == committed, "proto files were added or removed: run python scripts/gen_proto.py"
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (ROOT / "client" / p).read_bytes()]
    assert not stale, f"stale generated code {stale}: run python scripts/gen_proto.py"
