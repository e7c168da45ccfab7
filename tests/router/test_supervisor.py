"""The supervisor's restarts (router/supervisor.py), on fake replicas whose replacement the test scripts (no Ray)."""

from __future__ import annotations

import asyncio

from router.replica_slot import ReplicaSlot
from tests.router.fakes import serving_pool
from worker.handle import ReplicaGone


def test_a_replica_marked_down_while_it_restarts_gets_no_second_restart_loop() -> None:
    """The new replica's event stream breaks during the first attempt, which marks it down again: its restart loop
    retries after its backoff. Before, that mark also started a second loop, and the two replaced each other's
    replicas (here: three attempts and two restarts for one failure)."""

    async def scenario() -> None:
        pool = serving_pool(2)
        slot = pool.slots[0]
        attempts: list[str] = []

        async def replace(replacing: ReplicaSlot) -> None:
            attempts.append(replacing.state)
            if len(attempts) == 1:
                pool.supervisor.mark_down(replacing, "event stream broke")  # as the attempt's event pump does
                raise ReplicaGone("event stream broke")
            pool.set_state(replacing, "serving")  # as Lifecycle's attach does

        pool.supervisor.replace = replace
        pool.supervisor.mark_down(slot, "killed")
        await asyncio.sleep(1.5)  # past the first backoff (1 s)
        assert (attempts, slot.num_restarts, slot.state) == (["starting", "starting"], 1, "serving")
        await pool.close(kill_replicas=False)

    asyncio.run(scenario())
