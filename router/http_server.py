"""The OpenAI-compatible HTTP API (aiohttp, on the router's event loop): POST /v1/completions and
/v1/chat/completions (whole, or server-sent events with "stream": true), GET /v1/models, GET /health.

Below the protocol it calls the ServingCore the gRPC service calls, so routing, failover, backpressure,
cancellation and metrics are the same. Errors are OpenAI's error JSON with the HTTP status of the router's
status code (400 bad input, 401 bad key, 404 unknown model, 429 overload, 503 no replica or draining).
"""

from __future__ import annotations

import json
import logging
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from router.auth import ApiKeys
from router.config import RouterConfig
from router.core import ServingCore
from router.errors import RequestFailed
from router.inflight import InFlightRequest
from router.openai_requests import Endpoint, InvalidBody, invalid_body, read_request
from router.openai_responses import Answer

log = logging.getLogger(__name__)

# The router's status codes as HTTP statuses, with OpenAI's error type for each.
HTTP_ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
SERVER_ERROR = (500, "server_error")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpFrontDoor:
    def __init__(self, core: ServingCore, config: RouterConfig, api_keys: ApiKeys | None) -> None:
        self.core, self.config, self.api_keys = core, config, api_keys
        self.created = int(time.time())
        # Names a request may give as `model`: the served name, and --model as given (as vLLM serves it).
        self.model_names = {core.model_name} | ({config.model} if config.model else set())
        app = web.Application(middlewares=[self._errors_as_json], client_max_size=config.max_message_bytes)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=config.drain_timeout_s)

    async def start(self) -> int:
        """Listen on the configured host and HTTP port (HTTPS with the gRPC port's certificate, when it has one);
        return the port (0 picks a free one)."""
        cfg = self.config
        assert cfg.http_port is not None
        tls = _ssl_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert is not None and cfg.tls_key is not None else None
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.http_port, ssl_context=tls)
        await site.start()
        return site.port

    async def stop(self) -> None:
        """Stop listening, give requests in flight the drain timeout to finish, then cancel the rest."""
        await self._runner.cleanup()

    # --- endpoints ---

    async def health(self, request: web.Request) -> web.Response:
        """200 while a replica serves and the router is not draining, else 503 (for load balancers; no key)."""
        serving = bool(self.core.pool.serving()) and not self.core.draining
        return web.json_response({"status": "serving" if serving else "not serving"}, status=200 if serving else 503)

    async def models(self, request: web.Request) -> web.Response:
        info = self.core.info
        model = {"id": self.core.model_name, "object": "model", "created": self.created, "owned_by": "nanoserve",
                 "max_model_len": info.max_model_len, "random_weights": info.random_weights,
                 "sampling_defaults": info.sampling_defaults}
        return web.json_response({"object": "list", "data": [model]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    # --- one generation, whole or streamed ---

    async def _generate(self, http_request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        try:
            api = read_request(endpoint, await _json(http_request))
        except InvalidBody:
            self.core.count(grpc.StatusCode.INVALID_ARGUMENT)
            raise
        if api.model is not None and api.model not in self.model_names:
            raise self.core.refuse(grpc.StatusCode.NOT_FOUND, f"{json.dumps(api.model)} is not served here; "
                                   f"this router serves {json.dumps(self.core.model_name)} (GET /v1/models)", "model")
        try:
            inflight = await self.core.start(api.generate, api.max_tokens_to_context_end)
        except RequestFailed as e:
            if e.field is not None:  # already counted: only renamed to the body's field
                raise invalid_body(endpoint, e.field, e.message, api.structured_output_param) from None
            raise
        answer = Answer(api, self.core.model_name, self.core.tokenizer)
        try:
            if api.stream:
                return await self._stream(http_request, answer, inflight)
            chunks = [chunk async for chunk in self.core.chunks(inflight)]
            return web.json_response(answer.whole(chunks))
        finally:  # also when the client disconnected (the handler is cancelled): then the request is aborted
            self.core.release(inflight)

    async def _stream(self, http_request: web.Request, answer: Answer, inflight: InFlightRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http_request)
        for opening in answer.openings():
            await _send(response, opening)
        try:
            async for chunk in self.core.chunks(inflight):
                event = answer.event(chunk)
                if event is not None:
                    await _send(response, event)
                if chunk.HasField("usage") and answer.api.include_usage:
                    await _send(response, answer.usage_event(chunk.usage))
        except RequestFailed as e:  # the status line went out with the first event: the error is an event too
            await _send(response, _error_body(e.code, str(e), e.field))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # --- errors and keys ---

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/"):
                self._check_key(request)
            return await handler(request)
        except InvalidBody as e:
            return _error_response(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.param)
        except RequestFailed as e:
            return _error_response(e.code, str(e), e.field)
        except web.HTTPException as e:  # aiohttp's own: unknown path, wrong method, body too large
            if e.status < 400:
                raise
            error = {"message": f"{request.method} {request.path}: {e.reason}", "type": "invalid_request_error",
                     "param": None, "code": None}
            return web.json_response({"error": error}, status=e.status)

    def _check_key(self, request: web.Request) -> None:
        if self.api_keys is None:
            return
        problem = self.api_keys.problem(request.headers.get("Authorization"))
        if problem is not None:
            raise self.core.refuse(grpc.StatusCode.UNAUTHENTICATED, problem)


def _ssl_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as folder:  # ssl loads PEM from files only; the folder is private (0700)
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        context.load_cert_chain(cert_file, key_file)
    return context


async def _json(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidBody(None, f"the request body is not valid JSON ({e})") from None


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")


def _error_body(code: grpc.StatusCode, message: str, param: str | None = None) -> dict[str, Any]:
    _, kind = HTTP_ERRORS.get(code, SERVER_ERROR)
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error_response(code: grpc.StatusCode, message: str, param: str | None) -> web.Response:
    status, _ = HTTP_ERRORS.get(code, SERVER_ERROR)
    return web.json_response(_error_body(code, message, param), status=status)
