"""The soak's CI variant (bench/soak.py runs 20,000 requests by hand): short requests through 2 replicas,
zero failures, no request state left (I3), and memory flat within a budget (I4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_passes() -> None:
    result = subprocess.run(
        [sys.executable, "bench/soak.py", "--requests", "1500", "--warmup", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "1500 requests" in result.stdout and ", 0 failed" in result.stdout
