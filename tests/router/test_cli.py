"""`python -m router` as users run it: a subprocess with its own local Ray, serving the embedded model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import LLMEngine, SamplingParams
from engine.default_model import default_model_dir
from router.client import Client

ROOT = Path(__file__).resolve().parents[2]


def test_help_explains_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "router", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for flag in ("--replicas", "--model", "--tensor-parallel-size", "--policy", "--host", "--port",
                 "--ray-address", "--metrics-port", "RANDOM weights", "prefix", "least-load", "round-robin",
                 "--max-stream-buffer-tokens", "--stalled-stream-timeout", "--prefix-imbalance-ratio",
                 "--prefix-imbalance-slack-tokens"):
        assert flag in out


@pytest.mark.parametrize("flag, value, error", [
    ("--replicas", "0", "num_replicas must be a positive integer"),
    ("--prefix-imbalance-ratio", "0.9", "prefix_imbalance_ratio must be >= 1"),
    ("--prefix-imbalance-slack-tokens", "-1", "prefix_imbalance_slack_tokens must be an integer >= 0"),
    ("--max-stream-buffer-tokens", "0", "max_stream_buffer_tokens must be a positive integer"),
])
def test_bad_flag_is_a_clear_error(flag: str, value: str, error: str) -> None:
    result = subprocess.run([sys.executable, "-m", "router", flag, value], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert error in result.stderr


@pytest.mark.slow
def test_serves_the_offline_engines_output_and_drains_on_sigterm(tmp_path: Path) -> None:
    model = default_model_dir()  # built once and cached, as the router's replicas will find it
    prompt, params = "Hello, how are you?", dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = LLMEngine(model, device="cpu", max_model_len=512).generate(prompt, SamplingParams(**params),
                                                                             use_tqdm=False)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    router = subprocess.Popen(
        [sys.executable, "-m", "router", "--replicas", "2", "--port", "0", "--metrics-port", "-1",
         "--device", "cpu", "--max-model-len", "512"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # Ray's processes get their own group: the SIGTERM below reaches the router only
    )
    try:
        assert router.stdout is not None
        line = router.stdout.readline()
        assert "listening on" in line, router.stderr.read() if router.poll() is not None else line
        address = "127.0.0.1:" + line.rsplit(":", 1)[1].strip()
        with Client(address) as client:
            chunks = list(client.generate(prompt, timeout=60, **params))
            assert "".join(c.text for c in chunks) == expected["text"]  # type: ignore[index]
            assert [t for c in chunks for t in c.token_ids] == expected["token_ids"]  # type: ignore[index]
            stream = client.generate(prompt, timeout=60, temperature=0.0, max_tokens=200, ignore_eos=True)
            next(stream)
            router.send_signal(signal.SIGTERM)  # the stream in flight still finishes
            time.sleep(0.5)
            assert len([t for c in stream for t in c.token_ids]) + 1 >= 200
        assert router.wait(timeout=60) == 0
    finally:
        if router.poll() is None:
            router.kill()
