"""A tiny in-process NanoServe server for client tests: it echoes the prompt back and records each call.

Generate streams one chunk per prompt piece (a word of the text, or one token id shown as `<id>`), cut
at params.max_tokens; the last chunk carries finish_reason, usage and replica "fake-0", and for a chat prompt
with tools one call of each (arguments {}). With params.n > 1 each choice streams the same echo in turn, its
chunks carrying its index, and Complete answers with every choice. The server also runs the standard
grpc.health.v1 service (SERVING) and server reflection, as the real router does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NanoServe"].full_name
REPLICA = "fake-0"
MODEL_INFO = pb.ModelInfo(
    model_name="fake-model", model_dir="/nowhere/fake-model", random_weights=True, max_model_len=1024,
    vocab_size=1024, block_size=16, tensor_parallel_size=1, dtype="float32", eos_token_ids=[0], has_chat_template=True,
)
CLUSTER_STATUS = pb.ClusterStatus(
    replicas=[pb.ReplicaStatus(name=REPLICA, state=pb.REPLICA_STATE_SERVING, num_kv_blocks_total=64)],
    routing_policy="prefix",
)


def echo_pieces(request: pb.GenerateRequest) -> list[tuple[str, int]]:
    """What the fake "generates": (text, token id) pieces of the prompt, whose texts join back to it."""
    kind = request.WhichOneof("prompt")
    if kind == "token_ids":
        return [(f"<{token_id}>", token_id) for token_id in request.token_ids.ids]
    text = request.text if kind == "text" else "\n".join(f"{m.role}: {m.content}" for m in request.chat.messages)
    return [(word, i) for i, word in enumerate(re.findall(r"\s*\S+\s*", text))]


def echo_chunks(request: pb.GenerateRequest, index: int = 0) -> list[pb.GenerateResponse]:
    """Choice `index`'s Generate stream for `request`: one chunk per piece, up to max_tokens; usage and the calls
    on the last."""
    pieces = echo_pieces(request)
    max_tokens = request.params.max_tokens if request.params.HasField("max_tokens") else len(pieces)
    kept = pieces[:max_tokens]
    chunks = [pb.GenerateResponse(text=text, token_ids=[token_id], index=index) for text, token_id in kept]
    chunks = chunks or [pb.GenerateResponse(index=index)]  # an empty prompt still gets its closing chunk
    last = chunks[-1]
    last.tool_calls.extend(pb.ToolCall(id=f"call_{i}", name=tool.name, arguments="{}")
                           for i, tool in enumerate(request.chat.tools))
    last.finish_reason = pb.FINISH_REASON_LENGTH if len(kept) < len(pieces) else pb.FINISH_REASON_STOP
    last.usage.CopyFrom(pb.Usage(prompt_tokens=len(pieces), completion_tokens=len(kept)))
    last.replica = REPLICA
    last.request_id = request.request_id or "fake-request"
    return chunks


class FakeNanoServe(pb_grpc.NanoServeServicer):
    """Echo servicer that records the last request and its metadata, and can be told to fail."""

    def __init__(self) -> None:
        self.last_request: pb.GenerateRequest | None = None
        self.last_metadata: dict[str, str] = {}
        # When set, every call is aborted with this status code and details.
        self.fail_with: tuple[grpc.StatusCode, str] | None = None

    def _record(self, context: grpc.ServicerContext) -> None:
        """Remember the call's metadata, then fail it if told to."""
        self.last_metadata = dict(context.invocation_metadata())
        if self.fail_with is not None:
            context.abort(*self.fail_with)

    def _record_request(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> None:
        """Remember a generation request; reject it, as the router would, when it has no prompt."""
        self.last_request = request
        self._record(context)
        if request.WhichOneof("prompt") is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: one of text, chat, token_ids is required")

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self._record_request(request, context)
        for index in range(max(request.params.n, 1)):
            yield from echo_chunks(request, index)

    def Complete(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.CompleteResponse:
        self._record_request(request, context)
        n = max(request.params.n, 1)
        choices = [_joined(index, echo_chunks(request, index)) for index in range(n)]
        first, usage = choices[0], echo_chunks(request)[-1].usage
        return pb.CompleteResponse(
            text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason, usage=usage,
            replica=REPLICA, request_id=request.request_id or "fake-request", tool_calls=first.tool_calls,
            choices=choices if n > 1 else [],
        )

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        self._record(context)
        return MODEL_INFO

    def GetClusterStatus(self, request: pb.GetClusterStatusRequest, context: grpc.ServicerContext) -> pb.ClusterStatus:
        self._record(context)
        return CLUSTER_STATUS


def _joined(index: int, chunks: list[pb.GenerateResponse]) -> pb.CompleteChoice:
    """One choice's chunks, joined."""
    return pb.CompleteChoice(
        index=index, text="".join(chunk.text for chunk in chunks),
        token_ids=[i for chunk in chunks for i in chunk.token_ids], finish_reason=chunks[-1].finish_reason,
        replica=REPLICA, tool_calls=[call for chunk in chunks for call in chunk.tool_calls])


@dataclass(frozen=True)
class FakeServer:
    """A running fake: where to reach it, and its servicer (to read what it received)."""

    address: str
    servicer: FakeNanoServe


@contextmanager
def running_fake_server(tls: grpc.ServerCredentials | None = None) -> Iterator[FakeServer]:
    """Serve FakeNanoServe, health and reflection on 127.0.0.1 (a free port; TLS if given) until the block ends."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = FakeNanoServe()
    pb_grpc.add_NanoServeServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0") if tls is None else server.add_secure_port("127.0.0.1:0", tls)
    server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", servicer)
    finally:
        server.stop(grace=None).wait()
