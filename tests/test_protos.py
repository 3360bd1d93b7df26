"""The committed generated code is what grpcio-tools 1.84.0 makes of the .proto files today, and the
stubs import without grpc_tools (the GPU image has none)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

GENERATE = Path(__file__).resolve().parent.parent / "protos" / "generate.py"
_spec = importlib.util.spec_from_file_location("protos_generate", GENERATE)
assert _spec is not None and _spec.loader is not None
protos_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protos_generate)


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in protos_generate.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in protos_generate.generated_files(protos_generate.PROTO_ROOT)}
    assert sorted(fresh) == sorted(committed), (
        "generated files added or removed: run python protos/generate.py"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"out of date with the .proto files: {stale}; run python protos/generate.py"


def test_stubs_import_without_grpc_tools() -> None:
    code = (
        "import sys; sys.modules['grpc_tools'] = None\n"
        "from kvferry.v1 import coordinator_pb2_grpc, decode_pb2_grpc, prefill_pb2_grpc\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
