"""Named compression variants of the quality benchmark: a method plus CompressionParams overrides.

The methods at their defaults come first, then the levers of issue 23, each one change to the
default compactor, so a row's difference to `compactor` is that lever's effect on the same samples.
A variant on the command line is a name from VARIANTS or `name=method,field:value,field:value`
(e.g. `mine=compactor,leverage_weight:0.7,value_norm:true`).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from kvferry.engine.compression import CompressionParams

METHODS: dict[str, dict[str, Any]] = {
    "compactor": {"method": "compactor"},
    "compactor:adaptive": {"method": "compactor", "budget": "adaptive"},
    "compactor:global": {"method": "compactor", "budget": "global"},
    "snapkv": {"method": "snapkv"},
    "kvcompress": {"method": "kvcompress"},
    "streaming": {"method": "streaming"},
    "random": {"method": "random"},
}
LEVERS: dict[str, dict[str, Any]] = {
    # the blend weight: kvpress's λ = 1 - retention, and fixed weights around it
    "c.blend_ratio": {"blend": "ratio"},
    "c.lambda0.2": {"leverage_weight": 0.2},
    "c.lambda0.8": {"leverage_weight": 0.8},
    # kvpress's attention signal: value-norm weighting, smoothing, both
    "c.value_norm": {"value_norm": True},
    "c.smooth3": {"mass_smoothing": 3},
    "c.kvpress_mass": {"value_norm": True, "mass_smoothing": 3},
    # leverage over the whole context (one block) instead of 1024-token blocks
    "c.leverage_whole": {"leverage_block": 1 << 16},
    # the attention-mass block size (kvpress: 256)
    "c.mass_block64": {"attention_block": 64},
    "c.mass_block256": {"attention_block": 256},
    # the protected tail and sinks
    "c.recent8": {"recent": 8},
    "c.recent128": {"recent": 128},
    "c.sink16": {"sink": 16},
    # keeping spans: max-pooled scores, whole chunks
    "c.pool3": {"score_pool": 3},
    "c.pool7": {"score_pool": 7},
    "c.chunk8": {"span_chunk": 8},
    # the question's own attention (whole-prompt setting: the window is the question)
    "c.query0.5": {"query_weight": 0.5},
    # everything kvpress's CompactorPress does differently, at once
    "c.kvpress_like": {
        "blend": "ratio",
        "value_norm": True,
        "mass_smoothing": 3,
        "leverage_block": 1 << 16,
        "attention_block": 256,
        "sink": 8,
        "recent": 4,
    },  # fmt: skip
}
# The levers that helped on the tuning split's first runs, combined: the candidates for new defaults.
# lw = leverage over the whole context, br = blend weight by ratio, chunkN = span_chunk N.
COMBINATIONS: dict[str, dict[str, Any]] = {
    "lw_chunk8": {"leverage_block": 1 << 16, "span_chunk": 8},
    "lw_chunk16": {"leverage_block": 1 << 16, "span_chunk": 16},
    "lw_br_chunk8": {"leverage_block": 1 << 16, "blend": "ratio", "span_chunk": 8},
    "lw_mb256_chunk8": {"leverage_block": 1 << 16, "attention_block": 256, "span_chunk": 8},
    "lw_q_chunk8": {"leverage_block": 1 << 16, "query_weight": 0.5, "span_chunk": 8},
    # kvpress's CompactorPress without its value-norm weighting (which hurt on its own), in chunks
    "kvp_nonorm_chunk8": {
        "blend": "ratio",
        "mass_smoothing": 3,
        "leverage_block": 1 << 16,
        "attention_block": 256,
        "sink": 8,
        "recent": 4,
        "span_chunk": 8,
    },  # fmt: skip
}
# After the test run: kvpress's non-causal press leaves 1/sqrt(d) out of its softmax, a sharper
# attention mass than ours (mass_sharpness = sqrt(head_dim) = 8 for SmolLM2). Each is one change to the
# new defaults; c.kvpress_exact is everything CompactorPress does, single tokens included.
SHARPNESS: dict[str, dict[str, Any]] = {
    "c.sharp2": {"mass_sharpness": 2.0},
    "c.sharp4": {"mass_sharpness": 4.0},
    "c.sharp8": {"mass_sharpness": 8.0},
    "c.sharp8_kvmass": {"mass_sharpness": 8.0, "attention_block": 256, "mass_smoothing": 3},
    "c.kvpress_exact": {**LEVERS["c.kvpress_like"], "mass_sharpness": 8.0, "span_chunk": 0},
}
VARIANTS: dict[str, dict[str, Any]] = {
    **METHODS,
    **{
        name: {"method": "compactor", **overrides}
        for name, overrides in {**LEVERS, **COMBINATIONS, **SHARPNESS}.items()
    },
}
DEFAULT_VARIANTS = list(VARIANTS)
# Fields that only steer selection: variants differing in these alone share one scorer (one set of
# statistics observed in prefill). The compactor's blend weight is read when scores are formed, so
# `blend` and `leverage_weight` are shared too; `retention` varies per cell.
SELECTION_FIELDS = frozenset(
    {"retention", "budget", "head_floor", "sink", "recent", "protected_spans", "protect_system_prompt",
     "protect_last_user_turn", "score_pool", "span_chunk", "blend", "leverage_weight"}
)  # fmt: skip


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """'compactor:adaptive' or 'name=method,field:value,...' -> (name, CompressionParams fields)."""
    if "=" not in spec:
        if spec not in VARIANTS:
            raise SystemExit(
                f"unknown variant {spec!r}; known: {', '.join(VARIANTS)}, or name=method,field:value"
            )
        return spec, dict(VARIANTS[spec])
    name, _, body = spec.partition("=")
    method, *pairs = body.split(",")
    overrides: dict[str, Any] = {"method": method}
    for pair in pairs:
        key, _, raw = pair.partition(":")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    CompressionParams(**overrides)  # validate now, not after the first prefill
    return name, overrides


def scorer_key(params: CompressionParams) -> str:
    """Variants with the same key observe prefill through one scorer."""
    return json.dumps(
        {f.name: getattr(params, f.name) for f in fields(params) if f.name not in SELECTION_FIELDS},
        sort_keys=True,
    )
