"""One replica name as the router sees it: the live actor behind it, its state, its KV view, its requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from router.inflight import InFlightRequest
from router.kv_view import KVView
from worker.handle import ReplicaHandle
from worker.messages import ReplicaStats

SlotState = Literal["starting", "serving", "down", "draining"]


@dataclass(eq=False)
class ReplicaSlot:
    """One replica name: the live actor behind it (replaced on restart) and the router's view of it."""

    name: str
    handle: ReplicaHandle | None = None
    state: SlotState = "starting"
    kv: KVView = field(default_factory=KVView)
    inflight: dict[str, InFlightRequest] = field(default_factory=dict)  # by attempt (InFlightRequest.engine_request_id)
    engine_ids: dict[str, list[str]] = field(default_factory=dict)  # the engine request ids each attempt runs as
    stats: ReplicaStats | None = None
    num_restarts: int = 0
    next_seq: int | None = None  # the event seq expected next; a jump means lost token deltas
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def load_tokens(self) -> int:
        return sum(r.num_tokens for r in self.inflight.values())

    def add(self, request: InFlightRequest) -> None:
        """Track a request placed here; its prompt blocks count as cached in the view until its first token."""
        self.inflight[request.engine_request_id] = request
        self.engine_ids[request.engine_request_id] = list(request.engine_choices)
        self.kv.add_pending(request.engine_request_id, request.prepared.prompt_hashes)

    def remove(self, engine_request_id: str) -> InFlightRequest | None:
        """Stop tracking a request's attempt (finished, aborted, paused or moved); None if it was not here."""
        self.kv.drop_pending(engine_request_id)
        self.engine_ids.pop(engine_request_id, None)
        return self.inflight.pop(engine_request_id, None)

    def cancel_tasks(self) -> None:
        """Stop its event pump and health checks (but the task calling, which ends by itself)."""
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    def drop(self, engine_request_id: str) -> InFlightRequest | None:
        """Stop tracking a request's attempt and abort it on the replica, every choice (without waiting); None if it
        was not here."""
        engine_ids = self.engine_ids.get(engine_request_id, [])
        request = self.remove(engine_request_id)
        if request is not None and self.handle is not None:
            self.handle.abort(engine_ids)
        return request


def serving(slots: list[ReplicaSlot]) -> list[ReplicaSlot]:
    """The slots whose replica serves now."""
    return [slot for slot in slots if slot.state == "serving"]
