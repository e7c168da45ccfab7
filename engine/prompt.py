"""Turn a user prompt (text or token ids) into validated token ids, or an InvalidRequest naming the field."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.invalid_request import InvalidRequest
from engine.sampling_params import SamplingParams, max_tokens_error
from engine.tokenizer import Tokenizer

Prompt = str | list[int]


def validate_prompt(
    prompt: Prompt, tokenizer: Tokenizer, config: EngineConfig, params: SamplingParams, num_kv_blocks: int
) -> list[int]:
    """Token ids of `prompt`, checked against the vocabulary, the KV cache size and max_model_len, which
    the prompt and max_tokens must fit together."""
    if isinstance(prompt, str):
        token_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        token_ids = list(prompt)
    else:
        raise InvalidRequest("prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}")
    if not token_ids:
        raise InvalidRequest("prompt", "must not be empty")
    vocab_size = config.model_config.vocab_size
    params.check_token_ids(vocab_size)
    for i, t in enumerate(token_ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidRequest("prompt", f"token id {t!r} at index {i} is outside the vocabulary [0, {vocab_size})")
    room = config.max_model_len - len(token_ids)
    if room < 1:
        raise InvalidRequest(
            "prompt", f"{len(token_ids)} tokens leave no room to generate within max_model_len={config.max_model_len}"
        )
    if params.max_tokens > room:  # as vLLM: refused, not cut short (the caller learns what fits)
        raise max_tokens_error(params.max_tokens, len(token_ids), config.max_model_len)
    max_len = len(token_ids) + params.max_tokens
    if -(-max_len // config.block_size) > num_kv_blocks:
        raise InvalidRequest(
            "prompt", f"{len(token_ids)} tokens + max_tokens={params.max_tokens} need more KV blocks "
            f"than the whole cache holds ({num_kv_blocks} x {config.block_size} tokens)"
        )
    return token_ids
