"""ReplicaHandle turns every way a call to a replica can fail into one ReplicaGone, without a Ray cluster: a stand-in
for the actor whose calls return futures that never end or fail as Ray's do."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from worker.handle import ReplicaGone, ReplicaHandle


def handle_whose_calls(outcome: BaseException | None) -> ReplicaHandle:
    """A handle over a stand-in actor: each call's result never comes (outcome None) or raises `outcome`."""

    def remote(*args: Any) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        if outcome is not None:
            future.set_exception(outcome)
        return future

    method = SimpleNamespace(remote=remote)
    actor = SimpleNamespace(health=method, describe=method, submit=method, stats=method)
    return ReplicaHandle("r-0", actor)  # type: ignore[arg-type]


def reason(handle: ReplicaHandle, call: str, **kwargs: Any) -> str:
    async def scenario() -> str:
        with pytest.raises(ReplicaGone) as gone:
            await getattr(handle, call)(**kwargs)
        return gone.value.reason

    return asyncio.run(scenario())


def test_a_call_past_its_timeout_is_replica_gone() -> None:
    assert reason(handle_whose_calls(None), "health", timeout_s=0.01) == "health check took over 0.01 s"


def test_a_dead_actor_is_replica_gone_in_one_line() -> None:
    died = ActorDiedError()
    assert reason(handle_whose_calls(died), "stats") == f"stats failed: ActorDiedError: {str(died).splitlines()[0]}"


def test_an_error_the_replica_raised_is_named_rather_than_rays_wrapper() -> None:
    error = RayTaskError("describe", "Traceback (most recent call last):\n  ...", ValueError("no model at /x\nmore"))
    assert reason(handle_whose_calls(error), "describe") == "describe failed: ValueError: no model at /x"
