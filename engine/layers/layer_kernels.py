"""Switches a model's elementwise layers between eager PyTorch ops (the references, and the CPU path)
and one-pass Triton kernels: RMSNorm (kernels/rms_norm.py), RoPE (kernels/rotary.py) and the SwiGLU
gate silu(gate) * up (kernels/silu_mul.py).

Eagerly, an RMSNorm is eight kernels over the activation, RoPE five per tensor and the gate two; an
8K prefill of the Llama-3.1-8B shape spent ~70 ms of its ~270 ms there, in ~40 launches per layer
(docs/benchmarks/layer_kernels.md). Both sides round in the same places, so the greedy tokens match.
"""

from __future__ import annotations

from torch import nn

from kvferry.engine.layers.attention import Attention
from kvferry.engine.layers.mlp import GatedMLP
from kvferry.engine.layers.moe import SparseMoE
from kvferry.engine.layers.norm import RMSNorm

SWITCHED = (RMSNorm, Attention, GatedMLP, SparseMoE)


def use_layer_kernels(model: nn.Module, on: bool) -> int:
    """Every switchable layer of `model` to the kernels (on) or the eager ops; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, SWITCHED)]
    for m in layers:
        m.use_kernels = on
    return len(layers)
