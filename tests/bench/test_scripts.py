"""The benchmark scripts run by hand on GPUs; CI checks they still start: every script answers --help, and
the CPU-only scheduler benchmark runs a few steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=BENCH.parent, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(script: str) -> None:
    done = run(f"bench/{script}", "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_scheduler_bench_runs_on_cpu() -> None:
    done = run("bench/scheduler_bench.py", "--num-seqs", "16", "--steps", "20", "--prompt-len", "64")
    assert done.returncode == 0 and "per step, wall" in done.stdout, done.stderr
