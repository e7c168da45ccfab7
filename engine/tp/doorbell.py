"""The semaphore rank 0 posts to wake a sleeping rank: a named POSIX semaphore whose name is removed as soon as
the rank has opened it.

multiprocessing's Semaphore keeps its name (/dev/shm/sem.mp-*) for its whole life and leaves the unlinking to
its finalizer or, after a crash, to the resource tracker. Ray kills a dead replica's worker together with its
children, tracker included, so each such TP replica left a name behind. A Doorbell's creator unlinks the name
once every rank has opened it, as `ControlChannel.unlink` does for the buffer: the processes that opened it
keep using it, and no name is left however they end. Until then the resource tracker holds the name, for a
creator that dies alone during start-up.
"""

from __future__ import annotations

import _multiprocessing
import os
import secrets
import weakref
from multiprocessing import resource_tracker

_SEMAPHORE = 1  # multiprocessing.synchronize.SEMAPHORE: a counting semaphore (a lock is 0)
_MAX_VALUE = _multiprocessing.SemLock.SEM_VALUE_MAX


class Doorbell:
    """A counting semaphore that starts at 0; spawned processes get it pickled (as a Process argument) and
    open it by name."""

    def __init__(self) -> None:
        self.name = f"/nanoserve-tp-{os.getpid()}-{secrets.token_hex(6)}"  # /dev/shm/sem.nanoserve-tp-...
        self._sem = _multiprocessing.SemLock(_SEMAPHORE, 0, _MAX_VALUE, self.name, False)
        resource_tracker.register(self.name, "semaphore")
        self._unlink: weakref.finalize | None = weakref.finalize(self, _unlink, self.name)

    def release(self) -> None:
        """Ring: wake the waiter, or let its next `acquire` return at once (a syscall only if it sleeps)."""
        self._sem.release()

    def acquire(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a ring; False if none came."""
        return self._sem.acquire(True, timeout)

    def unlink(self) -> None:
        """Remove the name from /dev/shm, once every process that needs it has opened it (creator only; the
        garbage collector or the interpreter's exit does it otherwise). Idempotent."""
        assert self._unlink is not None, "only the Doorbell's creator unlinks it"
        self._unlink()

    def __getstate__(self) -> str:
        return self.name

    def __setstate__(self, name: str) -> None:
        self.name = name
        self._sem = _multiprocessing.SemLock._rebuild(0, _SEMAPHORE, _MAX_VALUE, name)
        self._unlink = None  # the name is the creator's to remove


def _unlink(name: str) -> None:
    _multiprocessing.sem_unlink(name)
    resource_tracker.unregister(name, "semaphore")
