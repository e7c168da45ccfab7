"""Rank processes and shared memory never outlive the engine: close, exceptions, signals, a killed rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import LLMEngine, SamplingParams
from engine.tp.group import RankDiedError
from tests.dev_shm import leaked_since, shm_names

ROOT = Path(__file__).resolve().parents[3]


def tp_segments() -> set[str]:
    """The TP names in /dev/shm: control channels (nanoserve-tp-*) and their doorbells (sem.nanoserve-tp-*)."""
    return {name for name in os.listdir("/dev/shm") if "nanoserve-tp-" in name}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; it is gone for our purposes once it has exited.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def rank_pids(engine: LLMEngine) -> list[int]:
    assert engine.ranks is not None
    return [p.pid for p in engine.ranks.processes if p.pid is not None]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("tied-gqa2-hd16")


def tp2(model_dir: Path) -> LLMEngine:
    return LLMEngine(model_dir, device="cpu", dtype="float32", tensor_parallel_size=2, max_model_len=1024)


def test_start_and_close_five_times_leaks_nothing(model_dir: Path) -> None:
    segments_before = tp_segments()
    pids: list[int] = []
    for i in range(5):
        engine = tp2(model_dir)
        pids += rank_pids(engine)
        assert len(engine.generate([1, 2, 3], max_tokens=4, use_tqdm=False)["token_ids"]) == 4
        if i % 2:
            engine.close()
        else:
            del engine  # garbage collection closes it too
    assert not any(pid_alive(pid) for pid in pids)
    assert tp_segments() == segments_before


def test_exception_inside_with_block_stops_the_ranks(model_dir: Path) -> None:
    segments_before = tp_segments()
    with pytest.raises(KeyError), tp2(model_dir) as engine:
        pids = rank_pids(engine)
        raise KeyError("boom")
    assert not any(pid_alive(pid) for pid in pids)
    assert tp_segments() == segments_before


def kill_rank_mid_generation(engine: LLMEngine) -> int:
    """SIGKILL rank 1 while 8 requests generate; assert the step fails with RankDiedError naming it within 5 s
    and the engine stays failed (no hang). Returns the killed pid."""
    [pid] = rank_pids(engine)
    for i in range(8):
        engine.add_request(list(range(1, 200)), SamplingParams(max_tokens=800, ignore_eos=True), f"r{i}")
    for _ in range(3):
        engine.step()
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    threading.Timer(0.2, kill).start()
    with pytest.raises(RankDiedError, match=f"rank 1 \\(pid {pid}\\)"):
        while engine.has_unfinished():
            engine.step()
    assert time.monotonic() - killed_at[0] < 5.0
    with pytest.raises(RankDiedError):  # the engine stays failed, it does not hang
        engine.step()
    return pid


def test_killed_rank_raises_within_five_seconds_naming_it(model_dir: Path) -> None:
    segments_before = tp_segments()
    pid = kill_rank_mid_generation(tp2(model_dir))
    assert not pid_alive(pid)
    assert tp_segments() == segments_before


EXIT_SCRIPT = """
import sys
from engine import LLMEngine
engine = LLMEngine(sys.argv[1], device="cpu", dtype="float32", tensor_parallel_size=2)
print(*[p.pid for p in engine.ranks.processes], flush=True)
engine.generate([1, 2, 3], max_tokens=4, use_tqdm=False)
"""  # and ends without close()


def test_a_script_that_never_closes_its_engine_exits_cleanly(model_dir: Path) -> None:
    segments_before = tp_segments()
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(model_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "terminate" not in done.stderr, done.stderr
    assert not any(pid_alive(int(pid)) for pid in done.stdout.split())
    assert tp_segments() == segments_before


SIGNAL_SCRIPT = """
import os, sys, time
from engine import LLMEngine, SamplingParams
engine = LLMEngine(sys.argv[1], device="cpu", dtype="float32", tensor_parallel_size=2)
print(*[p.pid for p in engine.ranks.processes], flush=True)
engine.add_request(list(range(1, 100)), SamplingParams(max_tokens=900, ignore_eos=True))  # max_model_len 1024
print("stepping", flush=True)
parent, deadline = os.getppid(), time.monotonic() + 120
while os.getppid() == parent and time.monotonic() < deadline:  # never outlive a killed test run
    engine.step()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(model_dir: Path, sig: signal.Signals) -> None:
    segments_before = tp_segments()
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_SCRIPT, str(model_dir)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert proc.stdout.readline().strip() == "stepping"
    time.sleep(0.5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0  # interrupted, but through Python's own exit path
    assert "Traceback" not in stderr or ("KeyboardInterrupt" in stderr or "SystemExit" in stderr), stderr
    assert not any(pid_alive(pid) for pid in pids)
    assert tp_segments() == segments_before


def test_nothing_named_in_dev_shm_survives_a_sigkill_of_every_process(model_dir: Path) -> None:
    """Ray kills a dead worker together with its children (ranks and resource tracker), so no cleanup code
    runs: every name the engine created (its channel's, its semaphores') must already be gone while it serves."""
    names_before = shm_names()
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_SCRIPT, str(model_dir)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert proc.stdout.readline().strip() == "stepping"
    assert not [name for name in tp_segments() if f"nanoserve-tp-{proc.pid}-" in name]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(pid) for pid in pids)
    assert not leaked_since(names_before)


def exit_at_start(*args: object) -> None:
    """A rank entry point that dies before joining the group (spawn pickles it by name: module level)."""
    os._exit(3)


def test_a_rank_that_dies_at_start_fails_the_engine_at_once(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    segments_before = tp_segments()
    monkeypatch.setattr("engine.llm_engine.run_rank", exit_at_start)
    start = time.monotonic()
    with pytest.raises(RankDiedError, match=r"rank 1 \(pid \d+\) died with exit code 3 before joining"):
        tp2(model_dir)
    assert time.monotonic() - start < 20  # not the 120 s rendezvous timeout
    assert tp_segments() == segments_before
