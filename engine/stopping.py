"""When a request stops: EOS, stop token ids, stop strings, max_tokens, max_model_len."""

from __future__ import annotations

from engine.sequence import FinishReason, Sequence


def check_stop(seq: Sequence, eos_token_ids: frozenset[int], max_model_len: int) -> FinishReason | None:
    """Finish reason after `seq` gained its newest token, or None to keep going."""
    params = seq.params
    token = seq.token_ids[-1]
    if seq.detokenizer is not None and _hit_stop_string(seq):
        return "stop"
    # The sampler bans EOS and stop ids until min_tokens, so any seen here are real stops.
    if (token in eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
        return "stop"
    num_tokens = len(seq.token_ids)
    if num_tokens - seq.num_prompt_tokens >= params.max_tokens or num_tokens >= max_model_len:
        return "length"
    return None


def _hit_stop_string(seq: Sequence) -> bool:
    """Feed the new token to the detokenizer; on a stop string, remember where the text ends."""
    assert seq.detokenizer is not None
    delta = seq.detokenizer.add(seq.token_ids[-1:])
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
