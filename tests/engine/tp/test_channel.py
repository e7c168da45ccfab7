"""The shared-memory control channel and the step plan it carries."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import numpy as np
import pytest

from engine.step_plan import StepPlan
from engine.tp.channel import ChannelClosed, ControlChannel, Method


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


@pytest.mark.parametrize(("num_seqs", "num_cols"), [(1, 1), (7, 3), (256, 64)])
def test_step_plan_round_trips_through_bytes(num_seqs: int, num_cols: int) -> None:
    plan = make_plan(num_seqs, num_cols)
    assert_plans_equal(plan, StepPlan.decode(plan.encode()))


@pytest.fixture
def channel_pair() -> tuple[ControlChannel, ControlChannel]:
    wakeups = [mp.get_context("spawn").Semaphore(0)]
    writer = ControlChannel.create(1 << 16, wakeups, world_size=2)
    reader = ControlChannel.attach(writer.name, wakeups, world_size=2)
    yield writer, reader
    reader.close()
    writer.close()


def test_messages_arrive_in_order_and_wait_for_the_reader(channel_pair: tuple[ControlChannel, ControlChannel]) -> None:
    writer, reader = channel_pair
    received: list[tuple[Method, bytes]] = []

    def read() -> None:
        for _ in range(50):
            received.append(reader.receive(1, parent_alive=lambda: True))

    thread = threading.Thread(target=read)
    thread.start()
    payloads = [os.urandom(i * 100) for i in range(49)]
    for payload in payloads:  # each send waits for the previous message's ack, so none is overwritten
        writer.send(Method.RUN, payload)
    writer.send(Method.SHUTDOWN)
    thread.join(timeout=10)
    assert received == [(Method.RUN, p) for p in payloads] + [(Method.SHUTDOWN, b"")]


def test_message_too_large_is_a_clear_error(channel_pair: tuple[ControlChannel, ControlChannel]) -> None:
    writer, _ = channel_pair
    with pytest.raises(ValueError, match="exceeds the 65536-byte channel"):
        writer.send(Method.RUN, bytes(1 << 16))


def test_reader_leaves_when_rank_0_is_gone(channel_pair: tuple[ControlChannel, ControlChannel]) -> None:
    _, reader = channel_pair
    with pytest.raises(ChannelClosed):
        reader.receive(1, parent_alive=lambda: False)


def test_send_stops_waiting_when_a_rank_died(channel_pair: tuple[ControlChannel, ControlChannel]) -> None:
    writer, _ = channel_pair
    writer.send(Method.RUN, b"x")  # never read: the next send waits for an ack that will not come

    def rank_died() -> None:
        raise RuntimeError("rank 1 died")

    with pytest.raises(RuntimeError, match="rank 1 died"):
        writer.send(Method.RUN, b"y", alive=rank_died)


def test_close_unlinks_the_segment() -> None:
    channel = ControlChannel.create(4096, [mp.get_context("spawn").Semaphore(0)], world_size=2)
    path = f"/dev/shm/{channel.name}"
    assert os.path.exists(path)
    channel.close()
    assert not os.path.exists(path)
