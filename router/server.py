"""The router process: Ray, the replica pool, the gRPC server (with health and reflection), the optional
OpenAI-compatible HTTP API, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from engine.hub import TOKENIZER_FILES, resolve_model_dir
from engine.qwen_tokenizer import cached_qwen_tokenizer_dir
from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.auth import ApiKeyInterceptor, ApiKeys
from router.config import RouterConfig
from router.core import ServingCore
from router.http_server import HttpFrontDoor
from router.metrics import RouterMetrics
from router.policies import make_policy
from router.ray_placement import start_ray
from router.replica_pool import ReplicaPool
from router.service import NanoServeService
from router.tasks import TaskSet
from router.validation import request_parser

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NanoServe"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
OPEN_SERVICES = (HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)  # no API key needed: load balancers and probes


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        policy = make_policy(config.policy, config.prefix_imbalance_ratio, config.prefix_imbalance_slack_tokens)
        self.pool = ReplicaPool(config, policy, self.metrics)
        self.health = health_aio.HealthServicer()
        self.api_keys = ApiKeys(config.api_keys) if config.api_keys else None
        self.core: ServingCore | None = None
        self.server: grpc.aio.Server | None = None
        self.http: HttpFrontDoor | None = None
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self.tasks = TaskSet()  # the stalled-stream watch, health status updates

    async def start(self) -> None:
        cfg = self.config
        # First: a model that cannot be found, or a metrics port in use, fails here, before replicas start loading.
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model)
        if cfg.metrics_port is not None:
            with _listening("--metrics-port", cfg.metrics_port):
                self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.host)
        start_ray(cfg.ray_address, cfg.namespace)
        info = await self.pool.start()
        model_name = model_display_name(cfg.model)
        self.core = ServingCore(self.pool, tokenizer, info, model_name, cfg.reasoning_parser)
        self.tasks.spawn(self.core.end_stalled_streams(), "stalled-streams")
        self.server = grpc.aio.server(interceptors=self._interceptors(), options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ])
        handlers = nanoserve_handlers(NanoServeService(self.core))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.server.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, *OPEN_SERVICES), self.server)
        with _listening("--port", cfg.port):
            self.port = self._add_port(self.server)
        self.pool.on_serving_changed = self._on_serving_changed
        await self.server.start()
        if cfg.http_port is not None:
            self.http = HttpFrontDoor(self.core, cfg, self.api_keys)
            with _listening("--http-port", cfg.http_port):
                self.http_port = await self.http.start()
        await self._set_health(bool(self.pool.serving()))
        log.info("serving %s%s on %s:%d (%s, %s) with %d replicas (policy %s)%s%s", model_name,
                 " (RANDOM weights: gibberish text)" if info.random_weights else "", cfg.host, self.port,
                 "TLS" if cfg.tls_cert else "plaintext", "API keys required" if cfg.api_keys else "no API keys",
                 cfg.num_replicas, cfg.policy,
                 f"; OpenAI-compatible HTTP API on :{self.http_port}/v1" if self.http_port is not None else "",
                 f"; metrics on :{self.metrics_port}/metrics" if self.metrics_port is not None else "")

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.api_keys is None:
            return []
        refused = self.metrics.requests.labels(grpc.StatusCode.UNAUTHENTICATED.name)
        return [ApiKeyInterceptor(self.api_keys, OPEN_SERVICES, on_refused=refused.inc)]

    def _add_port(self, server: grpc.aio.Server) -> int:
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is None or cfg.tls_key is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, grpc.ssl_server_credentials([(cfg.tls_key, cfg.tls_cert)]))

    def _on_serving_changed(self, serving: bool) -> None:
        self.tasks.spawn(self._set_health(serving), "health-status")

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, kill_replicas: bool = True) -> None:
        """Stop accepting (health NOT_SERVING at once), let in-flight streams finish within the drain
        timeout, then stop the replicas."""
        if self.core is not None:
            self.core.draining = True
        await self._set_health(False)
        log.info("draining: waiting up to %.0f s for in-flight streams", self.config.drain_timeout_s)
        front_doors = [self.server.stop(self.config.drain_timeout_s)] if self.server is not None else []
        if self.http is not None:
            front_doors.append(self.http.stop())
        await asyncio.gather(*front_doors)
        await self.tasks.close()
        await self.pool.close(kill_replicas)
        self.metrics.close()
        log.info("router stopped")


def load_tokenizer(model: str | None) -> Tokenizer:
    """The tokenizer of `model` (a checkpoint directory or a Hugging Face model id, whose tokenizer files
    alone are fetched), or of the embedded tiny model when None."""
    return Tokenizer.from_dir(resolve_model_dir(model, TOKENIZER_FILES) if model else cached_qwen_tokenizer_dir())


EMBEDDED_MODEL_NAME = "tiny-random-qwen3"  # the model id clients see without --model; its weights are random


def model_display_name(model: str | None) -> str:
    """The model id clients see and may send: a checkpoint directory's name, the Hugging Face model id as
    given, or EMBEDDED_MODEL_NAME (a plain name; GetModelInfo and /v1/models say the weights are random)."""
    if model is None:
        return EMBEDDED_MODEL_NAME
    return Path(model).name if Path(model).expanduser().is_dir() else model


def nanoserve_handlers(service: NanoServeService) -> dict[str, grpc.RpcMethodHandler]:
    """NanoServe's method handlers, as `add_NanoServeServicer_to_server` makes them but with `request_parser`:
    request bytes that do not parse get INVALID_ARGUMENT, where grpc's own parsing answers UNKNOWN."""
    return {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=request_parser(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "Complete": grpc.unary_unary_rpc_method_handler(
            service.Complete, request_deserializer=request_parser(pb.GenerateRequest),
            response_serializer=pb.CompleteResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, request_deserializer=request_parser(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
        "GetClusterStatus": grpc.unary_unary_rpc_method_handler(
            service.GetClusterStatus, request_deserializer=request_parser(pb.GetClusterStatusRequest),
            response_serializer=pb.ClusterStatus.SerializeToString),
    }


@contextlib.contextmanager
def _listening(flag: str, port: int) -> Iterator[None]:
    """A port the router cannot listen on (in use, or not allowed) is a ValueError naming its flag: the command line
    prints it and exits, instead of a bind error's traceback."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # RuntimeError: gRPC's "Failed to bind"
        raise ValueError(f"{flag} {port}: cannot listen on it ({e}); choose another port, or 0 for a free one") \
            from None
