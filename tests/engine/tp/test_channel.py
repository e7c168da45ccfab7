"""The shared-memory control channel and the step plan it carries."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time
from multiprocessing.connection import Connection

import numpy as np
import pytest

from engine.step_plan import StepPlan
from engine.tp.channel import ChannelClosed, ControlChannel, Method
from engine.tp.doorbell import Doorbell


def make_plan(num_seqs: int, num_cols: int) -> StepPlan:
    rng = np.random.default_rng(0)
    return StepPlan(
        input_ids=rng.integers(0, 151936, num_seqs, dtype=np.int64),
        positions=rng.integers(0, 4096, num_seqs, dtype=np.int64),
        slot_mapping=rng.integers(0, 1 << 20, num_seqs, dtype=np.int64),
        query_start_loc=np.arange(num_seqs + 1, dtype=np.int32),
        seq_lens=rng.integers(1, 4096, num_seqs, dtype=np.int32),
        block_tables=rng.integers(0, 1 << 16, (num_seqs, num_cols), dtype=np.int32),
        sample_indices=np.arange(num_seqs, dtype=np.int64),
        pending_indices=np.arange(0, num_seqs, 2, dtype=np.int64),
        pending_rows=rng.integers(0, num_seqs, (num_seqs + 1) // 2, dtype=np.int64),
        max_query_len=1,
    )


def assert_plans_equal(a: StepPlan, b: StepPlan) -> None:
    for name in StepPlan.__slots__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all(), name
            assert y.flags.writeable, name
        else:
            assert x == y, name


@pytest.fixture
def channel_pair() -> tuple[ControlChannel, ControlChannel]:
    wakeups = [Doorbell()]
    writer = ControlChannel.create(1 << 18, wakeups, world_size=2)
    reader = ControlChannel.attach(writer.name, wakeups, world_size=2)
    yield writer, reader
    reader.close()
    writer.close()


@pytest.mark.parametrize(("num_seqs", "num_cols"), [(1, 1), (7, 3), (256, 64)])
def test_step_plan_crosses_the_channel_intact(
    channel_pair: tuple[ControlChannel, ControlChannel], num_seqs: int, num_cols: int
) -> None:
    writer, reader = channel_pair
    plan = make_plan(num_seqs, num_cols)
    writer.send(Method.RUN, [plan.max_query_len], plan.arrays())
    method, args, arrays = reader.receive(1, parent_alive=lambda: True)
    assert method is Method.RUN
    assert_plans_equal(plan, StepPlan.from_arrays(args[0], arrays))


def test_messages_arrive_in_order_and_wait_for_the_reader(channel_pair: tuple[ControlChannel, ControlChannel]) -> None:
    writer, reader = channel_pair
    received: list[tuple[Method, list[int], list[np.ndarray]]] = []

    def read() -> None:
        for i in range(50):  # sleeping and polling readers alike
            received.append(reader.receive(1, lambda: True, spin_s=0.01 * (i % 2)))

    thread = threading.Thread(target=read)
    thread.start()
    rng = np.random.default_rng(1)
    messages = [([i, -i], [rng.integers(0, 100, i, dtype=np.int64), rng.random((i, 3)).astype(np.float32)])
                for i in range(49)]  # includes empty arrays
    for args, arrays in messages:  # each send waits for the previous message's ack, so none is overwritten
        writer.send(Method.RUN, args, arrays)
    writer.send(Method.SHUTDOWN)
    thread.join(timeout=10)
    assert len(received) == 50
    for (method, args, arrays), (sent_args, sent_arrays) in zip(received, messages):
        assert method is Method.RUN and args == sent_args
        assert all(a.dtype == b.dtype and a.shape == b.shape and (a == b).all() for a, b in zip(arrays, sent_arrays))
    assert received[-1] == (Method.SHUTDOWN, [], [])


def test_message_too_large_is_a_clear_error(channel_pair: tuple[ControlChannel, ControlChannel]) -> None:
    writer, _ = channel_pair
    with pytest.raises(ValueError, match="exceeds the 262144-byte channel"):
        writer.send(Method.RUN, [], [np.zeros(1 << 15, np.int64)])


def test_reader_leaves_when_rank_0_is_gone(channel_pair: tuple[ControlChannel, ControlChannel]) -> None:
    _, reader = channel_pair
    with pytest.raises(ChannelClosed):
        reader.receive(1, parent_alive=lambda: False)


def test_send_stops_waiting_when_a_rank_died(channel_pair: tuple[ControlChannel, ControlChannel]) -> None:
    writer, _ = channel_pair
    writer.send(Method.RUN)  # never read: the next send waits for an ack that will not come

    def rank_died() -> None:
        raise RuntimeError("rank 1 died")

    with pytest.raises(RuntimeError, match="rank 1 died"):
        writer.send(Method.RUN, alive=rank_died)


def test_close_unlinks_the_segment() -> None:
    channel = ControlChannel.create(4096, [Doorbell()], world_size=2)
    path = f"/dev/shm/{channel.name}"
    assert os.path.exists(path)
    channel.close()
    assert not os.path.exists(path)


def _count_messages(name: str, wakeups: list, results: Connection) -> None:
    reader = ControlChannel.attach(name, wakeups, world_size=2)
    seen: list[int] = []
    while True:
        method, args, arrays = reader.receive(1, lambda: True, spin_s=0.001)
        if method is Method.SHUTDOWN:
            break
        assert len(arrays[0]) == args[0] % 7
        seen.append(args[0])
    reader.close()
    results.send(seen)


def test_every_message_is_read_exactly_once_by_a_polling_rank() -> None:
    """A rank polling the sequence number while rank 0 writes it (seq crosses byte boundaries every 256
    messages) must never run a message twice or skip one; a torn read of the seq once did the first."""
    ctx = mp.get_context("spawn")
    wakeups = [Doorbell()]
    writer = ControlChannel.create(1 << 16, wakeups, world_size=2)
    receiver, sender = ctx.Pipe()
    reader = ctx.Process(target=_count_messages, args=(writer.name, wakeups, sender))
    reader.start()
    rng = random.Random(0)
    for i in range(3000):
        writer.send(Method.RUN, [i], [np.arange(i % 7)])
        if rng.random() < 0.3:
            time.sleep(0.0001)
    writer.send(Method.SHUTDOWN)
    seen = receiver.recv()
    reader.join(timeout=10)
    writer.close()
    assert seen == list(range(3000))
