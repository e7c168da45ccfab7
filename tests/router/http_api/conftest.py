"""The shared router of the HTTP API tests (one per test module): 2 replicas of the embedded tiny Qwen3 (Qwen's
full vocabulary, so text and chat prompts run) and its official `openai` client."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest

from engine.default_model import default_model_dir
from tests.serving import RouterThread


@pytest.fixture(scope="module")
def router(start_module_router: Callable[..., RouterThread]) -> RouterThread:
    return start_module_router(num_replicas=2, model=str(default_model_dir()), http_port=0, reasoning_parser="qwen3")


@pytest.fixture(scope="module")
def client(router: RouterThread) -> Iterator[openai.OpenAI]:
    # No retries: a 429 or 503 must reach the test as it was answered.
    with openai.OpenAI(base_url=f"http://127.0.0.1:{router.router.http_port}/v1", api_key="none", max_retries=0,
                       timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
