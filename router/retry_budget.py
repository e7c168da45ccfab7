"""The fleet-wide retry budget: how many failovers may run at once, and which wait.

When a replica dies, its requests move to the others. Moved all at once, they can take the survivors down
too: if one of them is what killed the replica (a "query of death"), every replica it lands on dies, with
whatever shares it. So, like Envoy's retry budget and gRPC's retry throttling, failovers are bounded: each
replica runs at most one failover at a time. A failover is in progress from its placement until the moved
request's first token there (the proof that the replica survives it); the others wait here, in arrival
order, and start as replicas free up. A request in progress is therefore alone among the moved requests
on its replica, so when that replica dies too the suspect is clear: a request whose replicas died twice
with no token in between is stopped (ABORTED), and the requests beside it move on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from router.inflight import InFlightRequest
from router.replica_slot import ReplicaSlot

# Replica deaths, with no token in between, after which a request is stopped instead of moved again.
MAX_REPLICA_DEATHS = 2


class RetryBudget:
    """The failovers waiting for a replica with none in progress."""

    def __init__(self) -> None:
        self._waiting: deque[tuple[InFlightRequest, frozenset[str]]] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def wait(self, request: InFlightRequest, exclude: frozenset[str]) -> None:
        """Queue a request to move, never to the replicas in `exclude`."""
        self._waiting.append((request, exclude))

    def admit(self, serving: list[ReplicaSlot]) -> Iterator[tuple[InFlightRequest, frozenset[str], frozenset[str]]]:
        """The waiting failovers that may start now, in arrival order, each with the replicas excluded for it
        and those running a failover already (busy). The caller places each one before taking the next, so the
        replica it chose counts as busy for the rest. A request no serving replica may take (all excluded: they
        died under it or refused it) comes out too, for the caller's placement to refuse."""
        for _ in range(len(self._waiting)):
            request, exclude = self._waiting.popleft()
            if request.done:
                continue
            allowed = [slot for slot in serving if slot.name not in exclude]
            idle = [slot for slot in allowed if not has_failover_in_progress(slot)]
            if idle or not allowed:
                yield request, exclude, frozenset(slot.name for slot in allowed if slot not in idle)
            else:
                self._waiting.append((request, exclude))


def has_failover_in_progress(slot: ReplicaSlot) -> bool:
    """Whether a request moved here after a replica death still waits for its first token here."""
    return any(request.replica_deaths for request in slot.inflight.values())
