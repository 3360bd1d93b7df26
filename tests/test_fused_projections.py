"""q/k/v in one matmul and the SwiGLU gate and up in one (engine/layers/fused_projections.py): the
engine generates the same either way, the state dict keeps its Hugging Face names and values, and
the fused weights share memory with the parameters they replace."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import generate_recording, random_prompt

from kvferry.engine.layers.attention import Attention
from kvferry.engine.layers.fused_projections import use_fused_projections
from kvferry.engine.layers.mlp import GatedMLP

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("kind", ["llama_tied_bias", "llama3_rope", "qwen3", "qwen3_moe"])
def test_an_engine_on_fused_projections_generates_the_same(tiny_model, kind: str) -> None:
    """Biases (llama_tied_bias), per-head q/k norms on the split views (qwen3) and attention-only
    fusion next to routed experts (qwen3_moe): same greedy tokens, logits within float32 rounding."""
    model = tiny_model(kind)
    prompt = random_prompt(70, model.vocab_size, seed=7)
    results = []
    for on in (False, True):
        engine = model.engine(prefill_chunk=32)
        assert use_fused_projections(engine.model, on) > 0
        results.append(generate_recording(engine, prompt, 6))
    assert results[1][0] == results[0][0]
    assert float((results[1][1] - results[0][1]).abs().max()) < 1e-4


@pytest.mark.parametrize("kind", ["llama_tied_bias", "qwen3_moe"])
def test_fusing_keeps_the_state_dict_and_stores_nothing_twice(tiny_model, kind: str) -> None:
    model = tiny_model(kind)
    engine = model.engine()  # fused_projections is on by default
    ours = engine.model.state_dict()
    theirs = model.hf.state_dict()
    assert set(ours) == set(theirs)  # the fused buffers are not persistent
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    fused = {
        Attention: ("qkv_weight", "q_proj", "k_proj", "v_proj"),
        GatedMLP: ("gate_up_weight", "gate_proj", "up_proj"),
    }
    seen = 0
    for m in engine.model.modules():
        for kind_, (buffer, *linears) in fused.items():
            if not isinstance(m, kind_):
                continue
            assert m.fused
            storage = getattr(m, buffer).untyped_storage().data_ptr()
            for lin in linears:
                assert getattr(m, lin).weight.untyped_storage().data_ptr() == storage, (type(m), lin)
            if getattr(m, linears[0]).bias is not None:
                bias = getattr(m, buffer.replace("weight", "bias"))
                assert (
                    getattr(m, linears[-1]).bias.untyped_storage().data_ptr()
                    == bias.untyped_storage().data_ptr()
                )
            seen += 1
    # every attention block, and every dense MLP (qwen3_moe: its mlp_only_layers; experts are fused already)
    assert seen == sum(isinstance(m, (Attention, GatedMLP)) for m in engine.model.modules())
    assert seen > len(engine.model.model.layers)


def test_the_engine_setting_picks_the_projections(tiny_model) -> None:
    model = tiny_model("llama")
    engine = model.engine(fused_projections=False)
    layers = [m for m in engine.model.modules() if isinstance(m, (Attention, GatedMLP))]
    assert layers and not any(m.fused for m in layers)
    engine = model.engine()
    assert all(m.fused for m in layers)


def test_replaced_weights_are_fused_again(tiny_model) -> None:
    """A model whose weights were replaced after fusing (an assign=True load, a dtype change) gets
    fresh fused matrices from the switch, so the fused and separate paths agree again."""
    model = copy.deepcopy(tiny_model("llama_tied_bias").loaded.model)  # the shared fixture stays intact
    use_fused_projections(model, True)
    attn = model.model.layers[0].self_attn
    new = torch.randn_like(attn.k_proj.weight)
    attn.k_proj.weight = torch.nn.Parameter(new, requires_grad=False)  # no longer a view
    use_fused_projections(model, True)
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    rows = attn.q_proj.out_features
    assert torch.equal(attn.qkv_weight[rows : rows + attn.k_proj.out_features], new)
    x = torch.randn(3, attn.q_proj.in_features)
    fused = torch.nn.functional.linear(x, attn.qkv_weight, attn.qkv_bias)[
        :, rows : rows + attn.k_proj.out_features
    ]
    assert torch.allclose(fused, attn.k_proj(x), atol=1e-6)
