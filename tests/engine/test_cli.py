"""`python -m engine`: help, the embedded random-weights default model, bad flags, --model and --chat."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import engine.__main__ as cli
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.hub_cache import write_hub_cache

REPO_ROOT = Path(__file__).resolve().parents[2]
RANDOM_WEIGHTS_LABEL = "RANDOM weights"


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m engine ARGS` from the repo root, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
        env=env,
    )


def test_help_lists_every_flag() -> None:
    flags = re.findall(r'add_argument\(\s*"(--[a-z-]+)"', inspect.getsource(cli))
    assert {"--model", "--chat", "--max-tokens", "--temperature", "--seed", "--stop", "--device"} <= set(flags)
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in flags:
        assert flag in proc.stdout, f"{flag} missing from --help"
    assert "RANDOM" in proc.stdout  # the description warns about the default model


def test_help_shows_each_default_once_and_the_engine_s_are_llm_engine_s() -> None:
    parser = cli.build_parser()
    options = re.sub(r"\s+", " ", parser.format_help()).partition(" options: ")[2]
    entries = {entry.split()[0].rstrip(","): entry for entry in re.split(r" (?=--[a-z])", options)}
    for flag in re.findall(r'add_argument\(\s*"(--[a-z-]+)"', inspect.getsource(cli)):
        default = parser.get_default(flag[2:].replace("-", "_"))
        assert entries[flag].count("default") <= 1, entries[flag]
        if default not in (None, False):
            assert f"(default {default}" in entries[flag], entries[flag]
    engine_parameters = inspect.signature(LLMEngine).parameters
    shared = {name for name in engine_parameters if parser.get_default(name) is not None} | {"model"}
    assert {"device", "dtype", "max_num_seqs", "gpu_memory_utilization", "enforce_eager"} <= shared
    for name in shared:
        assert parser.get_default(name) == engine_parameters[name].default, name


def test_default_model_generates_and_says_it_is_random() -> None:
    # The default model is built once per machine in the real cache (~5 s), then reused.
    proc = run_cli("Hello", "--max-tokens", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert RANDOM_WEIGHTS_LABEL in proc.stderr
    assert ">>> Hello" in proc.stdout
    assert re.search(r"\[\d+ tokens, finish: (length|stop)\]", proc.stdout), proc.stdout


def test_bad_flag_value_exits_nonzero_naming_the_field() -> None:
    proc = run_cli("Hello", "--temperature", "-1", "--no-progress")
    assert proc.returncode != 0
    assert "temperature" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--max-tokens", "0"], "max_tokens"),
        (["--top-p", "2"], "top_p"),
        (["--top-k", "0"], "top_k"),
        (["--stop", ""], "stop"),
        (["--dtype", "fp8"], "dtype"),
        (["--kv-cache-dtype", "int8"], "kv_cache_dtype"),
        (["--max-num-seqs", "0"], "max_num_seqs"),
    ],
)
def test_bad_values_return_2(
    tiny_checkpoint: Callable[..., Path], capsys: pytest.CaptureFixture[str], argv: list[str], field: str
) -> None:
    model = str(tiny_checkpoint("tied-gqa2-hd16", vocab_size=151936))
    assert cli.main(["Hello", "--model", model, "--device", "cpu", "--no-progress", *argv]) == 2
    assert field in capsys.readouterr().err


def test_unparsable_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["Hello", "--max-tokens", "many"])
    assert exit_info.value.code == 2
    assert "--max-tokens" in capsys.readouterr().err


def test_model_and_chat(
    tiny_checkpoint: Callable[..., Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = str(tiny_checkpoint("tied-gqa2-hd16", vocab_size=151936))
    prompts_seen: list[list[str]] = []
    generate = LLMEngine.generate

    def spy(self: LLMEngine, prompts: list[str], *args: object, **kwargs: object) -> object:
        prompts_seen.append(prompts)
        return generate(self, prompts, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LLMEngine, "generate", spy)
    argv = ["Hello", "Bye now", "--model", model, "--device", "cpu", "--max-model-len", "256", "--no-progress"]
    assert cli.main([*argv, "--chat", "--max-tokens", "3", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert RANDOM_WEIGHTS_LABEL not in err  # a real checkpoint dir was given
    assert prompts_seen[0][1].endswith("<|im_start|>user\nBye now<|im_end|>\n<|im_start|>assistant\n")
    assert ">>> Hello" in out and ">>> Bye now" in out  # the user's prompt, not the rendered template
    assert out.count("[3 tokens, finish: length]") == 2
    assert cli.main([*argv, "--max-tokens", "2", "--temperature", "0.8", "--seed", "3", "--stop", "zz"]) == 0
    assert prompts_seen[1] == ["Hello", "Bye now"]
    assert capsys.readouterr().out.count("finish: ") == 2


def test_model_id_from_the_hugging_face_cache(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("tied-gqa2-hd16", vocab_size=151936)
    write_hub_cache(tmp_path / "hf" / "hub", "nanoserve-test/tiny", checkpoint)
    # As a user sets them: HF_HOME locates the cache, HF_HUB_OFFLINE keeps the hub out of it.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    argv = ["Hello", "--device", "cpu", "--max-tokens", "3", "--ignore-eos", "--no-progress"]
    proc = run_cli(*argv, "--model", "nanoserve-test/tiny", env=env)
    assert proc.returncode == 0, proc.stderr
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    expected = LLMEngine(checkpoint, device="cpu", num_kv_blocks=8).generate("Hello", params, use_tqdm=False)
    assert isinstance(expected, dict)
    assert f">>> Hello\n{expected['text']}\n[3 tokens, finish: length]" in proc.stdout
    proc = run_cli(*argv, "--model", "nanoserve-test/not-cached", env=env)
    assert proc.returncode == 2
    assert f"in the cache {tmp_path / 'hf' / 'hub'}" in proc.stderr and "HF_HUB_OFFLINE is set" in proc.stderr
    assert "Traceback" not in proc.stderr
