"""The Hugging Face architectures the engine serves: one Qwen decoder, a few flags apart.

This table is the one list of supported architectures: config validation, its error messages
and `python -m engine --help` read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Architecture:
    """What sets one architecture apart inside the shared decoder (engine/models/qwen.py)."""

    model_type: str  # config.json's "model_type", which names the architecture when "architectures" is absent
    qk_norm: bool  # per-head RMSNorm of q and k before rotary
    qkv_bias: bool | None  # bias on the q/k/v projections; None: config.json's "attention_bias" decides
    o_proj_bias: bool | None  # bias on the output projection; None: config.json's "attention_bias" decides


SUPPORTED_ARCHITECTURES: dict[str, Architecture] = {
    # Qwen2 and Qwen2.5 (dense): q/k/v always carry a bias, whatever "attention_bias" says.
    "Qwen2ForCausalLM": Architecture(model_type="qwen2", qk_norm=False, qkv_bias=True, o_proj_bias=False),
    # Qwen3 (dense): q/k RMSNorm; "attention_bias" (off in released checkpoints) puts a bias on q/k/v and o.
    "Qwen3ForCausalLM": Architecture(model_type="qwen3", qk_norm=True, qkv_bias=None, o_proj_bias=None),
}


def find_architecture(config: dict) -> tuple[str, Architecture]:
    """The supported architecture a config.json describes; ValueError naming it and the supported ones."""
    names = config.get("architectures") or [
        name for name, arch in SUPPORTED_ARCHITECTURES.items() if arch.model_type == config.get("model_type")
    ]
    for name in [names] if isinstance(names, str) else names:
        if name in SUPPORTED_ARCHITECTURES:
            return name, SUPPORTED_ARCHITECTURES[name]
    found = config.get("architectures") or config.get("model_type")
    raise ValueError(
        f"model: unsupported architecture {found!r} in config.json; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
