"""The elementwise layer kernels (kernels/rms_norm.py, rotary.py, silu_mul.py) against the eager
layers they replace on CUDA (engine/layers/norm.py, rotary.py, mlp.py), and engines run both ways.

CPU: under TRITON_INTERPRET=1 at small shapes; GPU: compiled, plus Llama-3.1-8B shapes (`-m gpu`).
Inputs are fresh random values on the strided views the model hands over (a projection's output cut
into heads), and both sides round in the same places, so they agree within a unit or two in the
last place of the largest value.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the root conftest.py sets it before any triton import
triton = pytest.importorskip("triton")

from kvferry.engine.layers.norm import RMSNorm  # noqa: E402
from kvferry.engine.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402
from kvferry.kernels.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from kvferry.kernels.rotary import rotary  # noqa: E402
from kvferry.kernels.silu_mul import silu_mul  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ulps_apart(out: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in units of the dtype's spacing at want's largest magnitude (0 when
    bit-identical). Per-element spacing would blow up where a sum cancels to near zero, and Triton's
    CPU interpreter rounds to bf16 differently from a GPU (and from torch)."""
    assert out.dtype == want.dtype and out.shape == want.shape
    assert not out.isnan().any(), "NaN in the output: an element was not written"
    spacing = float(want.double().abs().max()) * torch.finfo(want.dtype).eps
    return float((out.double() - want.double()).abs().max()) / spacing


def check_rms_norm(n: int, hidden: int, dtype: torch.dtype) -> None:
    layer = RMSNorm(hidden, 1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(hidden) * 0.5 + 1.0)
    wide = torch.randn(n, hidden + 64, device=DEVICE).to(dtype) * 3  # rows with a stride > hidden
    x = wide[:, :hidden]
    with torch.no_grad():
        want = layer(x)
    got = rms_norm(x, layer.weight, layer.eps)
    assert ulps_apart(got, want) <= 2


def check_rms_norm_per_head(n: int, heads: int, d: int, dtype: torch.dtype) -> None:
    """Qwen3's per-head q/k norms over a fused projection's view [N, heads, D] (token stride wider than
    heads x D), read in place."""
    layer = RMSNorm(d, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d) * 0.5 + 1.0)
    proj = torch.randn(n, (heads + 5) * d, device=DEVICE).to(dtype) * 3
    x = proj[:, 2 * d : (heads + 2) * d].view(n, heads, d)
    with torch.no_grad():
        want = layer(x)
    got = rms_norm(x, layer.weight, layer.eps)
    assert got.shape == (n, heads, d) and ulps_apart(got, want) <= 2


def check_add_rms_norm(n: int, hidden: int, dtype: torch.dtype) -> None:
    """A block's output added to the residual stream (in place) and the sum normalised, against the
    eager layer's add_forward."""
    layer = RMSNorm(hidden, 1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(hidden) * 0.5 + 1.0)
    x = torch.randn(n, hidden + 32, device=DEVICE).to(dtype)[:, :hidden] * 2  # a strided block output
    residual = torch.randn(n, hidden, device=DEVICE).to(dtype) * 3
    with torch.no_grad():
        want, want_sum = layer.add_forward(x, residual.clone())
    got = add_rms_norm(x, residual, layer.weight, layer.eps)
    # the rounded sum: bit for bit on a GPU; the CPU interpreter rounds bf16 its own way
    assert ulps_apart(residual, want_sum) <= (0 if DEVICE.type == "cuda" else 1)
    assert ulps_apart(got, want) <= 2


def check_rotary(n: int, heads: int, d: int, dtype: torch.dtype, start: int = 0) -> None:
    params = {"rope_theta": 500000.0, "rope_type": "default"}
    cos, sin = RotaryEmbedding(d, params).to(DEVICE)(torch.arange(start, start + n, device=DEVICE), dtype)
    proj = torch.randn(n, (heads + 3) * d, device=DEVICE).to(dtype)  # a projection's output ...
    x = proj[:, d : (heads + 1) * d].view(n, heads, d)  # ... cut into heads: a strided view
    want = apply_rotary(x, cos, sin)
    before = x.clone()
    got = rotary(x, cos, sin)
    assert torch.equal(x, before), "the input (the pre-RoPE keys) must stay intact"
    assert got.is_contiguous() and ulps_apart(got, want) <= 2


def check_silu_mul(n: int, width: int, dtype: torch.dtype) -> None:
    both = torch.randn(n, 2 * width + 8, device=DEVICE).to(dtype) * 3
    gate, up = both[:, :width], both[:, width + 8 :]
    want = F.silu(gate) * up
    got = silu_mul(gate, up)
    assert ulps_apart(got, want) <= 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_small(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    check_rms_norm(5, 96, dtype)  # hidden not a power of two: a masked tail


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_small(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    check_add_rms_norm(5, 96, dtype)
    check_rms_norm_per_head(3, 5, 32, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_small(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    check_rotary(7, 3, 32, dtype, start=1000)
    check_rotary(1, 20, 16, dtype)  # more heads than one program's block
    check_rotary(4, 2, 48, dtype)  # half a head (24) not a power of two: masked lanes


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_small(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    check_silu_mul(3, 1500, dtype)  # two column blocks, the second partial


def test_empty_inputs() -> None:
    assert rms_norm(torch.zeros(0, 8, device=DEVICE), torch.ones(8, device=DEVICE), 1e-6).shape == (0, 8)
    cos = torch.zeros(0, 1, 16, device=DEVICE)
    assert rotary(torch.zeros(0, 2, 16, device=DEVICE), cos, cos).shape == (0, 2, 16)
    assert silu_mul(torch.zeros(0, 4, device=DEVICE), torch.zeros(0, 4, device=DEVICE)).shape == (0, 4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_kernels_gpu_llama8b(dtype: torch.dtype) -> None:
    """A 2048-token chunk of Llama-3.1-8B: hidden 4096, 32 q / 8 kv heads of 128, MLP 14336."""
    torch.manual_seed(4)
    check_rms_norm(2048, 4096, dtype)
    check_add_rms_norm(2048, 4096, dtype)
    check_rms_norm_per_head(2048, 32, 128, dtype)
    check_rotary(2048, 32, 128, dtype, start=30720)
    check_rotary(2048, 8, 128, dtype, start=30720)
    check_silu_mul(2048, 14336, dtype)


@pytest.mark.parametrize("kind", ["llama3_rope", "llama_tied_bias", "qwen3", "qwen3_moe"])
def test_an_engine_on_the_layer_kernels_generates_the_same(tiny_model, kind: str) -> None:
    """On CUDA the engine runs RMSNorm, RoPE and the SwiGLU gate through the kernels: the greedy
    tokens must match the eager layers' and the logits nearly so (qwen3 adds per-head q/k norms,
    qwen3_moe the experts' gates)."""
    from builders import generate_recording, random_prompt

    from kvferry.engine.layers.layer_kernels import use_layer_kernels

    model = tiny_model(kind)
    prompt = random_prompt(70, model.vocab_size, seed=6)
    results = []
    for on in (False, True):
        engine = model.engine(prefill_chunk=32)
        assert use_layer_kernels(engine.runner.model, on) > 0
        results.append(generate_recording(engine, prompt, 6))
    assert results[1][0] == results[0][0]
    assert float((results[1][1] - results[0][1]).abs().max()) < 1e-4


def test_the_engine_setting_picks_the_layers(tiny_model) -> None:
    """layer_kernels switches every norm, attention and MLP of the model, on CUDA only: a CPU engine
    keeps the eager layers (the kernels would run in Triton's interpreter)."""
    from kvferry.engine.layers.attention import Attention
    from kvferry.engine.layers.mlp import GatedMLP
    from kvferry.engine.layers.norm import RMSNorm

    engine = tiny_model("qwen3").engine(layer_kernels=True)
    layers = [m for m in engine.model.modules() if isinstance(m, (RMSNorm, Attention, GatedMLP))]
    per_layer = 6  # two norms, attention, its q and k norms, the MLP
    assert len(layers) == 1 + per_layer * len(engine.model.model.layers)  # + the final norm
    assert all(m.use_kernels == (engine.device.type == "cuda") for m in layers)
    engine = tiny_model("qwen3").engine(layer_kernels=False)
    assert not any(m.use_kernels for m in engine.model.modules() if isinstance(m, RMSNorm))
