"""`python -m router` as users run it: a subprocess with its own local Ray, serving the embedded model or a
model id from the Hugging Face cache."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from engine import LLMEngine, SamplingParams
from engine.default_model import default_model_dir
from router.__main__ import build_parser, parse_args
from router.client import Client
from tests.hub_cache import write_hub_cache

ROOT = Path(__file__).resolve().parents[2]


def test_help_explains_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "router", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for flag in ("--replicas", "--model", "--tensor-parallel-size", "--policy", "--host", "--port", "--http-port",
                 "--ray-address", "--metrics-port", "RANDOM weights", "prefix", "least-load", "round-robin",
                 "--max-stream-buffer-tokens", "--stalled-stream-timeout", "--prefix-imbalance-ratio",
                 "--prefix-imbalance-slack-tokens"):
        assert flag in out


def test_help_shows_each_default_once() -> None:
    """Before: "(default: the model's) (default: None)" and the like."""
    text = re.sub(r"\s+", " ", build_parser().format_help())
    blocks = re.split(r" (?=--[a-z])", text.split("options:", 1)[1])
    assert "(default: None)" not in text
    for block in blocks:
        assert block.lower().count("default") <= 1, block


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


def test_a_port_in_use_is_a_clear_error_before_any_replica_starts() -> None:
    """Not a bind error's traceback (what it was): the flag, the port and what to do, and exit status 2."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "router", "--port", "0", "--metrics-port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"--metrics-port {port}: cannot listen on it" in result.stderr and "Traceback" not in result.stderr
    assert "Ray" not in result.stderr  # it failed before starting Ray and the replicas


def test_http_port_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--http-port", "8000"]).http_port == 8000
    assert parse_args([]).http_port is None  # off unless asked for
    with pytest.raises(SystemExit):
        parse_args(["--http-port", "70000"])
    assert "http_port must be in [0, 65535], got 70000" in capsys.readouterr().err


@pytest.mark.slow
def test_serves_the_offline_engines_output_and_drains_on_sigterm(tmp_path: Path) -> None:
    """gRPC and, with --http-port, the OpenAI-compatible HTTP API; streams in flight on both finish after SIGTERM."""
    model = default_model_dir()  # built once and cached, as the router's replicas will find it
    prompt, params = "Hello, how are you?", dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = LLMEngine(model, device="cpu", max_model_len=512).generate(prompt, SamplingParams(**params),
                                                                             use_tqdm=False)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    router = subprocess.Popen(
        [sys.executable, "-m", "router", "--replicas", "2", "--port", "0", "--http-port", "0", "--metrics-port", "-1",
         "--device", "cpu", "--max-model-len", "512"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # Ray's processes get their own group: the SIGTERM below reaches the router only
    )
    try:
        assert router.stdout is not None
        line = router.stdout.readline()
        assert "listening on" in line, router.stderr.read() if router.poll() is not None else line
        address = "127.0.0.1:" + line.rsplit(":", 1)[1].strip()
        http_line = router.stdout.readline()
        assert "OpenAI-compatible HTTP API on http://" in http_line
        http_port = http_line.rsplit(":", 1)[1].removesuffix("/v1\n")
        with Client(address) as client, openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none",
                                                      max_retries=0) as http:
            chunks = list(client.generate(prompt, timeout=60, **params))
            assert "".join(c.text for c in chunks) == expected["text"]  # type: ignore[index]
            assert [t for c in chunks for t in c.token_ids] == expected["token_ids"]  # type: ignore[index]
            [listed] = http.models.list().data
            model_id = listed.id
            assert model_id == "tiny-random-qwen3" and (listed.model_extra or {})["random_weights"] is True
            assert client.model_info(timeout=30).model_name == model_id  # a plain id, which requests may name
            answer = http.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0,
                                             extra_body={"ignore_eos": True})
            assert answer.choices[0].text == expected["text"]  # type: ignore[index]
            stream = client.generate(prompt, timeout=60, temperature=0.0, max_tokens=200, ignore_eos=True)
            next(stream)
            http_stream = http.completions.create(model=model_id, prompt=prompt, max_tokens=200, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
            next(iter(http_stream))
            router.send_signal(signal.SIGTERM)  # the streams in flight still finish
            time.sleep(0.5)
            assert len([t for c in stream for t in c.token_ids]) + 1 >= 200
            *_, last = http_stream
            assert last.usage is not None and last.usage.completion_tokens == 200
        assert router.wait(timeout=60) == 0
    finally:
        if router.poll() is None:
            router.kill()


@pytest.mark.slow
def test_serves_a_qwen2_model_id_from_the_hugging_face_cache(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """The router (tokenizer) and its replica (weights) both find the id through HF_HOME, offline."""
    checkpoint = tiny_checkpoint("qwen2.5-tied-gqa4", vocab_size=151936)
    write_hub_cache(tmp_path / "hf" / "hub", "nanoserve-test/tiny-qwen2.5", checkpoint)
    prompt, params = "Hello, how are you?", dict(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = LLMEngine(checkpoint, device="cpu", max_model_len=256).generate(prompt, SamplingParams(**params),
                                                                               use_tqdm=False)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0")
    argv = [sys.executable, "-m", "router", "--replicas", "1", "--port", "0", "--metrics-port", "-1",
            "--device", "cpu", "--max-model-len", "256"]
    missing = subprocess.run([*argv, "--model", "nanoserve-test/not-cached"], cwd=ROOT, capture_output=True,
                             text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "HF_HUB_OFFLINE is set" in missing.stderr, missing.stderr
    router = subprocess.Popen([*argv, "--model", "nanoserve-test/tiny-qwen2.5"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        assert router.stdout is not None
        line = router.stdout.readline()
        assert "listening on" in line, router.stderr.read() if router.poll() is not None else line
        with Client("127.0.0.1:" + line.rsplit(":", 1)[1].strip()) as client:
            assert client.model_info(timeout=30).model_name == "nanoserve-test/tiny-qwen2.5"
            chunks = list(client.generate(prompt, timeout=60, **params))
        assert [t for c in chunks for t in c.token_ids] == expected["token_ids"]  # type: ignore[index]
        router.send_signal(signal.SIGTERM)
        assert router.wait(timeout=60) == 0
    finally:
        if router.poll() is None:
            router.kill()


def test_kv_cache_dtype_flag_reaches_the_replicas_engines() -> None:
    assert parse_args(["--kv-cache-dtype", "fp8"]).engine_kwargs["kv_cache_dtype"] == "fp8"
    assert parse_args([]).engine_kwargs["kv_cache_dtype"] == "auto"
