"""Tests for proto/: the generated modules match nanoserve.proto, and the messages mean what it says."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import get_args

import pytest
from google.protobuf import text_format
from google.protobuf.descriptor_pb2 import DescriptorProto, FileDescriptorProto, FileDescriptorSet

from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc as pb_grpc
from proto.generate import PROTO_FILE, REPO_ROOT, run_protoc

SERVICE = pb.DESCRIPTOR.services_by_name["NanoServe"]


def compile_descriptor(proto_file: Path, tmp_path: Path) -> FileDescriptorProto:
    """What protoc makes of `proto_file` now (no source info, as in generated code)."""
    out = tmp_path / "descriptor_set.pb"
    run_protoc([f"--descriptor_set_out={out}"], proto_file)
    (file,) = FileDescriptorSet.FromString(out.read_bytes()).file
    strip_default_json_names(file.message_type)
    return file


def strip_default_json_names(messages: Iterable[DescriptorProto]) -> None:
    """Drop json_name where it is the default: descriptor sets spell it out, generated code does not."""
    for message in messages:
        for field in message.field:
            if field.json_name == default_json_name(field.name):
                field.ClearField("json_name")
        strip_default_json_names(message.nested_type)


def default_json_name(name: str) -> str:
    """protoc's rule: drop each underscore and capitalise the letter after it."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def embedded_descriptor() -> FileDescriptorProto:
    """The descriptor baked into the generated nanoserve_pb2 module."""
    return FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)


def descriptor_diff(expected: FileDescriptorProto, actual: FileDescriptorProto) -> str:
    """A unified diff of two descriptors in text format; empty when they are equal."""
    lines = difflib.unified_diff(
        text_format.MessageToString(expected).splitlines(),
        text_format.MessageToString(actual).splitlines(),
        "nanoserve.proto", "nanoserve_pb2.py", lineterm="",
    )
    return "\n".join(lines)


def test_generated_module_matches_proto(tmp_path: Path) -> None:
    diff = descriptor_diff(compile_descriptor(REPO_ROOT / PROTO_FILE, tmp_path), embedded_descriptor())
    assert diff == "", f"generated modules are stale; run `python -m proto.generate`:\n{diff}"


def test_in_sync_check_catches_an_edited_proto(tmp_path: Path) -> None:
    source = (REPO_ROOT / PROTO_FILE).read_text()
    with_new_field = source.replace("  string content = 2;\n", "  string content = 2;\n  string name = 99;\n", 1)
    assert with_new_field != source
    edited = tmp_path / PROTO_FILE
    edited.parent.mkdir()
    edited.write_text(with_new_field)
    diff = descriptor_diff(compile_descriptor(edited, tmp_path), embedded_descriptor())
    assert '-    name: "name"' in diff  # the field the .proto has and the generated module lacks


class RecordingChannel:
    """Stands in for grpc.Channel: records which method paths the stub registers, and how."""

    def __init__(self) -> None:
        self.methods: dict[str, str] = {}

    def unary_unary(self, path: str, **_: object) -> None:
        self.methods[path] = "unary_unary"

    def unary_stream(self, path: str, **_: object) -> None:
        self.methods[path] = "unary_stream"


def test_stub_and_servicer_expose_exactly_the_service_methods() -> None:
    channel = RecordingChannel()
    pb_grpc.NanoServeStub(channel)
    servicer_methods = {name for name in vars(pb_grpc.NanoServeServicer) if not name.startswith("_")}
    assert channel.methods == {
        "/nanoserve.v1.NanoServe/Generate": "unary_stream",
        "/nanoserve.v1.NanoServe/Complete": "unary_unary",
        "/nanoserve.v1.NanoServe/GetModelInfo": "unary_unary",
        "/nanoserve.v1.NanoServe/GetClusterStatus": "unary_unary",
    }
    assert servicer_methods == {method.name for method in SERVICE.methods}


def test_sampling_params_mirror_the_engine_field_by_field() -> None:
    proto_fields = pb.SamplingParams.DESCRIPTOR.fields
    assert [f.name for f in proto_fields] == list(SamplingParams.__dataclass_fields__)
    scalars = [f.name for f in proto_fields if not f.is_repeated]
    assert all(pb.SamplingParams.DESCRIPTOR.fields_by_name[name].has_presence for name in scalars)


def test_finish_reasons_mirror_the_engine() -> None:
    names = {name.removeprefix("FINISH_REASON_").lower() for name in pb.FinishReason.DESCRIPTOR.values_by_name}
    assert names == {"unspecified", *get_args(FinishReason)}
    assert pb.FinishReason.Value("FINISH_REASON_UNSPECIFIED") == 0


@pytest.mark.parametrize(
    "prompt",
    [
        {"text": "Hello, how are you?"},
        {"chat": pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="Be brief."),
                                           pb.ChatMessage(role="user", content="Hi")])},
        # Out-of-vocabulary ids arrive intact, so the router can name them in its error.
        {"token_ids": pb.TokenIds(ids=[0, 151935, -1, 2**40])},
    ],
    ids=["text", "chat", "token_ids"],
)
def test_generate_request_round_trips_every_prompt_kind(prompt: dict) -> None:
    request = pb.GenerateRequest(request_id="r1", params=pb.SamplingParams(max_tokens=8, stop=["\n"]), **prompt)
    decoded = pb.GenerateRequest.FromString(request.SerializeToString())
    (kind,) = prompt
    assert decoded == request
    assert decoded.WhichOneof("prompt") == kind
    assert getattr(decoded, kind) == prompt[kind]


def test_prompt_kinds_are_exclusive() -> None:
    request = pb.GenerateRequest(text="Hello")
    request.token_ids.ids.append(1)
    assert request.WhichOneof("prompt") == "token_ids"
    assert not request.HasField("text")


def test_unset_sampling_fields_differ_from_explicit_zeros() -> None:
    zeros = pb.SamplingParams(temperature=0.0, min_p=0.0, min_tokens=0, ignore_eos=False, seed=0, logprobs=0)
    decoded = pb.SamplingParams.FromString(zeros.SerializeToString())
    unset = pb.SamplingParams.FromString(pb.SamplingParams().SerializeToString())
    for name in ("temperature", "min_p", "min_tokens", "ignore_eos", "seed", "logprobs"):
        assert decoded.HasField(name), name
        assert not unset.HasField(name), name
    assert not decoded.HasField("top_p")
    assert decoded.temperature == 0.0 and unset.temperature == 0.0  # the value alone cannot tell them apart
