"""In the batch-invariant mode a request's tokens and logprobs are bitwise the same however the engine runs it:
alone, in batches, chunked under any step budget, with prefix hits, preempted, eagerly or through CUDA graphs,
and resumed from prompt + k of its tokens as a failover does (bf16 on a GPU, with the model's KV cache and with
an FP8 one; tests/engine/batch_invariance_runs.py runs each mode in a process of its own). Without the mode the
same runs differ: the negative control."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.batch_invariance_runs import NEW_TOKENS, RESUME_AT

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="batch invariance on a GPU needs a CUDA GPU")


def runs(model: Path, tmp_path: Path, batch_invariant: bool, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    out = tmp_path / f"runs-{batch_invariant}.json"
    argv = [sys.executable, "-m", "tests.engine.batch_invariance_runs", "--model", str(model), "--out", str(out),
            "--kv-cache-dtype", kv_cache_dtype]
    subprocess.run(argv + (["--batch-invariant"] if batch_invariant else []), cwd=ROOT, check=True, timeout=600)
    return json.loads(out.read_text())


def differences(result: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Per run, how many (seeded, greedy) requests' tokens or logprobs differ from the same request run alone
    (batch_invariance_runs.py: even requests are seeded, odd ones greedy)."""
    alone = result["alone"]
    count: dict[str, tuple[int, int]] = {}
    for name, outputs in result.items():
        if name in ("alone", "num_preemptions", "skinny_matmul"):
            continue
        k = int(name.rsplit(" ", 1)[1]) if name.startswith("resumed after") else 0
        differ = [out["token_ids"] != ref["token_ids"][k:] or out["logprobs"] != ref["logprobs"][k:]
                  for out, ref in zip(outputs, alone)]
        count[name] = (sum(differ[0::2]), sum(differ[1::2]))
    return count


@pytest.fixture(scope="module")
def qwen3_0_6b() -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    from common import random_qwen3_0_6b

    return random_qwen3_0_6b()


@pytest.mark.parametrize(("model", "kv_cache_dtype"), [("qwen3-0.6b", "auto"), ("qwen3-0.6b", "fp8"), ("tiny", "auto")])
def test_every_way_of_running_a_request_gives_its_tokens_bitwise(
    model: str, kv_cache_dtype: str, qwen3_0_6b: Path, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = qwen3_0_6b if model == "qwen3-0.6b" else tiny_checkpoint("tied-gqa2-hd16",
                                                                                     max_position_embeddings=4096)
    invariant = runs(model_dir, tmp_path, batch_invariant=True, kv_cache_dtype=kv_cache_dtype)
    print("requests differing from their run alone, batch-invariant mode:", differences(invariant),  # for -rP
          "skinny matmul for decode's few-row steps:", invariant["skinny_matmul"])
    assert all(len(out["token_ids"]) == NEW_TOKENS for out in invariant["alone"])
    assert invariant["num_preemptions"] > 0 and len(RESUME_AT) == 3
    assert differences(invariant) == dict.fromkeys(differences(invariant), (0, 0))
    if model == "qwen3-0.6b":  # the negative control: the same runs without the mode
        without = differences(runs(model_dir, tmp_path, batch_invariant=False, kv_cache_dtype=kv_cache_dtype))
        print("without the mode:", without)
        assert sum(seeded + greedy for seeded, greedy in without.values()) > 0
