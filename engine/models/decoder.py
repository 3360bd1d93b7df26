"""A decoder-only transformer built from the shared layers; model families differ only in options.

Parameter names follow Hugging Face (`model.layers.N.self_attn.q_proj.weight`, ...), so a HF state
dict loads with no renaming.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvferry.engine.layers.attention import Attention
from kvferry.engine.layers.norm import RMSNorm
from kvferry.engine.layers.rotary import RotaryEmbedding, rope_parameters

MLPFactory = Callable[[Any, int], nn.Module]


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, idx: int, qk_norm: bool, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = Attention(config, idx, qk_norm)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden]: the previous layer's MLP output (the embeddings, with residual None, for the
        first layer) -> (this layer's MLP output, the residual stream it is still to be added to).
        Each norm adds the block output before it to the stream (one kernel on CUDA)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, rope, batch)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, config: Any, qk_norm: bool, make_mlp: MLPFactory) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = RotaryEmbedding(head_dim, rope_parameters(config))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, qk_norm, make_mlp(config, i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [N, hidden]
        rope = self.rotary(positions, x.dtype)
        residual = None
        # A prefill chunk checks for a cancel between layers (PrefillBatch.stop_if_cancelled); decode
        # batches have no such hook, and a CUDA graph replays no Python at all.
        stop_if_cancelled = getattr(batch, "stop_if_cancelled", None)
        for layer in self.layers:
            if stop_if_cancelled is not None:
                stop_if_cancelled()
            x, residual = layer(x, residual, rope, batch)
        return self.norm(residual + x)


class CausalLM(nn.Module):
    """`model` + `lm_head`; subclasses choose q/k norm and the feed-forward block."""

    qk_norm = False
    supports_cuda_graphs = True  # the forward never synchronises with the host (engine/cuda_graphs.py)

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, self.qk_norm, self.make_mlp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def make_mlp(config: Any, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any) -> torch.Tensor:
        """Hidden states [N, hidden] of every input token."""
        return self.model(input_ids, positions, batch)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
