"""Bad input against a real router: every request it cannot serve gets INVALID_ARGUMENT naming the field
(or RESOURCE_EXHAUSTED when too large), never INTERNAL/UNKNOWN or a hang, and others' requests go on."""

from __future__ import annotations

import math
import random
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc as pb_grpc
from router.client import Client
from router.validation import InvalidRequest
from tests.serving import VOCAB, RouterThread, greedy

MAX_MESSAGE_BYTES = 64 << 10
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
# What an INVALID_ARGUMENT's details may begin with: a field of the request (or the oneof, or the whole request).
FIELD_NAMES = {f.name for message in (pb.GenerateRequest, pb.ChatMessages, pb.ChatMessage, pb.TokenIds,
                                      pb.SamplingParams) for f in message.DESCRIPTOR.fields} | {"prompt", "request"}
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
VALID_PROMPT = [5, 6, 7]

INT64_EDGES = [0, 1, -1, 2, 20, 21, VOCAB - 1, VOCAB, 2**31, 2**63 - 1, -(2**63)]
FLOAT_EDGES = [0.0, -0.0, 1.0, 0.5, 5e-324, -1.0, 2.0, 1e308, math.nan, math.inf, -math.inf]


@pytest.fixture(scope="module")
def router(start_module_router: Callable[..., RouterThread]) -> RouterThread:
    return start_module_router(num_replicas=1, max_message_bytes=MAX_MESSAGE_BYTES)


@pytest.fixture(scope="module")
def client(router: RouterThread) -> Iterator[Client]:
    with router.client() as client:
        yield client


@pytest.fixture(scope="module")
def stub(router: RouterThread) -> Iterator[pb_grpc.NanoServeStub]:
    """The raw generated stub: it sends any GenerateRequest as it is, unchecked by Client."""
    with grpc.insecure_channel(router.address) as channel:
        yield pb_grpc.NanoServeStub(channel)


def assert_names_a_field(details: str) -> None:
    match = re.match(r"(?:params\.)?(\w+)", details)
    assert match is not None and match.group(1) in FIELD_NAMES, f"names no field: {details!r}"


def assert_serves_valid_requests(client: Client) -> None:
    assert client.complete(VALID_PROMPT, timeout=30, **greedy(2)).finish_reason == pb.FINISH_REASON_LENGTH


# ---------------------------------------------------------------------------------------------
# Well-formed messages, each with a few fields (often none) at edge values


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """The field unset (None) or set from `strategy`."""
    return st.none() | strategy


int64s = st.sampled_from(INT64_EDGES) | st.integers(-(2**63), 2**63 - 1)
wild_floats = st.sampled_from(FLOAT_EDGES) | st.floats()  # NaN, infinities and subnormals included
wild_ids = st.integers(0, VOCAB - 1) | int64s
roles = st.sampled_from(["system", "user", "assistant", "tool"])
huge_text = st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=4), st.integers(1_000, 40_000))


def chat(messages: list[pb.ChatMessage]) -> dict[str, pb.ChatMessages]:
    return {"chat": pb.ChatMessages(messages=messages)}


# Per field: values a client may send, then edge values (often invalid). A prompt is a GenerateRequest kwarg.
VALID: dict[str, st.SearchStrategy] = {
    "request_id": st.from_regex(r"[A-Za-z0-9_-]{0,20}", fullmatch=True),
    "prompt": st.one_of(
        st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                                             max_size=20)),
        st.builds(lambda text: {"text": text}, st.text(min_size=1, max_size=40)),
        st.builds(chat, st.lists(st.builds(pb.ChatMessage, role=roles, content=st.text(max_size=20)), min_size=1,
                                 max_size=3)),
    ),
    "temperature": maybe(st.floats(0, 2)),
    "top_p": maybe(st.floats(0, 1, exclude_min=True)),
    "top_k": maybe(st.just(-1) | st.integers(1, 2 * VOCAB)),
    "min_p": maybe(st.floats(0, 1)),
    "max_tokens": maybe(st.integers(1, 4)),  # small: valid requests run to it
    "min_tokens": maybe(st.integers(0, 1)),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=2),
    "ignore_eos": maybe(st.booleans()),
    "seed": maybe(st.integers(0, 2**63 - 1)),
    "logprobs": maybe(st.integers(0, 20)),
    "presence_penalty": maybe(st.floats(-2, 2)),
    "frequency_penalty": maybe(st.floats(-2, 2)),
    "repetition_penalty": maybe(st.floats(0.5, 2)),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=3),
    "allowed_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "structured_output": maybe(st.sampled_from([
        pb.StructuredOutput(regex="[a-c]{1,3}"), pb.StructuredOutput(choice=pb.Choices(choices=["yes", "no"])),
        pb.StructuredOutput(json_object=True), pb.StructuredOutput(json_schema='{"enum": [1, 2]}')])),
    "n": maybe(st.just(1)),
}
EDGES: dict[str, st.SearchStrategy] = {
    "request_id": st.sampled_from(["x" * 256, "x" * 257, "a\nb", "\x00", "\u00e9" * 256, "\u200b"]) | st.text(),
    "prompt": st.one_of(
        st.builds(lambda text: {"text": text}, st.text() | huge_text),  # "" and any unicode included
        st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)},
                  st.lists(wild_ids) | st.builds(lambda t, n: [t] * n, wild_ids, st.integers(500, 20_000))),
        st.builds(chat, st.lists(st.builds(pb.ChatMessage, role=roles | st.text(max_size=8), content=st.text()),
                                 max_size=4)),
        st.just({}),  # no prompt
    ),
    **{name: wild_floats for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                      "repetition_penalty")},
    **{name: int64s for name in ("top_k", "max_tokens", "min_tokens", "seed", "logprobs")},
    "stop": st.lists(st.text(max_size=4) | st.builds(lambda n: "s" * n, st.integers(100, 5_000)), max_size=5),
    "stop_token_ids": st.lists(wild_ids, max_size=5),
    "ignore_eos": st.booleans(),
    "logit_bias": st.dictionaries(wild_ids, wild_floats, max_size=4),
    "allowed_token_ids": st.lists(wild_ids, max_size=4),
    "structured_output": st.sampled_from([
        pb.StructuredOutput(), pb.StructuredOutput(regex="[a-"), pb.StructuredOutput(regex=""),
        pb.StructuredOutput(json_schema="{"), pb.StructuredOutput(json_schema="[]"),
        pb.StructuredOutput(json_schema='{"type": "strng"}'), pb.StructuredOutput(grammar="start: x"),
        pb.StructuredOutput(grammar="root ::= ["), pb.StructuredOutput(choice=pb.Choices()),
        pb.StructuredOutput(choice=pb.Choices(choices=[""])), pb.StructuredOutput(json_object=False)]),
    "n": int64s,
}
PARAM_FIELDS = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """A GenerateRequest in which up to 2 fields take edge values, the others valid values (or stay unset)."""
    wild = draw(st.sets(st.sampled_from(sorted(VALID)), max_size=2))
    value = {name: draw(EDGES[name] if name in wild else VALID[name]) for name in VALID}
    request = pb.GenerateRequest(request_id=value["request_id"], **value["prompt"])
    if draw(st.booleans()) or not wild.isdisjoint(PARAM_FIELDS):
        request.params.CopyFrom(pb.SamplingParams(**{name: value[name] for name in PARAM_FIELDS}))
    return request


def servable(router: RouterThread, request: pb.GenerateRequest) -> bool:
    """Whether the router must answer OK: its validator takes the request, and the prompt is in the tiny
    model's vocabulary (text is tokenized with Qwen's full tokenizer, whose ids go past it)."""
    core = router.router.core
    assert core is not None
    try:
        return max(core.validator.prepare(request).prompt_token_ids) < VOCAB
    except InvalidRequest:
        return False


@dataclass
class Traffic:
    """Valid greedy requests sent in a loop from another thread; all must succeed, all alike."""

    router: RouterThread
    answers: list[list[int]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with self.router.client() as client:
            while not self.stop.is_set():
                try:
                    self.answers.append(list(client.complete(VALID_PROMPT, timeout=30, **greedy(8)).token_ids))
                except grpc.RpcError as error:
                    self.errors.append(error)


@pytest.fixture
def traffic(router: RouterThread) -> Iterator[Traffic]:
    traffic = Traffic(router)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    yield traffic
    traffic.stop.set()
    thread.join(60)
    assert not thread.is_alive()
    assert not traffic.errors, traffic.errors[:3]
    assert len(traffic.answers) >= 3 and all(answer == traffic.answers[0] for answer in traffic.answers)


def test_fuzzed_requests_get_ok_or_invalid_argument_naming_the_field(
    router: RouterThread, stub: pb_grpc.NanoServeStub, traffic: Traffic
) -> None:
    @FUZZ
    @given(request=generate_requests())
    def check(request: pb.GenerateRequest) -> None:
        must_serve = servable(router, request)
        try:
            response, code, details = stub.Complete(request, timeout=30), grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            response, code, details = None, error.code(), error.details()
        if request.ByteSize() > MAX_MESSAGE_BYTES:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            return
        assert code in ANSWERS, f"{code.name}: {details}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert_names_a_field(details)
        if must_serve:
            assert code == grpc.StatusCode.OK, f"{code.name}: {details}"
        if response is not None:
            assert response.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            assert response.request_id == (request.request_id or response.request_id)
            if request.params.HasField("max_tokens"):
                assert len(response.token_ids) <= request.params.max_tokens

    check()


def test_stop_token_ids_past_the_vocabulary_are_invalid_argument(client: Client) -> None:
    """The engine bans stop ids by index until min_tokens: one past its vocabulary crashed the step."""
    with pytest.raises(grpc.RpcError) as info:
        client.complete(VALID_PROMPT, timeout=30, stop_token_ids=[7, VOCAB], min_tokens=1, **greedy(2))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"params.stop_token_ids[1]: {VOCAB} is outside the vocabulary")
    assert_serves_valid_requests(client)


# ---------------------------------------------------------------------------------------------
# Bytes that are not a GenerateRequest


def raw_call(channel: grpc.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    """Send `data` as the request bytes of NanoServe `method`; the call's status code and details."""
    path = f"/nanoserve.v1.NanoServe/{method}"
    try:
        if method == "Generate":
            list(channel.unary_stream(path, request_serializer=bytes, response_deserializer=bytes)(data, timeout=30))
        else:
            channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)(data, timeout=30)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def mutate(data: bytes, rng: random.Random) -> bytes:
    """`data` with a few bytes flipped, inserted or cut off."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(out) + 1)
        action = rng.choice(("flip", "insert", "truncate"))
        if action == "flip" and where < len(out):
            out[where] ^= 1 << rng.randrange(8)
        elif action == "insert":
            out[where:where] = bytes([rng.randrange(256)])
        else:
            del out[where:]
    return bytes(out)


VALID_BYTES = pb.GenerateRequest(request_id="r", token_ids=pb.TokenIds(ids=VALID_PROMPT),
                                 params=pb.SamplingParams(**greedy(2), stop=["zz"])).SerializeToString()
junk_requests = st.binary(max_size=64) | st.builds(lambda seed: mutate(VALID_BYTES, random.Random(seed)),
                                                   st.integers(0, 2**32))


def test_junk_request_bytes_get_ok_or_invalid_argument(router: RouterThread) -> None:
    with grpc.insecure_channel(router.address) as channel:
        @FUZZ
        @given(data=junk_requests, method=st.sampled_from(["Complete", "Generate"]))
        def check(data: bytes, method: str) -> None:
            code, details = raw_call(channel, method, data)
            assert code in ANSWERS, f"{code.name}: {details}"
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert_names_a_field(details)

        check()


# Hand-made wire bytes: (field number << 3 | 2) is a length-delimited field's tag.
BAD_UTF8 = b"\xff\xfe"
UNDECODABLE = {
    "corrupt wire format": b"\xff\xff\xff",
    "truncated": VALID_BYTES[:-1],
    "text with invalid UTF-8": b"\x12\x02" + BAD_UTF8,
    "request_id with invalid UTF-8": b"\x0a\x02" + BAD_UTF8,
    "chat role with invalid UTF-8": b"\x1a\x06\x0a\x04\x0a\x02" + BAD_UTF8,
    "stop string with invalid UTF-8": b"\x2a\x04\x3a\x02" + BAD_UTF8,
}


@pytest.mark.parametrize("data", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_undecodable_requests_are_invalid_argument(router: RouterThread, client: Client, data: bytes) -> None:
    with grpc.insecure_channel(router.address) as channel:
        for method in ("Complete", "Generate"):
            code, details = raw_call(channel, method, data)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {code.name}: {details}"
            assert details.startswith("request: not a valid GenerateRequest message"), details
        for method in ("GetModelInfo", "GetClusterStatus"):  # their empty messages keep other fields unread
            code, details = raw_call(channel, method, data)
            assert code in ANSWERS, f"{method}: {code.name}: {details}"
            assert code == grpc.StatusCode.OK or details.startswith("request: not a valid "), details
    assert_serves_valid_requests(client)


def test_corrupt_bytes_to_the_info_calls_are_invalid_argument(router: RouterThread) -> None:
    with grpc.insecure_channel(router.address) as channel:
        for method, name in [("GetModelInfo", "GetModelInfoRequest"), ("GetClusterStatus", "GetClusterStatusRequest")]:
            code, details = raw_call(channel, method, UNDECODABLE["corrupt wire format"])
            assert (code, details.split(" (")[0]) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                       f"request: not a valid {name} message")


def test_too_large_messages_are_resource_exhausted(router: RouterThread, client: Client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.complete("a" * (MAX_MESSAGE_BYTES + 1), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(router.address) as channel:
        for method in ("Complete", "Generate"):
            assert raw_call(channel, method, b"\x00" * (2 * MAX_MESSAGE_BYTES))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serves_valid_requests(client)


# ---------------------------------------------------------------------------------------------
# Junk on the TCP port


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TCP_JUNK = {
    "random bytes": random.Random(0).randbytes(4096),
    "truncated HTTP/2 preface": HTTP2_PREFACE[:10],
    "preface then junk frames": HTTP2_PREFACE + random.Random(1).randbytes(512),
    "HTTP/1.1 request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "zeros": bytes(100_000),
}


def send_junk(port: int, data: bytes) -> None:
    """Send `data` on a new TCP connection and read what comes back until the server closes it (or 2 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            sock.sendall(data)
            while sock.recv(4096):
                pass
        except OSError:  # reset, or the 2 s timeout: either way the server is left to carry on
            pass


def test_junk_on_the_port_leaves_the_server_serving(router: RouterThread, client: Client) -> None:
    assert router.router.port is not None
    idle = [socket.create_connection(("127.0.0.1", router.router.port)) for _ in range(3)]  # half-open, silent
    try:
        for data in TCP_JUNK.values():
            send_junk(router.router.port, data)
        idle[0].sendall(HTTP2_PREFACE[:10])
        assert_serves_valid_requests(client)
    finally:
        for sock in idle:
            sock.close()
    assert_serves_valid_requests(client)
