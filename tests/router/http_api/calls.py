"""What the HTTP API tests send: a prompt as token ids, a chat, greedy settings, a raw POST for bodies the
`openai` client would not send, and the same request through gRPC (the answer HTTP's must equal)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from openai.types.chat import ChatCompletionMessageParam

from proto import nanoserve_pb2 as pb
from tests.serving import RouterThread

PROMPT = [9707, 11, 1246, 525, 498, 30]  # "Hello, how are you?"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
GREEDY: dict[str, Any] = dict(temperature=0.0, extra_body={"ignore_eos": True})


def post(router: RouterThread, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A raw POST: status and JSON answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{router.router.http_port}{path}", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def grpc_complete(router: RouterThread, prompt: Any, **params: Any) -> pb.CompleteResponse:
    with router.client() as grpc_client:
        return grpc_client.complete(prompt, timeout=120, **params)
