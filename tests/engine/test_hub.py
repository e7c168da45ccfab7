"""Model ids resolve through the Hugging Face cache, offline or with the hub out of reach; an id that cannot be
found is a ValueError saying where it was looked for. Nothing here touches the network."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import LLMEngine, SamplingParams
from engine.hub import TOKENIZER_FILES, resolve_model_dir
from tests.hub_cache import write_hub_cache

REPO_ID = "nanoserve-test/tiny-qwen3"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
ENGINE_KWARGS = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=32)


def unreachable_url() -> str:
    """A local URL nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty hub cache (what $HF_HOME/hub would be), offline, and a hub endpoint that refuses connections."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", unreachable_url())
    return cache


def token_ids(engine: LLMEngine) -> list[list[int]]:
    return [r["token_ids"] for r in engine.generate([[1, 2, 3], [7] * 20], GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_cached_model_id_serves_like_its_directory(
    offline: bool, hub_cache: Path, tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    checkpoint = tiny_checkpoint()
    snapshot = write_hub_cache(hub_cache, REPO_ID, checkpoint)
    engine = LLMEngine(REPO_ID, **ENGINE_KWARGS)
    assert engine.config.model == snapshot
    assert token_ids(engine) == token_ids(LLMEngine(checkpoint, **ENGINE_KWARGS))


def test_tokenizer_files_alone_resolve_for_the_router(hub_cache: Path, tiny_checkpoint: Callable[..., Path]) -> None:
    snapshot = write_hub_cache(hub_cache, REPO_ID, tiny_checkpoint(), patterns=TOKENIZER_FILES)
    assert resolve_model_dir(REPO_ID, TOKENIZER_FILES) == snapshot
    assert (snapshot / "tokenizer.json").is_file() and not list(snapshot.glob("*.safetensors"))


def test_snapshot_without_weights_is_named(hub_cache: Path, tiny_checkpoint: Callable[..., Path]) -> None:
    snapshot = write_hub_cache(hub_cache, REPO_ID, tiny_checkpoint(), patterns=TOKENIZER_FILES)
    with pytest.raises(ValueError, match=f"no \\*.safetensors files in {snapshot}"):
        LLMEngine(REPO_ID, **ENGINE_KWARGS)


def test_uncached_id_offline_says_where_it_looked(hub_cache: Path) -> None:
    with pytest.raises(ValueError) as error:
        LLMEngine("nanoserve-test/not-cached", device="cpu")
    message = str(error.value)
    assert message.startswith("model: 'nanoserve-test/not-cached' is not a local directory")
    assert f"not (completely) in the cache {hub_cache}" in message
    assert "HF_HUB_OFFLINE is set" in message


def test_uncached_id_with_the_hub_unreachable_names_the_hub(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match=f"in the cache {hub_cache}.* while the hub \\({constants.ENDPOINT}\\) is "
                       "unreachable"):
        resolve_model_dir("nanoserve-test/not-cached")


@pytest.mark.parametrize("model", ["/no/such/checkpoint", "a//b"])
def test_neither_a_directory_nor_a_model_id(model: str, hub_cache: Path) -> None:
    with pytest.raises(ValueError, match="is not a local directory .*, nor a Hugging Face model id"):
        resolve_model_dir(model)


@pytest.mark.parametrize("model", [7, ""])
def test_model_of_the_wrong_type_is_named(model: object) -> None:
    with pytest.raises(ValueError, match="model must be a checkpoint directory or a Hugging Face model id, got"):
        resolve_model_dir(model)  # type: ignore[arg-type]
