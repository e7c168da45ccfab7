"""Test-only fault hooks, run inside a replica actor by `ReplicaHandle.run` (Ray's __ray_call__): no hook in the
product code."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

DEADLY_PROMPT = [1023, 1022, 1021, 1020] + [7] * 28  # no other test request's prompt starts like this


def die_on(prompt_start: list[int]) -> Callable[[Any], None]:
    """A hook for `ReplicaHandle.run`: from then on the replica's process dies (as from a kernel crash or an OOM
    kill) once the prefill of a request starting with `prompt_start` has run, after the replica has answered its
    submit call. Built as closures, so Ray ships the code itself rather than a test-module name."""
    n = len(prompt_start)

    def arm(engine: Any) -> None:
        step = engine.step

        def step_or_die() -> Any:
            if any(seq.token_ids[:n] == prompt_start and seq.num_computed_tokens for seq in engine.scheduler.running):
                time.sleep(0.5)  # the submit's answer is long gone: the router knows the request ran here
                os._exit(1)
            return step()

        engine.step = step_or_die

    return lambda replica: replica._loop.call(arm)


def hang_step_loop(seconds: float) -> Callable[[Any], None]:
    """A hook for `ReplicaHandle.run`: the replica's step thread runs a call that sleeps `seconds` (a hung kernel,
    a deadlock), while its other calls (health among them) still answer. Returns at once."""

    def hang(replica: Any) -> None:
        threading.Thread(target=replica._loop.call, args=(lambda engine: time.sleep(seconds),), daemon=True).start()

    return hang
