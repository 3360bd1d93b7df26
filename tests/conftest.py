"""Shared fixtures: tiny random models (built once per session) and the real SmolLM2 (loaded once).

kvferry itself is imported from its installed (editable) package, never from the repository root:
the root's folder names (`kernels`, ...) would shadow installed packages (transformers imports the
`kernels` hub package). Without CUDA the Triton kernels run in Triton's CPU interpreter, which must
be switched on before triton is first imported (transformers -> torch._dynamo -> triton).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # so test modules can `import builders`
sys.path.append(str(REPO_ROOT / "benchmarks"))  # and the benchmarks' modules (`import quality_tasks`)

from builders import TinyModel, make_tiny_model, save_tiny_llama  # noqa: E402

from kvferry.engine import LLM  # noqa: E402

SMOLLM2_KV_BYTES = 512 << 20  # ~11K cached tokens of SmolLM2 in fp32: plenty for these tests


@pytest.fixture
def single_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run a tiny-model test on one intra-op thread (SmolLM2 tests keep them all).

    Tiny matmuls gain nothing from threads, and on a shared 2-core runner every OpenMP barrier
    stalls while another process holds the second core (measured: 20 s instead of 0.2 s)."""
    if any(name.startswith("smollm2") for name in request.fixturenames):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyModel]:
    """`tiny_model(kind)` -> a TinyModel of builders.TINY_KINDS[kind], built and saved once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, TinyModel] = {}

    def get(kind: str) -> TinyModel:
        if kind not in cache:
            cache[kind] = make_tiny_model(kind, root)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def smollm2() -> LLM:
    """The bundled default model through our offline API (loaded once: ~17 s, ~1 GB)."""
    return LLM(device="cpu", dtype="float32", kv_cache_bytes=SMOLLM2_KV_BYTES, prefill_chunk=512)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2: LLM) -> Any:
    """transformers' own load of the same GGUF file (its dequantizer and q/k un-permutation)."""
    from transformers import AutoModelForCausalLM

    gguf = Path(smollm2.engine.loaded.source)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def chat_llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    """A tiny random Llama (builders.save_tiny_llama) that carries SmolLM2's real tokenizer and chat
    template: fast tests of everything that needs text (chat templates, regions, questions)."""
    from kvferry.engine.loader.default_model import default_model_path
    from kvferry.engine.loader.gguf_cache import gguf_tokenizer

    tokenizer = gguf_tokenizer(Path(default_model_path()))
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny_chat"), vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    return LLM(str(path), device="cpu", dtype="float32", page_size=16, kv_cache_bytes=64 << 20)
