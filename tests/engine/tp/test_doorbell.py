"""A Doorbell keeps working in the processes that opened it once its name is gone from /dev/shm."""

from __future__ import annotations

import gc
import multiprocessing as mp
from multiprocessing.connection import Connection
from pathlib import Path

from engine.tp.doorbell import Doorbell


def path_of(bell: Doorbell) -> Path:
    return Path(f"/dev/shm/sem.{bell.name.lstrip('/')}")


def _answer_rings(ring: Doorbell, answer: Doorbell, opened: Connection) -> None:
    opened.send("opened")  # both doorbells came with the arguments, so they are open by now
    for _ in range(3):
        assert ring.acquire(timeout=10.0)
        answer.release()


def test_rings_cross_processes_after_the_names_are_gone() -> None:
    ring, answer = Doorbell(), Doorbell()
    assert path_of(ring).exists() and path_of(answer).exists()
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=_answer_rings, args=(ring, answer, child_end))
    child.start()
    assert parent_end.recv() == "opened"
    for bell in (ring, answer):
        bell.unlink()
        bell.unlink()  # a second unlink is a no-op
        assert not path_of(bell).exists()
    for _ in range(3):
        ring.release()
        assert answer.acquire(timeout=10.0)
    child.join(timeout=10)
    assert child.exitcode == 0
    assert not answer.acquire(timeout=0.01)  # one answer per ring, no more


def test_a_doorbell_never_unlinked_goes_with_its_object() -> None:
    bell = Doorbell()
    path = path_of(bell)
    assert path.exists()
    del bell
    gc.collect()
    assert not path.exists()
