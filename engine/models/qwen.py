"""The dense Qwen decoder (Qwen2, Qwen2.5 and Qwen3), written for the paged-attention engine.

The architectures differ only in attention: Qwen3 normalises each q and k head (RMSNorm) before
rotary, Qwen2 has a bias on the q/k/v projections. ModelConfig carries those flags
(engine/architectures.py says which architecture sets which).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.layernorm import RMSNorm
from engine.layers.linear import GateUpLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.rotary import RotaryEmbedding


class QwenAttention(nn.Module):
    """Self-attention over the paged KV cache; q/k norms and projection biases as the architecture has them."""

    def __init__(self, cfg: ModelConfig, max_position: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads // tp_size
        self.num_kv_heads = cfg.num_key_value_heads // tp_size
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.qkv_bias, tp_rank, tp_size,
        )
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, cfg.o_proj_bias, tp_rank, tp_size
        )
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q = self.rotary(positions, qkv, self.q_norm, self.k_norm, self.num_heads, self.num_kv_heads,
                        self.attn.k_cache, self.attn.v_cache, metadata.slot_mapping, self.attn.kv_scales)  # K/V: cache
        o = self.attn(q, metadata)
        return self.o_proj(o.flatten(1))


class QwenMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = GateUpLinear(cfg.hidden_size, size, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, False, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class QwenDecoderLayer(nn.Module):
    """Pre-norm attention and MLP; the residual add is fused into the following RMSNorm."""

    def __init__(self, cfg: ModelConfig, max_position: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.self_attn = QwenAttention(cfg, max_position, tp_rank, tp_size)
        self.mlp = QwenMLP(cfg, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, metadata: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class QwenModel(nn.Module):
    """Embedding, the decoder layers and the final norm."""

    def __init__(self, cfg: ModelConfig, max_position: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
        self.layers = nn.ModuleList(
            QwenDecoderLayer(cfg, max_position, tp_rank, tp_size) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Called after each layer's launch: the engine's heartbeat, which shows a long step is not a hung one.
        self.on_layer_done: Callable[[], None] = _nothing

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, metadata)
            self.on_layer_done()
        x, _ = self.norm(x, residual)
        return x


class QwenForCausalLM(nn.Module):
    """The decoder with its LM head: what the model runner builds and `load_weights` fills."""

    # Checkpoint projection name -> (our packed parameter, shard id): a data table, not code.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_position: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.model = QwenModel(cfg, max_position, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [N, hidden] -> logits [N, vocab] (None on TP ranks other than 0)."""
        return self.lm_head(hidden)


def _nothing() -> None:
    pass
