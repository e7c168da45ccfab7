"""Triton is imported only where one of its kernels can run, and a process that imported it exits cleanly.

Each check runs in a subprocess: the choice is made once, when `kernels.triton_compat` is first imported,
and nanobind's leak report comes at interpreter exit.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU makes Triton importable")


def run(args: list[str], interpret: str | None) -> subprocess.CompletedProcess[str]:
    """`python ARGS` from the repo root, with TRITON_INTERPRET set to `interpret` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@NO_GPU
def test_no_triton_import_where_no_kernel_can_run() -> None:
    proc = run(["-c", "import sys, engine.llm_engine; print([m for m in sys.modules if m.split('.')[0] == 'triton'])"],
               None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no Triton")
@NO_GPU
def test_triton_interpret_imports_triton() -> None:
    proc = run(["-c", "import sys, kernels.triton_compat as t; print(t.HAS_TRITON, 'triton.language' in sys.modules)"],
               "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


# LLMEngine's gc.freeze() once kept Triton's objects from the exit's collections: ~30 lines of nanobind leaks.
@pytest.mark.parametrize("interpret", [None, "1"], ids=["no-triton", "triton-interpreter"])
def test_engine_cli_exits_without_a_leak_report(interpret: str | None) -> None:
    # On the CPU: Triton's interpreter is for its kernels there, not for a GPU's engine (it fails on one).
    proc = run(["-m", "engine", "Hello", "--max-tokens", "2", "--no-progress", "--device", "cpu"], interpret)
    assert proc.returncode == 0, proc.stderr
    assert "nanobind" not in proc.stderr, proc.stderr[-2000:]
