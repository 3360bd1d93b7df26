"""The key Triton compiles a kernel launch under, for tests that a new prompt length compiles nothing.

Triton compiles one variant per combination of a kernel's constexprs and its integer arguments'
specializations (equal to 1, a multiple of 16, neither; 32 or 64 bits). An argument that follows the
prompt's length (a page table's width, a score row's length, a chunk's token count) and is not in
the kernel's do_not_specialize compiles the kernel again for about one new document length in 16:
seconds of a user's request on a GPU (docs/benchmarks/cold_lengths.json). `LaunchKeys` stands in for
a kernel in its module and records each launch's key (then runs it, under the interpreter)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl


class LaunchKeys:
    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.keys: list[tuple] = []

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            self.keys.append(launch_key(self.kernel, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def launch_key(kernel: Any, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """(name, value) of every constexpr and (name, type, specialization) of every integer argument."""
    names = kernel.arg_names
    params = inspect.signature(kernel.fn).parameters
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    unspecialized = set(kernel.kwargs.get("do_not_specialize") or [])
    key: list[tuple] = []
    for name in names:
        value = bound.get(name, params[name].default)
        if "constexpr" in str(params[name].annotation):
            key.append((name, value))
        elif isinstance(value, int) and not isinstance(value, bool):
            key.append(
                (name, *native_specialize_impl(BaseBackend, value, False, name not in unspecialized, True))
            )
    return tuple(key)


def record_launches(monkeypatch: Any, kernels: list[tuple[str, str]]) -> dict[str, LaunchKeys]:
    """Stand a LaunchKeys in for each (module under kvferry.kernels, kernel name); by kernel name."""
    recorders = {}
    for module_name, name in kernels:
        module = importlib.import_module(
            f"kvferry.kernels.{module_name}"
        )  # the package's names are its functions
        recorders[name] = LaunchKeys(getattr(module, name))
        monkeypatch.setattr(module, name, recorders[name])
    return recorders
