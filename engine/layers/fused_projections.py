"""One matmul for q, k and v, and one for the SwiGLU gate and up projections.

A layer's q/k/v projections read the same input, as do its gate and up projections: concatenated
along the output dimension they make one larger matmul each, so a decode step launches three kernels
fewer per layer, and the small k/v matmuls stop running on their own. The concatenated weight is a
non-persistent buffer and the Hugging Face-named parameters (`q_proj.weight`, ...) become views into
it: the state dict keeps its names and values and nothing is stored twice (on CUDA the engine
returns the replaced weights' cached memory to the driver before sizing its KV pool).

Only for inputs of up to FUSED_MAX_TOKENS rows (decode batches, short chunks), where a matmul streams
its weights and the launches show. On an H100 (docs/benchmarks/fused_projections.md) fusion made
a decode step 5-8% faster at batch 1 and about 2% at 32, and an 8K prefill in 2048-token chunks,
whose matmuls are compute-bound, 2-3% slower: those keep one matmul per projection, over the same
weights.
"""

from __future__ import annotations

import torch
from torch import nn

from kvferry.engine.layers.attention import Attention
from kvferry.engine.layers.mlp import GatedMLP

FUSED_MAX_TOKENS = 256  # about where a bf16 matmul over a 4096-wide input turns compute-bound on an H100

# Each layer kind: the buffers' name prefix, and the linears concatenated in that order.
FUSED_LINEARS: dict[type, tuple[str, tuple[str, ...]]] = {
    Attention: ("qkv", ("q_proj", "k_proj", "v_proj")),
    GatedMLP: ("gate_up", ("gate_proj", "up_proj")),
}


def _fuse(module: nn.Module, name: str, linears: list[nn.Linear]) -> None:
    """Concatenate `linears`' weights (and biases) into the buffers `{name}_weight` (and `_bias`);
    each linear's parameters become views into them."""
    weight = torch.cat([lin.weight.detach() for lin in linears])  # [sum(out), in]
    has_bias = linears[0].bias is not None
    bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
    module.register_buffer(f"{name}_weight", weight, persistent=False)
    module.register_buffer(f"{name}_bias", bias, persistent=False)
    start = 0
    for lin in linears:
        width = lin.out_features
        lin.weight = nn.Parameter(weight[start : start + width], requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(bias[start : start + width], requires_grad=False)
        start += width


def _views_of_buffer(module: nn.Module, name: str, linears: list[nn.Linear]) -> bool:
    """Whether the linears' weights are still views into `{name}_weight` (a later `.to()` or an
    `assign=True` state-dict load replaces them, and the two copies would then drift apart)."""
    fused = module._buffers.get(f"{name}_weight")
    if fused is None:
        return False
    storage = fused.untyped_storage().data_ptr()
    return all(
        lin.weight.untyped_storage().data_ptr() == storage and lin.weight.dtype == fused.dtype
        for lin in linears
    )


def use_fused_projections(model: nn.Module, on: bool, max_tokens: int = FUSED_MAX_TOKENS) -> int:
    """Every attention block and gated MLP of `model` to the fused matmuls for inputs of up to
    `max_tokens` rows (on) or to the separate ones; the concatenated weights are (re)built where the
    parameters are not views into them. Returns how many layers switched.

    The switch is the layers' own state: engines sharing one loaded model share it (as they share
    `use_layer_kernels`), and the weights must not be replaced while an engine runs."""
    switched = 0
    for m in model.modules():
        kind = next((k for k in FUSED_LINEARS if isinstance(m, k)), None)
        if kind is None:
            continue
        name, names = FUSED_LINEARS[kind]
        linears = [getattr(m, lin) for lin in names]
        if on and not _views_of_buffer(m, name, linears):
            _fuse(m, name, linears)
        m.fused = on
        m.fused_max_tokens = max_tokens
        switched += 1
    return switched
