"""Rank 0 -> ranks 1..N-1 control messages through one shared-memory buffer and a semaphore per rank.

A message is a method (an `Enum`), a few small arguments and some numpy arrays. The method, the
arguments and the arrays' dtypes and shapes are msgpack-encoded; each array's bytes are copied
straight into the buffer. A step costs one memcpy per array and one semaphore post per rank (a
single syscall, unlike a multiprocessing Event's condition variable): no pickling, no socket.

Buffer layout (a uint64 header, then the message):
    word 0: sequence number of the latest message   word 1: length of its msgpack part
    word 1 + r: sequence number rank r has read (its ack), for r in 1..N-1
    then the msgpack part, then each array at the next 8-byte-aligned offset
Header words are read and written whole through a numpy uint64 view: aligned 8-byte loads and
stores, which x86-64 and ARM64 never tear (struct's "<Q" goes byte by byte, and a rank that read a
half-written sequence number would run a step twice).
A new message is written only after every rank acked the previous one, so a reader never sees a
half-overwritten buffer. In practice the acks are already there: every step contains collectives
that a rank can only join after reading the step's message.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Sequence
from multiprocessing.shared_memory import SharedMemory

import msgpack
import numpy as np

from engine.tp.doorbell import Doorbell


class Method(enum.IntEnum):
    """What rank 0 asks the other ranks to do."""

    RUN = 1  # payload: an encoded StepPlan; every rank runs the model step on it
    SHUTDOWN = 2  # leave the loop, destroy the process group, exit


class ChannelClosed(Exception):
    """The other side is gone (rank 0 exited), so no message will ever come."""


class ControlChannel:
    """One writer (rank 0), `world_size - 1` readers. Create on rank 0, `attach` on the others."""

    def __init__(self, shm: SharedMemory, wakeups: Sequence[Doorbell], world_size: int, owner: bool) -> None:
        self.shm, self.wakeups, self.world_size, self.owner = shm, wakeups, world_size, owner
        assert shm.buf is not None
        self._buf: memoryview = shm.buf
        self._header = np.frombuffer(self._buf, np.uint64, 1 + world_size)  # seq, length, acks of ranks 1..N-1
        self._data_offset = 8 * (1 + world_size)
        self._seq = 0
        self._unlinked = False

    @classmethod
    def create(cls, size: int, wakeups: Sequence[Doorbell], world_size: int) -> ControlChannel:
        shm = SharedMemory(name=f"nanoserve-tp-{os.getpid()}-{time.monotonic_ns()}", create=True, size=size)
        assert shm.buf is not None
        shm.buf[: 8 * (1 + world_size)] = bytes(8 * (1 + world_size))
        return cls(shm, wakeups, world_size, owner=True)

    @classmethod
    def attach(cls, name: str, wakeups: Sequence[Doorbell], world_size: int) -> ControlChannel:
        # Spawned ranks share rank 0's resource tracker, so this attachment adds nothing for it to clean up:
        # the segment is unlinked once, by its creator (see `unlink`).
        return cls(SharedMemory(name=name), wakeups, world_size, owner=False)

    def unlink(self) -> None:
        """Remove the segment's name from /dev/shm (owner only, once every rank has attached): the mappings
        stay valid, and no name is left behind however the processes end. The resource tracker would unlink
        it after a SIGKILL to rank 0 alone, but Ray kills a dead worker's children with it, tracker included."""
        if self.owner and not self._unlinked:
            self._unlinked = True
            self.shm.unlink()

    @property
    def name(self) -> str:
        return self.shm.name

    def send(
        self,
        method: Method,
        args: Sequence[int] = (),
        arrays: Sequence[np.ndarray] = (),
        alive: Callable[[], None] = lambda: None,
    ) -> None:
        """Write a message and wake every rank. `alive` raises if a rank died while we wait for acks."""
        # dtype.char, not .str: half the cost, and both ends run on one host, so the codes mean the same.
        header = msgpack.packb((int(method), list(args), [(a.dtype.char, a.shape) for a in arrays]))
        offsets = _array_offsets(self._data_offset + len(header), arrays)
        end = offsets[-1] + arrays[-1].nbytes if arrays else self._data_offset + len(header)
        if end > len(self._buf):
            raise ValueError(f"control message of {end} bytes exceeds the {len(self._buf)}-byte channel")
        self._wait_for_acks(alive)
        self._seq += 1
        self._buf[self._data_offset : self._data_offset + len(header)] = header
        for offset, array in zip(offsets, arrays):  # memoryview copies cost a third of numpy slice assignment
            if array.nbytes:
                self._buf[offset : offset + array.nbytes] = np.ascontiguousarray(array).data.cast("B")
        self._header[1] = len(header)
        self._header[0] = self._seq  # last: a rank that sees the new seq sees the whole message
        for wakeup in self.wakeups:
            wakeup.release()

    def _wait_for_acks(self, alive: Callable[[], None]) -> None:
        for rank in range(1, self.world_size):
            while self._header[1 + rank] != self._seq:
                alive()
                time.sleep(1e-5)

    def receive(
        self, rank: int, parent_alive: Callable[[], bool], spin_s: float = 0.0
    ) -> tuple[Method, list[int], list[np.ndarray]]:
        """Block until rank 0's next message (arrays copied out); raise ChannelClosed if `parent_alive()` turns
        False. For `spin_s` seconds the rank polls the buffer instead of sleeping, so a message that comes
        within a step's time is seen at once and rank 0's semaphore post wakes nobody (no syscall on either
        side); after that it sleeps on the semaphore, which is only a doorbell: the sequence number decides."""
        self._wait_for_message(rank, parent_alive, spin_s)
        seq, length = int(self._header[0]), int(self._header[1])
        method, args, specs = msgpack.unpackb(self._buf[self._data_offset : self._data_offset + length])
        arrays: list[np.ndarray] = []
        offset = self._data_offset + length
        for dtype_char, shape in specs:
            dtype = np.dtype(dtype_char)
            offset = _align(offset)
            count = int(np.prod(shape))
            arrays.append(np.frombuffer(self._buf, dtype, count, offset).reshape(shape).copy())
            offset += count * dtype.itemsize
        self._header[1 + rank] = seq
        return Method(method), args, arrays

    def _wait_for_message(self, rank: int, parent_alive: Callable[[], bool], spin_s: float) -> None:
        last_read = self._header[1 + rank]
        spin_until = time.monotonic() + spin_s
        while self._header[0] == last_read:
            if time.monotonic() < spin_until:
                continue
            if not self.wakeups[rank - 1].acquire(timeout=1.0) and not parent_alive():
                raise ChannelClosed("rank 0 exited")

    def close(self) -> None:
        """Detach; the owner also unlinks the segment from /dev/shm if it has not yet."""
        del self._header
        self._buf.release()
        self.shm.close()
        self.unlink()


def _align(offset: int) -> int:
    return (offset + 7) & ~7


def _array_offsets(start: int, arrays: Sequence[np.ndarray]) -> list[int]:
    offsets = []
    for array in arrays:
        start = _align(start)
        offsets.append(start)
        start += array.nbytes
    return offsets
