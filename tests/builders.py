"""Small builders shared by the engine tests: tiny random Hugging Face models saved as real model
folders, engines over them, prompt makers and a logit recorder.

Nothing here stands in for an engine part: the engine under test loads the saved folders with its
own loader and runs its own scheduler, paged cache and sampler.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3MoeConfig,
)

from kvferry.engine import EngineConfig, LLMEngine, SamplingParams
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.loader import LoadedModel, load_model
from kvferry.engine.models import CausalLM
from kvferry.engine.page_table import SequenceKV

TINY_VOCAB = 300
TINY_KV_BYTES = 4 << 20  # thousands of pages for the tiny models; the 2 GiB CPU default is slow to zero
# Small but not degenerate: GQA (4 q heads over 2 kv heads), several layers, head_dim 16.
_COMMON: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
_LLAMA3_ROPE: dict[str, Any] = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # With head_dim 16 and theta 1e4 the wavelengths span ~6..2e4 positions, so an original
    # context of 64 puts some frequencies in each llama3 band (kept, smoothed, divided by factor).
    original_max_position_embeddings=64,
)


def _llama() -> PretrainedConfig:
    return LlamaConfig(**_COMMON, num_hidden_layers=2)


def _llama_tied_bias() -> PretrainedConfig:
    # SmolLM2 ties embeddings; biases cover `attention_bias` / `mlp_bias` checkpoints.
    return LlamaConfig(
        **_COMMON, num_hidden_layers=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    )


def _llama3_rope() -> PretrainedConfig:
    return LlamaConfig(**_COMMON, num_hidden_layers=2, rope_parameters=dict(_LLAMA3_ROPE))


def _qwen3() -> PretrainedConfig:
    # head_dim (32) != hidden_size / heads (16), as in real Qwen3 checkpoints.
    return Qwen3Config(**{**_COMMON, "head_dim": 32}, num_hidden_layers=2)


def _qwen3_moe() -> PretrainedConfig:
    # Layer 1 is dense (mlp_only_layers), layers 0 and 2 route to 2 of 4 experts.
    return Qwen3MoeConfig(
        **_COMMON,
        num_hidden_layers=3,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    )


def _qwen3_moe_sparse_step() -> PretrainedConfig:
    # decoder_sparse_step=2: only layer 1 is sparse; norm_topk_prob off covers the raw weights.
    return Qwen3MoeConfig(
        **_COMMON,
        num_hidden_layers=3,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=2,
        norm_topk_prob=False,
    )


@dataclass(frozen=True)
class TinyKind:
    """One tiny model variant: how to configure it and how to write its folder."""

    make_config: Callable[[], PretrainedConfig]
    layout: str = "hf"  # "hf": save_pretrained; "fused_experts": stacked expert tensors as in memory
    legacy_rope_keys: bool = False  # rewrite config.json with the pre-v5 rope_theta + rope_scaling keys


TINY_KINDS: dict[str, TinyKind] = {
    "llama": TinyKind(_llama),
    "llama_tied_bias": TinyKind(_llama_tied_bias),
    "llama3_rope": TinyKind(_llama3_rope),
    "llama3_rope_legacy_keys": TinyKind(_llama3_rope, legacy_rope_keys=True),
    "qwen3": TinyKind(_qwen3),
    "qwen3_moe": TinyKind(_qwen3_moe),  # transformers 5 saves per-expert keys (experts.N.gate_proj)
    "qwen3_moe_fused": TinyKind(_qwen3_moe, layout="fused_experts"),
    "qwen3_moe_sparse_step": TinyKind(_qwen3_moe_sparse_step),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter O(1)-scale random values so logits are O(1) and any wiring mistake
    (a wrong rope band, a swapped head, a missed bias) moves them far more than the tolerance.
    transformers' own init (std 0.02) gives near-flat logits that would hide such mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() == 1 and "norm" in name:
                value = 1.0 + 0.2 * noise
            elif p.dim() == 1:  # biases
                value = 0.2 * noise
            else:  # [out, in] or stacked experts [E, out, in]: unit-variance outputs
                value = noise / math.sqrt(p.shape[-1])
            p.copy_(value.to(p.dtype))


def build_tiny_hf_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A transformers model of a tiny config, float32, eager attention, random weights."""
    config = TINY_KINDS[kind].make_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    randomize_(model, seed)
    return model.eval()


def save_tiny_model(model: PreTrainedModel, kind: str, path: Path) -> Path:
    """Write `model` as a HF folder the way `TINY_KINDS[kind]` says; returns the folder."""
    spec = TINY_KINDS[kind]
    model.save_pretrained(path)
    if spec.layout == "fused_experts":
        # The in-memory (transformers 5) layout: experts.gate_up_proj [E, 2I, H], experts.down_proj.
        for f in path.glob("*.safetensors"):
            f.unlink()
        tensors = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if spec.legacy_rope_keys:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


@dataclass
class TinyModel:
    """A tiny model saved to disk, its transformers reference, and our loaded copy."""

    kind: str
    path: Path
    hf: PreTrainedModel
    loaded: LoadedModel

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    def engine(self, **options: Any) -> LLMEngine:
        """An engine over the already-loaded weights (cheap: no reload)."""
        settings: dict[str, Any] = dict(
            device="cpu", dtype="float32", page_size=4, prefill_chunk=512, kv_cache_bytes=TINY_KV_BYTES
        )
        settings.update(options)
        return LLMEngine(EngineConfig(model=str(self.path), **settings), loaded=self.loaded)

    @torch.no_grad()
    def reference_logits(self, token_ids: list[int]) -> torch.Tensor:
        """transformers' logits [T, V] for every position of `token_ids` (full recompute)."""
        return self.hf(torch.tensor([token_ids])).logits[0].float()


def make_tiny_model(kind: str, root: Path, seed: int = 0) -> TinyModel:
    hf = build_tiny_hf_model(kind, seed)
    path = save_tiny_model(hf, kind, root / kind)
    loaded = load_model(str(path), torch.float32, "cpu")
    return TinyModel(kind, path, hf, loaded)


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


def greedy(max_new_tokens: int, **options: Any) -> SamplingParams:
    """Greedy decoding that never stops early on a random model's accidental eos."""
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True, **options)


@contextmanager
def record_logits(model: CausalLM) -> Iterator[list[torch.Tensor]]:
    """Collect the logits of EVERY token each forward pass computes (prefill chunks and decode
    batches), in call order. Reads the final norm's output through a forward hook; the model and
    the runner are untouched (the runner itself only projects the last prompt token)."""
    rows: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: Any, hidden: torch.Tensor) -> None:
        rows.append(model.logits(hidden).detach().clone())

    handle = model.model.norm.register_forward_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


def generate_recording(
    engine: LLMEngine, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """One greedy request run alone: its tokens and every logits row computed on the way [rows, V];
    no page may be left allocated after it."""
    with record_logits(engine.model) as rows:
        seq = engine.add_request(prompt, greedy(max_new_tokens))
        while engine.has_unfinished():
            engine.step()
    engine.pool.assert_no_leaks()
    return seq.output_token_ids, torch.cat(rows)


def run_to_completion(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[Any]:
    """Queue every prompt, step the engine until all finish; returns the finished Sequences."""
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    for _ in range(100_000):
        if not engine.has_unfinished():
            break
        engine.step()
    assert not engine.has_unfinished(), "engine did not finish its requests"
    return seqs


def make_pool(num_pages: int, page_size: int = 4, head_dim: int = 8) -> KVPool:
    return KVPool(num_pages, page_size, head_dim, torch.float32, "cpu")


def cache_prompt(keys: torch.Tensor, values: torch.Tensor | None = None, page_size: int = 16) -> SequenceKV:
    """keys (and values, else zeros) [L, n, H, D] written into a real pool and page table, as prefill
    leaves them."""
    from kvferry.engine.layers.paged_attention import store_kv

    layers, n, h, d = keys.shape
    pool = KVPool(layers * h * -(-n // page_size), page_size, d, torch.float32, "cpu")
    seq_kv = SequenceKV(pool, layers, h, n)
    seq_kv.grow(n)
    for layer in range(layers):
        pages, offsets = seq_kv.slots(layer, n)
        k = keys[layer].transpose(0, 1)  # [H, n, D]
        v = torch.zeros_like(k) if values is None else values[layer].transpose(0, 1)
        store_kv(pool.kv, pages, offsets, k, v)
    seq_kv.head_lens += n
    return seq_kv


def make_seq_kv(
    pool: KVPool | None = None, num_layers: int = 2, num_kv_heads: int = 3, max_tokens: int = 32
) -> SequenceKV:
    return SequenceKV(pool or make_pool(256), num_layers, num_kv_heads, max_tokens)


_SUBJECTS = [
    "The old lighthouse keeper",
    "A young botanist",
    "The city council",
    "Our neighbour's dog",
    "The museum curator",
    "A travelling musician",
    "The night-shift baker",
    "The river ferry",
]
_VERBS = ["repainted", "counted", "photographed", "carried", "described", "repaired", "sold", "measured"]
_OBJECTS = [
    "seven wooden chairs",
    "a crate of green apples",
    "the northern bridge",
    "two hundred letters",
    "an antique clock",
    "the harbour walls",
    "a basket of river stones",
    "the library roof",
]
_WHEN = [
    "on a rainy Tuesday",
    "before sunrise",
    "during the autumn fair",
    "after the long winter",
    "in the middle of July",
    "while the bells rang",
    "on the last day of May",
    "at noon",
]


def long_document(num_sentences: int, fact: str, seed: int = 0) -> str:
    """Varied filler text (seeded) with `fact` stated once in the middle."""
    import random

    rng = random.Random(seed)
    sentences = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_WHEN)}"
        f" and noted {rng.randint(2, 999)} details in the {rng.choice(['red', 'blue', 'grey'])} notebook."
        for _ in range(num_sentences)
    ]
    sentences.insert(num_sentences // 2, fact)
    return " ".join(sentences)


# save_tiny_llama's shape: GQA 4 q over 2 kv heads
LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 16


def save_tiny_llama(path: Path, vocab_size: int = 300, seed: int = 0) -> Path:
    """A tiny Llama (GQA 4 q over 2 kv heads) with O(1)-scale random weights, so its outputs react
    to every cached token (transformers' 0.02-std init gives near-flat attention)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_hidden_layers=LAYERS,
        max_position_embeddings=1024,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else noise / math.sqrt(p.shape[-1]))
    model.save_pretrained(path)
    return path


# ChatML, as SmolLM2's template renders it (the engine's chat path needs a template).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_byte_tokenizer(tiny: TinyModel, dest: Path) -> Path:
    """A copy of `tiny`'s folder with a byte-level tokenizer (one token per byte, 256 ids, then the
    ChatML specials) and a chat template, so text and chat prompts work on a tiny random model."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(tiny.path, dest, dirs_exist_ok=True)
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    vocab = {char: i for i, char in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    assert len(tokenizer) <= tiny.vocab_size
    tokenizer.save_pretrained(dest)
    return dest
