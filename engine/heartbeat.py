"""The engine thread's heartbeat: how a supervisor tells a long step from a hung one."""

from __future__ import annotations

import time


class Heartbeat:
    """Signs of life from the thread that drives an engine.

    That thread beats between steps, between the layers of a step's forward, and (in a serving loop)
    while it waits for work; so a beat older than a few layers' time means the thread is stuck, however
    long a step may legitimately take (a 30k-token prefill on a CPU). Written by that thread only, read
    from any other (each attribute read is atomic).
    """

    def __init__(self) -> None:
        self.beat_at = time.monotonic()
        self.step_started_at: float | None = None  # while a step runs
        self.step_num_tokens = 0  # tokens the running step computes (prefill and decode)

    def beat(self) -> None:
        self.beat_at = time.monotonic()

    def step_started(self, num_tokens: int) -> None:
        self.step_num_tokens = num_tokens
        self.step_started_at = self.beat_at = time.monotonic()

    def step_ended(self) -> None:
        self.step_started_at = None
        self.beat_at = time.monotonic()
