"""The committed generated code is what grpcio-tools 1.84.0 makes of the .proto files today, and the
stubs import without grpc_tools (the GPU image has none)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protos.generate import REPO_ROOT, generated_files

pytest.importorskip("grpc_tools")


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    from protos.generate import generate

    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in generated_files(REPO_ROOT)}
    assert sorted(fresh) == sorted(committed), (
        "generated files added or removed: run python -m protos.generate"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"out of date with the .proto files: {stale}; run python -m protos.generate"


def test_stubs_import_without_grpc_tools() -> None:
    code = (
        "import sys; sys.modules['grpc_tools'] = None\n"
        "from protos.kvferry.v1 import coordinator_pb2_grpc, decode_pb2_grpc, prefill_pb2_grpc\n"
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "ok"
