"""Engine and model configuration: validated once, frozen, never written back to."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.architectures import find_architecture
from engine.default_model import default_model_dir
from engine.generation_config import GENERATION_CONFIG_MODES, sampling_defaults
from engine.hub import resolve_model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# kv_cache_dtype's values (vLLM's names): "auto" keeps the model's dtype; fp8 is e4m3 with a scale per layer and KV
# head (engine/kv_scales.py)
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
# KV cache size on CPU when num_kv_blocks is not given (a GPU sizes it from gpu_memory_utilization of its memory).
CPU_KV_CACHE_BYTES = 1 << 30
# Tokens one step computes at most, by device type, when max_num_batched_tokens is not given. A CPU is ~100x
# slower: an 8192-token prefill chunk deep into a 33k-token prompt takes the embedded model 8.8 s on two cores,
# and every other request on the replica waits that long for its next token; 2048-token chunks keep a step
# under 3 s for 16% more total prefill time (bench/cpu_long_prompt.py, bench/RESULTS.md).
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 8192, "cpu": 2048}


@dataclass(frozen=True, slots=True)
class YarnScaling:
    """YaRN RoPE scaling (`"rope_type": "yarn"` in config.json), which Qwen2.5 and Qwen3 turn on to serve
    contexts longer than they were trained on; the field names and defaults are Hugging Face's."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # cos/sin scale; None: derived from factor (and mscale, mscale_all_dim)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The architecture facts the engine needs (Qwen2, Qwen2.5 or Qwen3), read once from config.json."""

    architecture: str  # a key of engine.architectures.SUPPORTED_ARCHITECTURES

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: YarnScaling | None  # None: plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool  # per-head RMSNorm of q and k before rotary (Qwen3)
    qkv_bias: bool  # bias on the q/k/v projections (Qwen2)
    o_proj_bias: bool
    sliding_window: int | None  # window of the layers that slide; None: every layer attends to the whole sequence
    checkpoint_dtype: str
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        path = model_dir / "config.json"
        if not path.is_file():
            raise ValueError(f"model: {model_dir} has no config.json (expected a Hugging Face checkpoint dir)")
        cfg = json.loads(path.read_text())
        name, arch = find_architecture(cfg)
        attention_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        num_heads = cfg["num_attention_heads"]
        return cls(
            architecture=name,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_yarn_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=arch.qk_norm,
            qkv_bias=attention_bias if arch.qkv_bias is None else arch.qkv_bias,
            o_proj_bias=attention_bias if arch.o_proj_bias is None else arch.o_proj_bias,
            sliding_window=_sliding_window(cfg),
            checkpoint_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    @property
    def context_length(self) -> int:
        """The longest sequence the model serves: max_position_embeddings, or with YaRN, the original context
        times the factor if that is longer (as vLLM reads it; Qwen's configs keep 40,960 with a 4x YaRN)."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        scaled = int(self.rope_scaling.original_max_position_embeddings * self.rope_scaling.factor)
        return max(self.max_position_embeddings, scaled)


def _sliding_window(cfg: dict) -> int | None:
    """The attention window when config.json makes any layer slide (as Hugging Face reads it), else None.

    Sliding applies only with use_sliding_window on; then the layers listed as "sliding_attention" in
    layer_types slide, or, without layer_types, those from max_window_layers on.
    """
    window = cfg.get("sliding_window")
    if not cfg.get("use_sliding_window") or window is None:
        return None
    num_layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        slides = "sliding_attention" in layer_types
    else:
        slides = cfg.get("max_window_layers", 28) < num_layers  # 28: transformers' default
    if not slides:
        return None
    _positive_int("config.json sliding_window", window)
    return int(window)


def _rope_parameters(cfg: dict) -> tuple[str, dict]:
    """(rope type, its parameters) from transformers 5's `rope_parameters` or the classic `rope_scaling`."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return params.get("rope_type", params.get("type", "default")), params


def _rope_theta(cfg: dict) -> float:
    _, params = _rope_parameters(cfg)
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _yarn_scaling(cfg: dict) -> YarnScaling | None:
    """YaRN's settings, read as Hugging Face reads them; other scaling types are refused by name."""
    rope_type, params = _rope_parameters(cfg)
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ValueError(f"model: rope scaling type {rope_type!r} is not supported (default RoPE and 'yarn' are)")
    original = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") \
        or cfg.get("max_position_embeddings", 32768)
    factor = params.get("factor") or cfg.get("max_position_embeddings", 32768) / original
    for name, value in (("factor", factor), ("original_max_position_embeddings", original)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"model: config.json rope_scaling.{name} must be a positive number, got {value!r}")
    optional = {name: float(params[name]) for name in ("beta_fast", "beta_slow", "attention_factor", "mscale",
                                                        "mscale_all_dim") if params.get(name)}
    return YarnScaling(factor=float(factor), original_max_position_embeddings=int(original),
                       truncate=bool(params.get("truncate", True)), **optional)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine was asked for, resolved against the model and the machine."""

    model: Path
    model_config: ModelConfig
    tensor_parallel_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    gpu_memory_utilization: float
    block_size: int
    num_kv_blocks: int | None
    enforce_eager: bool
    batch_invariant: bool
    dtype: torch.dtype
    kv_cache_dtype: torch.dtype  # the model's dtype, or float8_e4m3fn
    device: torch.device
    sampling_defaults: dict[str, float | int]  # from generation_config.json (engine/generation_config.py)

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype in KV_CACHE_DTYPES.values()

    @classmethod
    def create(
        cls,
        model: str | Path | None = None,
        *,
        tensor_parallel_size: int = 1,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        enforce_eager: bool = False,
        batch_invariant: bool = False,
        dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        device: str = "auto",
        generation_config: str = "auto",
    ) -> EngineConfig:
        """Validate the user's arguments (ValueError naming the field) and resolve the defaults.

        This signature is the one definition of the engine's arguments and their defaults; LLMEngine's
        constructor repeats it for help() and editors (a test keeps the two equal) and documents each.
        """
        _positive_int("tensor_parallel_size", tensor_parallel_size)
        if max_num_batched_tokens is not None:
            _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        _positive_int("max_num_seqs", max_num_seqs)
        _positive_int("block_size", block_size)
        if block_size & (block_size - 1) or block_size > 256:
            raise ValueError(f"block_size must be a power of two <= 256, got {block_size}")
        if num_kv_blocks is not None:
            _positive_int("num_kv_blocks", num_kv_blocks)
        if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float)):
            raise ValueError(f"gpu_memory_utilization must be a number, got {gpu_memory_utilization!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        for name, flag in (("enforce_eager", enforce_eager), ("batch_invariant", batch_invariant)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if kv_cache_dtype != "auto" and kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {kv_cache_dtype!r}")
        if generation_config not in GENERATION_CONFIG_MODES:
            raise ValueError(f"generation_config must be one of {', '.join(GENERATION_CONFIG_MODES)}, "
                             f"got {generation_config!r}")
        model_dir = _resolve_model(model)  # after the checks above: it may download the model
        model_config = ModelConfig.from_dir(model_dir)
        resolved_device = _resolve_device(device)
        _check_tensor_parallel_size(tensor_parallel_size, model_config, resolved_device)
        resolved_dtype = _resolve_dtype(dtype, model_config.checkpoint_dtype, resolved_device)
        return cls(
            model=model_dir,
            model_config=model_config,
            tensor_parallel_size=tensor_parallel_size,
            max_num_batched_tokens=max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS[resolved_device.type],
            max_num_seqs=max_num_seqs,
            max_model_len=_resolve_max_model_len(max_model_len, model_config),
            gpu_memory_utilization=float(gpu_memory_utilization),
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            enforce_eager=enforce_eager,
            batch_invariant=batch_invariant,
            dtype=resolved_dtype,
            kv_cache_dtype=KV_CACHE_DTYPES.get(kv_cache_dtype, resolved_dtype),
            device=resolved_device,
            sampling_defaults=sampling_defaults(model_dir, generation_config),
        )


def _resolve_model(model: str | Path | None) -> Path:
    """The checkpoint directory of `model`; None is the embedded tiny Qwen3, whose random weights a user
    must not mistake for a model's answers."""
    if model is not None:
        return resolve_model_dir(model)
    log.warning("no model given: using the embedded tiny Qwen3 with RANDOM weights (real Qwen tokenizer, "
                "gibberish text); give a Hugging Face model id or a checkpoint directory for real output")
    return default_model_dir()


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_tensor_parallel_size(tp_size: int, model_config: ModelConfig, device: torch.device) -> None:
    """Each rank holds a whole number of query and KV heads (and of MLP columns), on its own GPU."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(model_config, name)
        if value % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not divide the model's {name}={value}; "
                "choose a size that divides the head counts"
            )
    if device.type == "cuda" and (device.index or 0) + tp_size > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size={tp_size} needs {tp_size} GPUs from {device}, "
            f"but {torch.cuda.device_count()} are visible"
        )


def _resolve_max_model_len(max_model_len: int | None, model_config: ModelConfig) -> int:
    """The context length: the model's by default. A sliding-window model is served with full attention,
    which computes exactly the same as long as no sequence outgrows the window, so the window caps it."""
    limit = model_config.context_length
    window = model_config.sliding_window
    if max_model_len is None:
        if window is not None and window < limit:
            log.warning("the model enables sliding-window attention (window %d tokens), which the engine serves "
                        "as full attention: max_model_len defaults to %d instead of %d", window, window, limit)
            return window
        return limit
    _positive_int("max_model_len", max_model_len)
    if max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context length of {limit} tokens "
                         "(max_position_embeddings, or with YaRN rope scaling its original length x factor)")
    if window is not None and max_model_len > window:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's sliding_window={window}: the engine has no "
            "sliding-window attention (it matches full attention only within the window); use max_model_len <= "
            f"{window}"
        )
    return max_model_len


def _resolve_device(device: str) -> torch.device:
    """The device named, with its GPU index made explicit ("cuda" -> "cuda:<current>"): tensor-parallel
    ranks count their GPUs from it and torch.cuda.set_device refuses an index-less device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a valid device ('auto', 'cpu', 'cuda', 'cuda:N')") from e
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine")
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


def _resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    resolved = DTYPES.get(checkpoint_dtype, torch.float32)
    if device.type == "cpu" and resolved != torch.float32:
        log.info("dtype=auto on CPU: computing in float32 instead of the checkpoint's %s", checkpoint_dtype)
        return torch.float32
    return resolved
