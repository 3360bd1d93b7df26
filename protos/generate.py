"""Regenerate the Python code of protos/kvferry/v1/*.proto: `python protos/generate.py [--out DIR]`.

The import root is this folder (protos/), so the .proto files import each other as
`kvferry/v1/common.proto` and the generated modules form the package `kvferry.v1` (installed as part
of kvferry: `from kvferry.v1 import coordinator_pb2`). The generated code is committed: it imports
without grpc_tools.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_DIR = Path("kvferry") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_DIR).glob("*.proto"))


def generated_files(root: Path) -> list[Path]:
    folder = root / PROTO_DIR
    return sorted(p for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def generate(out_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the generated modules under out_root/kvferry/v1/; returns their paths."""
    import grpc_tools
    from grpc_tools import protoc

    (out_root / PROTO_DIR).mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return generated_files(out_root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="root to write kvferry/v1/ under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
