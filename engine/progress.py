"""The offline API's progress: step an engine until the given sequences finish, with a bar that shows the prefill
and decode throughput (a mixed step counts as prefill)."""

from __future__ import annotations

import time
from typing import Protocol

from tqdm.auto import tqdm

from engine.outputs import RequestOutput
from engine.sequence import Sequence


class Engine(Protocol):
    """What the bar needs of LLMEngine: its step, and the (prefill, decode) tokens that step computed."""

    last_step_tokens: tuple[int, int]

    def step(self) -> list[RequestOutput]: ...


def step_until_finished(engine: Engine, seqs: list[Sequence], use_tqdm: bool) -> None:
    tokens = {"prefill": 0, "decode": 0}
    seconds = {"prefill": 1e-9, "decode": 1e-9}
    with tqdm(total=len(seqs), desc="Generating", unit="req", dynamic_ncols=True, disable=not use_tqdm) as bar:
        while any(not seq.is_finished for seq in seqs):
            start = time.perf_counter()
            finished = sum(out.finished for out in engine.step())
            num_prefill, num_decode = engine.last_step_tokens
            kind = "prefill" if num_prefill else "decode"
            tokens[kind] += num_prefill + num_decode
            seconds[kind] += time.perf_counter() - start
            rates = {k: tokens[k] / seconds[k] for k in tokens}
            bar.set_postfix_str(f"prefill {rates['prefill']:,.0f} tok/s, decode {rates['decode']:,.0f} tok/s")
            bar.update(finished)
