"""Turn a user prompt (text or token ids) into validated token ids, or a ValueError naming the field."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

Prompt = str | list[int]


def validate_prompt(
    prompt: Prompt, tokenizer: Tokenizer, config: EngineConfig, params: SamplingParams, num_kv_blocks: int
) -> list[int]:
    """Token ids of `prompt`, checked against the vocabulary, max_model_len and the KV cache size."""
    if isinstance(prompt, str):
        token_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        token_ids = list(prompt)
    else:
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not token_ids:
        raise ValueError("prompt: must not be empty")
    vocab_size = config.model_config.vocab_size
    for i, t in enumerate(params.stop_token_ids):
        if t >= vocab_size:
            raise ValueError(f"stop_token_ids[{i}]: {t} is outside the vocabulary [0, {vocab_size})")
    for i, t in enumerate(token_ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt: token id {t!r} at index {i} is outside the vocabulary [0, {vocab_size})")
    if len(token_ids) + 1 > config.max_model_len:
        raise ValueError(
            f"prompt: {len(token_ids)} tokens leave no room to generate within max_model_len={config.max_model_len}"
        )
    max_len = min(len(token_ids) + params.max_tokens, config.max_model_len)
    if -(-max_len // config.block_size) > num_kv_blocks:
        raise ValueError(
            f"prompt: {len(token_ids)} tokens + max_tokens={params.max_tokens} need more KV blocks "
            f"than the whole cache holds ({num_kv_blocks} x {config.block_size} tokens)"
        )
    return token_ids
