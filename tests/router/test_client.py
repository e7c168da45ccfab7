"""Tests for router/client.py against the in-process fake server: the kwargs-to-proto mapping, both
clients' calls and the API key (the command line: tests/router/test_client_cli.py)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from proto import nanoserve_pb2 as pb
from router.client import DEFAULT_TARGET, SAMPLING_FIELDS, AsyncClient, Client, build_request, choices_of
from tests.router.fake_server import CLUSTER_STATUS, MODEL_INFO, FakeServer, running_fake_server

REPO_ROOT = Path(__file__).resolve().parents[2]

# A value for every sampling field, falsy where the type allows: presence must not depend on truthiness.
SAMPLE_VALUES: dict[str, Any] = {
    "temperature": 0.0, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "max_tokens": 5, "min_tokens": 0,
    "stop": ["\n\n"], "stop_token_ids": [7, 8], "ignore_eos": False, "seed": 0, "logprobs": 0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": {5: -2.5},
    "allowed_token_ids": [5, 6], "structured_output": pb.StructuredOutput(json_object=True), "n": 1,
}
REPEATED_FIELDS = ("stop", "stop_token_ids", "logit_bias", "allowed_token_ids")  # presence: non-empty
# A mistyped value for every kind of sampling field, and the error that must name the field.
BAD_KWARGS: list[tuple[str, Any, type[Exception], str]] = [
    ("max_tokens", 1.5, TypeError, "max_tokens: expected an int, got 1.5 (float)"),
    ("top_k", "3", TypeError, "top_k: expected an int, got '3' (str)"),
    ("seed", True, TypeError, "seed: expected an int, got True (bool)"),
    ("seed", 2**64, ValueError, "seed: Value out of range: 18446744073709551616"),
    ("temperature", "hot", TypeError, "temperature: expected a number, got 'hot' (str)"),
    ("temperature", True, TypeError, "temperature: expected a number, got True (bool)"),
    ("ignore_eos", 1, TypeError, "ignore_eos: expected a bool, got 1 (int)"),
    ("ignore_eos", "yes", TypeError, "ignore_eos: expected a bool, got 'yes' (str)"),
    ("stop", [1], TypeError, "stop: expected a list of strs, got [1] (list)"),
    ("stop", 5, TypeError, "stop: expected a list of strs, got 5 (int)"),
    ("stop_token_ids", [1.5], TypeError, "stop_token_ids: expected a list of ints, got [1.5] (list)"),
    ("stop_token_ids", 7, TypeError, "stop_token_ids: expected a list of ints, got 7 (int)"),
    ("logit_bias", {"5": 1.0}, TypeError, "logit_bias: expected a dict of int -> number, got {'5': 1.0}"),
    ("logit_bias", {5: True}, TypeError, "logit_bias: expected a dict of int -> number, got {5: True}"),
    ("logit_bias", [(5, 1.0)], TypeError, "logit_bias: expected a dict of int -> number, got [(5, 1.0)]"),
    ("structured_output", {"regex": 5}, TypeError, "structured_output.regex: wrong type, got 5"),
    ("structured_output", {"choice": "yes"}, TypeError, "structured_output.choice: expected a list of strs, got 'yes'"),
    ("structured_output", "[a-z]+", TypeError, "structured_output: expected a dict of one of json_schema, json_object, "
     "regex, choice, grammar, got '[a-z]+'"),
]


def present_fields(params: pb.SamplingParams) -> set[str]:
    """Names of the optional scalar fields set on `params`."""
    return {name for name in SAMPLING_FIELDS - set(REPEATED_FIELDS) if params.HasField(name)}


# ---------------------------------------------------------------------------------------------
# build_request: the one mapping both clients use


def test_sample_values_cover_every_sampling_field() -> None:
    assert set(SAMPLE_VALUES) == SAMPLING_FIELDS


@pytest.mark.parametrize("name", sorted(set(SAMPLE_VALUES) - set(REPEATED_FIELDS)))
def test_each_scalar_kwarg_sets_only_its_own_presence(name: str) -> None:
    request = build_request("hi", None, {name: SAMPLE_VALUES[name]})
    assert present_fields(request.params) == {name}
    assert getattr(request.params, name) == SAMPLE_VALUES[name]


def test_no_sampling_kwargs_leaves_params_unset() -> None:
    request = build_request("hi", None, {})
    assert not request.HasField("params")
    assert request.request_id == ""


def test_none_kwargs_mean_engine_default() -> None:
    request = build_request("hi", None, {"temperature": None, "seed": 3})
    assert present_fields(request.params) == {"seed"}


def test_a_lone_stop_string_is_one_stop_string() -> None:
    assert list(build_request("hi", None, {"stop": "###"}).params.stop) == ["###"]


def field_kind(name: str) -> tuple[int, bool]:
    field = pb.SamplingParams.DESCRIPTOR.fields_by_name[name]
    return field.cpp_type, field.is_repeated


def test_bad_kwargs_cover_every_kind_of_sampling_field() -> None:
    assert {field_kind(name) for name, *_ in BAD_KWARGS} == {field_kind(name) for name in SAMPLING_FIELDS}


@pytest.mark.parametrize(("name", "value", "error", "message"), BAD_KWARGS,
                         ids=[f"{name}={value!r}" for name, value, *_ in BAD_KWARGS])
def test_a_mistyped_kwarg_is_an_error_naming_the_field(
    name: str, value: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        build_request("hi", None, {"temperature": 0.5, name: value})


def test_structured_output_as_a_dict_of_one_field() -> None:
    def spec(value: Any) -> pb.StructuredOutput:
        return build_request("hi", None, {"structured_output": value}).params.structured_output

    assert spec({"json_schema": {"type": "object"}}) == pb.StructuredOutput(json_schema='{"type": "object"}')
    assert spec({"json_schema": "{}"}).json_schema == "{}"
    assert list(spec({"choice": ["yes", "no"]}).choice.choices) == ["yes", "no"]
    assert spec({"regex": "[a-c]+"}).regex == "[a-c]+" and spec({"grammar": 'start: "a"'}).grammar == 'start: "a"'


def test_prompt_kinds_fill_the_matching_oneof() -> None:
    assert build_request("hi", "r1", {}).WhichOneof("prompt") == "text"
    assert list(build_request([5, 6], None, {}).token_ids.ids) == [5, 6]
    chat = build_request([{"role": "user", "content": "Hi"}], None, {}).chat.messages
    assert [(m.role, m.content) for m in chat] == [("user", "Hi")]


CHAT = [{"role": "user", "content": "Weather?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"days": {"maximum": 7}}}}}


def test_tools_and_tool_choice_fill_the_chat_fields() -> None:
    """OpenAI's tool, the function alone and a pb.Tool alike; tool_choice as a mode or OpenAI's named function."""
    tools = [WEATHER, {"name": "get_time", "strict": True}, pb.Tool(name="f")]
    chat = build_request(CHAT, None, {}, tools=tools, tool_choice="required").chat
    assert [(t.name, t.description, t.strict) for t in chat.tools] == [
        ("get_weather", "Weather in a city.", False), ("get_time", "", True), ("f", "", False)]
    assert chat.tools[0].parameters["properties"]["days"]["maximum"] == 7 and not chat.tools[1].HasField("parameters")
    assert chat.tool_choice == pb.ToolChoice(mode="required")
    named = build_request(CHAT, None, {}, tools=tools, tool_choice={"type": "function", "function": {"name": "f"}})
    assert named.chat.tool_choice == pb.ToolChoice(function_name="f")
    assert not build_request(CHAT, None, {}).chat.HasField("tool_choice")  # unset: the router's default


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(tools=WEATHER), TypeError, "tools: expected a list of tools"),
    (dict(tools=["get_weather"]), TypeError, "tools[0]: expected a dict"),
    (dict(tools=[{"type": "retrieval", "function": {"name": "x"}}]), ValueError, "tools[0].type: only 'function'"),
    (dict(tools=[WEATHER, {"description": "no name"}]), ValueError, "tools[1].name: missing"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]), TypeError,
     "tools[0].function.parameters: wrong type"),
    (dict(tools=[{"name": "f", "args": {}}]), ValueError, "tools[0].args: unknown"),
    (dict(tool_choice={"name": "f"}), TypeError, "tool_choice: expected"),
])
def test_bad_tools_are_errors_naming_the_argument(kwargs: dict[str, Any], error: type[Exception],
                                                  message: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}"):
        build_request(CHAT, None, {}, **kwargs)


def test_tools_go_with_chat_prompts_only() -> None:
    with pytest.raises(ValueError, match="^tools: only with a chat prompt"):
        build_request("hi", None, {}, tools=[WEATHER])
    with pytest.raises(ValueError, match="^tool_choice: only with a chat prompt"):
        build_request([1, 2], None, {}, tool_choice="none")


def test_unusable_prompts_fail_before_sending() -> None:
    with pytest.raises(ValueError, match="empty list"):
        build_request([], None, {})
    with pytest.raises(TypeError, match="prompt must be"):
        build_request([1, "two"], None, {})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Client (blocking)


def test_generate_streams_one_chunk_per_word_then_usage(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        chunks = list(client.generate("Hello big world", request_id="req-7"))
    assert [chunk.text for chunk in chunks] == ["Hello ", "big ", "world"]
    last = chunks[-1]
    assert (last.finish_reason, last.replica, last.request_id) == (pb.FINISH_REASON_STOP, "fake-0", "req-7")
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 3)
    assert fake.servicer.last_request is not None and fake.servicer.last_request.text == "Hello big world"


def test_sampling_kwargs_reach_the_server_with_presence_exactly_for_those_given(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        list(client.generate("a b c", temperature=0.0, seed=0, ignore_eos=False, stop=["x"]))
    request = fake.servicer.last_request
    assert request is not None
    assert present_fields(request.params) == {"temperature", "seed", "ignore_eos"}
    assert list(request.params.stop) == ["x"] and list(request.params.stop_token_ids) == []


def test_every_sampling_kwarg_at_once(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        client.complete("a", **SAMPLE_VALUES)
    request = fake.servicer.last_request
    assert request is not None
    assert request.params == pb.SamplingParams(**SAMPLE_VALUES)
    assert present_fields(request.params) == SAMPLING_FIELDS - set(REPEATED_FIELDS)


def test_unknown_kwarg_is_a_type_error_naming_it(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        with pytest.raises(TypeError, match="'topp'"):
            client.generate("hi", topp=0.5)
        with pytest.raises(TypeError, match="'max_new_tokens'"):
            client.complete("hi", max_new_tokens=5)
    assert fake.servicer.last_request is None


def test_max_tokens_cuts_the_stream_with_finish_length(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        chunks = list(client.generate("one two three four", max_tokens=2))
    assert "".join(chunk.text for chunk in chunks) == "one two "
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_token_ids_and_chat_prompts(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        ids_answer = client.complete([11, 12, 13])
        chat_answer = client.complete([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert (ids_answer.text, list(ids_answer.token_ids)) == ("<11><12><13>", [11, 12, 13])
    assert chat_answer.text == "system: Be brief.\nuser: Hi"
    request = fake.servicer.last_request
    assert request is not None and [m.role for m in request.chat.messages] == ["system", "user"]


def test_complete_joins_the_stream(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        answer = client.complete("Hello big world", max_tokens=2)
    assert (answer.text, list(answer.token_ids)) == ("Hello big ", [0, 1])
    assert answer.finish_reason == pb.FINISH_REASON_LENGTH
    assert (answer.replica, answer.usage.completion_tokens) == ("fake-0", 2)


def test_the_readme_python_example_streams_then_completes(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    example = re.search(r"From Python.*?```python\n(.*?)```", readme, re.DOTALL)
    assert example is not None, "README: no Python example after 'From Python'"
    exec(example.group(1).replace(DEFAULT_TARGET, fake.address), {})
    assert capsys.readouterr().out == "Hi\nHi (1 tokens)\n"  # the fake echoes the prompt


def test_n_choices_come_back_each_by_index(fake: FakeServer) -> None:
    """Complete's choices (choices_of gives a one-choice answer the same shape) and Generate's chunks by index."""
    with Client(fake.address) as client:
        answer = client.complete("a b", n=3)
        single = client.complete("a b")
        indexes = [chunk.index for chunk in client.generate("a b", n=2)]
    assert [(c.index, c.text, c.finish_reason) for c in choices_of(answer)] == [
        (i, "a b", pb.FINISH_REASON_STOP) for i in range(3)]
    assert not single.choices and [(c.index, c.text) for c in choices_of(single)] == [(0, "a b")]
    assert indexes == [0, 0, 1, 1]


def test_tool_calls_come_back_whole_and_streamed(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        answer = client.complete(CHAT, tools=[WEATHER], tool_choice="auto")
        streamed = [call.name for chunk in client.generate(CHAT, tools=[WEATHER]) for call in chunk.tool_calls]
    assert [(call.name, call.arguments) for call in answer.tool_calls] == [("get_weather", "{}")]
    assert streamed == ["get_weather"]
    request = fake.servicer.last_request
    assert request is not None and [t.name for t in request.chat.tools] == ["get_weather"]


def test_model_info_and_cluster_status(fake: FakeServer) -> None:
    with Client(fake.address) as client:
        assert client.model_info() == MODEL_INFO
        assert client.cluster_status() == CLUSTER_STATUS


def test_api_key_goes_as_bearer_authorization(fake: FakeServer) -> None:
    with Client(fake.address, api_key="s3cret") as client:
        client.model_info()
        assert fake.servicer.last_metadata["authorization"] == "Bearer s3cret"
        list(client.generate("hi"))
        assert fake.servicer.last_metadata["authorization"] == "Bearer s3cret"
    with Client(fake.address) as client:
        client.cluster_status()
    assert "authorization" not in fake.servicer.last_metadata


def test_server_errors_surface_as_rpc_errors(fake: FakeServer) -> None:
    fake.servicer.fail_with = (grpc.StatusCode.INVALID_ARGUMENT, "params.top_p must be in (0, 1], got 0")
    with Client(fake.address) as client, pytest.raises(grpc.RpcError) as raised:
        list(client.generate("hi", top_p=0.0))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.top_p" in raised.value.details()


def self_signed_certificate(tmp_path: Path) -> tuple[bytes, bytes]:
    """(private key, certificate) PEMs for 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return key.read_bytes(), cert.read_bytes()


def test_tls_root_cert_opens_a_secure_channel(tmp_path: Path) -> None:
    key, cert = self_signed_certificate(tmp_path)
    with running_fake_server(grpc.ssl_server_credentials([(key, cert)])) as fake:
        with Client(fake.address, tls_root_cert=cert) as client:
            assert client.complete("over tls").text == "over tls"
        with Client(fake.address) as client, pytest.raises(grpc.RpcError):
            client.model_info(timeout=5)  # plaintext to a TLS port fails


# ---------------------------------------------------------------------------------------------
# AsyncClient


def test_async_client_calls(fake: FakeServer) -> None:
    async def calls() -> tuple[list[pb.GenerateResponse], pb.CompleteResponse, pb.ModelInfo, pb.ClusterStatus]:
        async with AsyncClient(fake.address, api_key="k") as client:
            chunks = [chunk async for chunk in client.generate([3, 4], seed=1)]
            answer = await client.complete("x y", max_tokens=1)
            return chunks, answer, await client.model_info(), await client.cluster_status()

    chunks, answer, info, status = asyncio.run(calls())
    assert [chunk.text for chunk in chunks] == ["<3>", "<4>"] and chunks[-1].replica == "fake-0"
    assert (answer.text, answer.finish_reason) == ("x ", pb.FINISH_REASON_LENGTH)
    assert (info, status) == (MODEL_INFO, CLUSTER_STATUS)
    assert fake.servicer.last_metadata["authorization"] == "Bearer k"


def test_async_client_maps_kwargs_like_the_sync_one(fake: FakeServer) -> None:
    async def calls() -> pb.GenerateRequest | None:
        async with AsyncClient(fake.address) as client:
            with pytest.raises(TypeError, match="'topp'"):
                client.generate("hi", topp=0.5)
            [chunk async for chunk in client.generate("hi", temperature=0.0, stop="!")]
            return fake.servicer.last_request

    assert asyncio.run(calls()) == build_request("hi", None, {"temperature": 0.0, "stop": "!"})


def test_async_client_over_tls(tmp_path: Path) -> None:
    key, cert = self_signed_certificate(tmp_path)

    async def call(address: str) -> pb.ModelInfo:
        async with AsyncClient(address, tls_root_cert=cert) as client:
            return await client.model_info()

    with running_fake_server(grpc.ssl_server_credentials([(key, cert)])) as fake:
        assert asyncio.run(call(fake.address)) == MODEL_INFO


def test_client_module_never_imports_torch() -> None:
    code = "import sys, router.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
