"""Where a request is in the router, and the moves between those states that are legal."""

from __future__ import annotations

import enum


class RequestState(enum.Enum):
    PLACING = "placing"  # being submitted to a replica (a new request starts here)
    RUNNING = "running"  # queued or running on its replica, or waiting in the retry budget to move
    PAUSED = "paused"  # taken off its replica until its client reads what waits for it (see router/event_pump.py)
    DONE = "done"  # finished, failed or aborted


# The legal transitions, from each state. PLACING -> PLACING: a new request starts out placing, then is placed.
NEXT_STATES = {
    RequestState.PLACING: {RequestState.PLACING, RequestState.RUNNING, RequestState.PAUSED, RequestState.DONE},
    RequestState.RUNNING: {RequestState.PLACING, RequestState.PAUSED, RequestState.DONE},
    RequestState.PAUSED: {RequestState.PLACING, RequestState.DONE},
    RequestState.DONE: set(),
}
