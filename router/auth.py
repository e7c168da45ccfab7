"""API keys: every RPC but the open ones (health, reflection), and every /v1 HTTP request, must carry
`authorization: Bearer <key>`."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger(__name__)

BEARER = "Bearer "

# A refusal runs as the refused method's own kind of handler (so the call ends the way the client expects).
_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class ApiKeys:
    """The configured keys, and why a presented `authorization` value is refused (shared by gRPC and HTTP)."""

    def __init__(self, api_keys: Iterable[str]) -> None:
        # Comparing SHA-256 digests keeps every comparison the same length, so not even a key's length leaks.
        self._key_digests = [_digest(key) for key in api_keys]
        assert self._key_digests, "ApiKeys needs at least one key"

    def problem(self, authorization: str | None) -> str | None:
        """Why this authorization value is refused, or None when it holds a configured key."""
        if authorization is None:
            return "missing API key: send 'authorization: Bearer <key>'"
        if not authorization.startswith(BEARER):
            return "invalid authorization: expected 'Bearer <key>'"
        presented = _digest(authorization.removeprefix(BEARER))
        matched = False
        for digest in self._key_digests:  # every key, no early exit: the time taken says nothing of which matched
            matched |= hmac.compare_digest(digest, presented)
        return None if matched else "invalid API key"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a configured API key with UNAUTHENTICATED; calls to `open_services` pass freely."""

    def __init__(self, api_keys: ApiKeys, open_services: Collection[str], on_refused: Callable[[], None]) -> None:
        self._api_keys = api_keys
        self._open_services = frozenset(open_services)
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or _service_of(details.method) in self._open_services:
            return handler
        problem = self._api_keys.problem(_authorization(details.invocation_metadata))
        if problem is None:
            return handler
        log.info("refused %s: %s", details.method, problem)
        self._on_refused()
        return _refusal(handler, problem)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _service_of(method: str) -> str:
    """`/pkg.Service/Method` -> `pkg.Service`."""
    return method.lstrip("/").split("/", 1)[0]


def _authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED, parsing nothing."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)](refuse)
