"""What kvferry installs and how its modules import each other: one `kvferry` namespace and nothing
generic at the top level, every package folder installed, light package faces (no torch for the
client, the coordinator, the protos, the errors or `kvferry --help`), and no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_folders() -> dict[str, Path]:
    """Every installed package name -> its folder in the repository, from the package-dir mapping."""
    found: dict[str, Path] = {}
    for package, folder in SETUPTOOLS["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            relative = init.parent.relative_to(base)
            found[".".join([package, *relative.parts])] = init.parent
    return found


def test_every_package_folder_is_installed() -> None:
    assert sorted(SETUPTOOLS["packages"]) == sorted(package_folders())


def test_the_wheel_installs_only_the_kvferry_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("kvferry-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"kvferry"}
    assert "kvferry/kernels/decode_attention.py" in names and "kvferry/v1/coordinator_pb2.py" in names
    assert "kvferry/engine/data/marrowick_canal.txt" in names and "kvferry/v1/coordinator.proto" in names


LIGHT = """
import sys
import kvferry.clients, kvferry.clients.cli, kvferry.coordinator.server, kvferry.engine.errors
import kvferry.kvtransfer.errors, kvferry.engine, kvferry.kvtransfer, kvferry.decode_service.client
from kvferry.v1 import coordinator_pb2_grpc, decode_pb2_grpc, prefill_pb2_grpc
try:
    kvferry.clients.cli.main(["--help"])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "triton", "transformers", "numpy") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_light_faces_never_import_torch() -> None:
    out = subprocess.run([sys.executable, "-P", "-c", LIGHT], check=True, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


def project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in package_folders().items():
        for path in folder.glob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            modules[package if path.name == "__init__.py" else f"{package}.{path.stem}"] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its body: function-local and `TYPE_CHECKING`
    imports included, since they hide a cycle without removing it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module: each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycle() -> None:
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    cycles = strongly_connected(graph)
    assert not cycles, "modules that import each other (directly or around a cycle):\n" + "\n".join(
        " ".join(c) for c in cycles
    )


@pytest.mark.parametrize("name", ["kernels", "engine", "serving", "clients", "protos", "coordinator"])
def test_no_generic_top_level_module_comes_from_kvferry(name: str) -> None:
    code = f"import importlib.util; spec = importlib.util.find_spec({name!r}); print(spec and spec.origin)"
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], check=True, capture_output=True, text=True, cwd="/"
    )
    assert str(ROOT) not in out.stdout
