"""Engines sharing one GPU (issue 23), each in a process of its own as replicas are: each gets
gpu_memory_utilization of the GPU whoever else is on it, and one that starts while a dying process still holds
the memory waits for it and then gets as many KV blocks as the others. Skipped without a GPU; run on the device
machine (about half a minute on an H200)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[2]
UTILIZATION = 0.2
TIMEOUT_S = 120
# An engine as a replica runs it; prints its KV block count. Eager and 256-token blocks keep start-up short.
ENGINE = f"""
import logging, sys
from engine import LLMEngine
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
with LLMEngine(sys.argv[1], device="cuda", gpu_memory_utilization={UTILIZATION}, block_size=256, max_model_len=512,
               max_num_seqs=16, enforce_eager=True) as engine:
    print(engine.stats().num_kv_blocks_total, flush=True)
"""
# Another process holding all of the GPU's free memory but argv[1] bytes until it is killed, as a killed
# replica's memory stays taken until the driver reclaims it. What it leaves is room for an engine's CUDA
# context, weights and profiling step, not for its KV cache.
HOG = """
import sys, torch
free, _ = torch.cuda.mem_get_info()
held = torch.empty(free - int(sys.argv[1]), dtype=torch.uint8, device="cuda")
print("holding", flush=True)
sys.stdin.read()
"""
HOG_LEAVES_BYTES = 4 * 2**30


def start_engine(model_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", ENGINE, str(model_dir)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def num_blocks(engine: subprocess.Popen[str], stderr_so_far: str = "") -> tuple[int, str]:
    """The engine process's KV block count once it exits, and its whole log."""
    out, err = engine.communicate(timeout=TIMEOUT_S)
    log = stderr_so_far + err
    assert engine.returncode == 0, log[-4000:]
    return int(out.split()[-1]), log


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def blocks_side_by_side(model_dir: Path) -> list[int]:
    """The block counts of two engines started on the GPU at once."""
    engines = [start_engine(model_dir) for _ in range(2)]
    return [num_blocks(engine)[0] for engine in engines]


def test_engines_sharing_a_gpu_get_the_same_blocks(blocks_side_by_side: list[int]) -> None:
    first, second = blocks_side_by_side
    assert first == second > 0  # with memory in use counted against it, the later one got fewer


def test_an_engine_waits_for_memory_a_dying_process_holds(model_dir: Path, blocks_side_by_side: list[int]) -> None:
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(HOG_LEAVES_BYTES)], text=True, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "holding"
        engine = start_engine(model_dir)
        assert engine.stderr is not None
        log = ""
        while "waiting up to" not in log and engine.poll() is None:
            log += engine.stderr.readline()
        hog.kill()  # its memory comes back once the driver has torn its context down, as a killed replica's
        blocks, log = num_blocks(engine, log)
    finally:
        hog.kill()
        hog.communicate()
    assert log.count("waiting up to 60 s for") == 1, log[-4000:]
    assert blocks == blocks_side_by_side[0]
