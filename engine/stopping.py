"""When a request stops: EOS, stop token ids, stop strings, max_tokens (a request's prompt + max_tokens fit in
max_model_len: engine/prompt.py refuses others)."""

from __future__ import annotations

from engine.sequence import FinishReason, Sequence


def check_stop(seq: Sequence, token_id: int, num_tokens: int, eos_token_ids: frozenset[int]) -> FinishReason | None:
    """Finish reason once `seq` gained `token_id` as its `num_tokens`-th token (prompt included), or None.

    The count is passed explicitly: with overlapped steps, `seq.num_tokens` may already count the token a
    step still running samples.
    """
    params = seq.params
    if seq.detokenizer is not None and _hit_stop_string(seq, token_id):
        return "stop"
    # The sampler bans EOS and stop ids until min_tokens, so any seen here are real stops.
    if (token_id in eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
        return "stop"
    if finishes_by_length(seq, num_tokens):
        return "length"
    return None


def finishes_by_length(seq: Sequence, num_tokens: int) -> bool:
    """Whether `seq` is done once it holds `num_tokens` tokens: known before the last token's value is."""
    return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens


def _hit_stop_string(seq: Sequence, token_id: int) -> bool:
    """Feed the new token to the detokenizer; on a stop string, remember where the text ends."""
    assert seq.detokenizer is not None
    delta = seq.detokenizer.add([token_id])
    if not delta:
        return False
    text = seq.detokenizer.text
    longest = max(map(len, seq.params.stop))
    search_from = max(0, len(text) - len(delta) - longest + 1)
    hits = [i for i in (text.find(s, search_from) for s in seq.params.stop) if i >= 0]
    if not hits:
        return False
    seq.stop_text_len = min(hits)
    return True
