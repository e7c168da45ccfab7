"""RequestValidator: chat prompts the model cannot render are INVALID_ARGUMENT (InvalidRequest), naming the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.validation import InvalidRequest, RequestValidator
from worker.messages import EngineInfo

INFO = EngineInfo(
    model_dir="/nowhere", random_weights=True, max_model_len=1024, vocab_size=151936, block_size=16,
    tensor_parallel_size=1, dtype="float32", kv_cache_dtype="float32", eos_token_ids=[151645], num_kv_blocks=64,
    sampling_defaults={},
)


def chat_request(*roles: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role=r, content="hi") for r in roles]))


def validator(qwen_tokenizer_dir: Path, chat_template: str | None) -> RequestValidator:
    hf = HFTokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    return RequestValidator(Tokenizer(hf, frozenset({151645}), chat_template=chat_template), INFO)


def test_chat_for_a_model_without_chat_template(qwen_tokenizer_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match="chat.messages: the model has no chat template"):
        validator(qwen_tokenizer_dir, None).prepare(chat_request("user"))


def test_chat_the_template_refuses(qwen_tokenizer_dir: Path) -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}{% endif %}x"
    refusing = validator(qwen_tokenizer_dir, template)
    assert refusing.prepare(chat_request("user")).prompt_token_ids == [87]  # "x"
    with pytest.raises(InvalidRequest, match="chat.messages: start with a user turn"):
        refusing.prepare(chat_request("assistant"))


def test_chat_messages_are_still_checked(qwen_tokenizer_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"chat.messages\[0\].role: unknown role 'wizard'"):
        validator(qwen_tokenizer_dir, "x").prepare(chat_request("wizard"))


def token_request(num_tokens: int, **params: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * num_tokens), params=pb.SamplingParams(**params))


def test_max_tokens_must_fit_the_context_with_the_prompt(qwen_tokenizer_dir: Path) -> None:
    check = validator(qwen_tokenizer_dir, None)
    assert check.prepare(token_request(1000, max_tokens=24)).params.max_tokens == 24  # exactly fills it
    with pytest.raises(InvalidRequest, match=r"^params.max_tokens: 25 exceeds the 24 tokens left after the "
                                             r"1000-token prompt \(max_model_len=1024 is prompt \+ output\)$"):
        check.prepare(token_request(1000, max_tokens=25))
    with pytest.raises(InvalidRequest, match="params.max_tokens: 1000000000 exceeds"):
        check.prepare(token_request(3, max_tokens=10**9))
    with pytest.raises(InvalidRequest, match="params.max_tokens: 16 exceeds the 14"):  # the default counts too
        check.prepare(token_request(1010))


def test_to_the_context_end_fills_an_unset_max_tokens_only(qwen_tokenizer_dir: Path) -> None:
    check = validator(qwen_tokenizer_dir, None)
    assert check.prepare(token_request(1000), max_tokens_to_context_end=True).params.max_tokens == 24
    assert check.prepare(token_request(1000, max_tokens=5), max_tokens_to_context_end=True).params.max_tokens == 5
    with pytest.raises(InvalidRequest, match="params.min_tokens: must be in"):
        check.prepare(token_request(1000, min_tokens=30), max_tokens_to_context_end=True)


@pytest.mark.parametrize(("request_", "field", "message"), [
    (token_request(3, top_k=0), "params.top_k", "must be -1 (off) or >= 1, got 0"),
    (token_request(1000, max_tokens=25), "params.max_tokens", "25 exceeds the 24 tokens left after the 1000-token "
     "prompt (max_model_len=1024 is prompt + output)"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 151936])), "token_ids.ids[1]",
     "151936 is outside the vocabulary [0, 151936)"),
    (chat_request("wizard"), "chat.messages[0].role", "unknown role 'wizard'"),
    (token_request(3, n=0), "params.n", "must be in [1, 128], got 0"),
], ids=["params", "max_tokens", "token_ids", "chat", "n"])
def test_the_field_travels_as_a_field(qwen_tokenizer_dir: Path, request_: pb.GenerateRequest, field: str,
                                      message: str) -> None:
    """The HTTP front door names the body's field from `field`, without reading the message (issue 21)."""
    with pytest.raises(InvalidRequest) as invalid:
        validator(qwen_tokenizer_dir, "x").prepare(request_)
    assert (invalid.value.field, invalid.value.message) == (field, message)
    assert isinstance(invalid.value, ValueError) and str(invalid.value) == f"{field}: {message}"


def test_n_choices_pass_through_the_servers(qwen_tokenizer_dir: Path) -> None:
    """n > 1 reaches the replicas (the engine bounds it); n < 1 is refused above, naming params.n."""
    assert validator(qwen_tokenizer_dir, None).prepare(token_request(3, n=3)).params.n == 3


def test_unset_sampling_fields_take_the_replicas_defaults(qwen_tokenizer_dir: Path) -> None:
    hf = HFTokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    info = dataclasses.replace(INFO, sampling_defaults={"temperature": 0.6, "top_k": 20})
    check = RequestValidator(Tokenizer(hf, frozenset({151645})), info)
    params = check.prepare(token_request(3, top_p=0.5)).params
    assert (params.temperature, params.top_k, params.top_p) == (0.6, 20, 0.5)
    assert check.prepare(token_request(3, top_k=-1)).params.top_k == -1  # a field the request sets wins


THINKING_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                     "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")


def test_template_kwargs_reach_the_chat_template_and_reasoning_splits_chat_only(qwen_tokenizer_dir: Path) -> None:
    hf = HFTokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    check = RequestValidator(Tokenizer(hf, frozenset({151645}), chat_template=THINKING_TEMPLATE), INFO, "qwen3")
    request = chat_request("user")
    thinking = check.prepare(request)
    request.chat.template_kwargs.update({"enable_thinking": False})
    not_thinking = check.prepare(request)
    assert not_thinking.prompt_token_ids == thinking.prompt_token_ids + [151667, 151668]  # <think></think>
    assert thinking.split_reasoning and not check.prepare(token_request(3)).split_reasoning
    request.chat.template_kwargs.update({"messages": []})
    with pytest.raises(InvalidRequest, match="^chat.template_kwargs.messages: set by the server, not by a request$"):
        check.prepare(request)
    assert not RequestValidator(check.tokenizer, INFO).prepare(chat_request("user")).split_reasoning


def so_request(**kind: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), params=pb.SamplingParams(
        structured_output=pb.StructuredOutput(**kind)))


@pytest.mark.parametrize(("kind", "expected"), [
    (dict(json_schema='{"type": "object"}'), {"json_schema": '{"type": "object"}'}),
    (dict(json_object=True), {"json_object": True}),
    (dict(regex="[a-c]{3}"), {"regex": "[a-c]{3}"}),
    (dict(choice=pb.Choices(choices=["yes", "no"])), {"choice": ["yes", "no"]}),
    (dict(grammar='start: "a"'), {"grammar": 'start: "a"'}),
])
def test_structured_output_reaches_the_params(qwen_tokenizer_dir: Path, kind: dict, expected: dict) -> None:
    params = validator(qwen_tokenizer_dir, None).prepare(so_request(**kind)).params
    assert params.structured_output is not None and params.structured_output.as_dict() == expected


@pytest.mark.parametrize(("kind", "field", "message"), [
    ({}, "params.structured_output", "set exactly one of"),
    (dict(json_schema="{not json"), "params.structured_output.json_schema", "is not valid JSON"),
    (dict(json_schema='{"type": "object", "properties": {"a": {"type": "strng"}}}'),
     "params.structured_output.json_schema", "Invalid type: strng"),
    (dict(regex="[a-"), "params.structured_output.regex", "at 1(8): invalid regex"),
    (dict(choice=pb.Choices()), "params.structured_output.choice", "must be a non-empty list"),
    (dict(choice=pb.Choices(choices=["a", ""])), "params.structured_output.choice[1]", "must be a non-empty string"),
    (dict(grammar="start: item"), "params.structured_output.grammar", "at 1(8): unknown name"),
])
def test_a_bad_structured_output_is_named_before_any_replica_sees_it(
    qwen_tokenizer_dir: Path, kind: dict, field: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as invalid:
        validator(qwen_tokenizer_dir, None).prepare(so_request(**kind))
    assert invalid.value.field == field and invalid.value.message.startswith(message), invalid.value


def test_a_tool_choice_that_holds_the_calls_becomes_the_structured_output(qwen_tokenizer_dir: Path) -> None:
    check = validator(qwen_tokenizer_dir, "{{ messages[0]['content'] }}")
    request = chat_request("user")
    request.chat.tools.add(name="f")
    request.chat.tool_choice.mode = "required"
    prepared = check.prepare(request)
    assert prepared.parse_tool_calls and prepared.params.structured_output is not None
    assert prepared.params.structured_output.grammar.startswith('start: call ("\\n" call)*')
    request.params.structured_output.regex = "x"
    with pytest.raises(InvalidRequest, match='^chat.tool_choice: "required", a named function or strict tools'):
        check.prepare(request)
    request.params.ClearField("structured_output")
    request.params.min_tokens = 2
    with pytest.raises(InvalidRequest, match="^params.min_tokens: must be 0 with structured_output"):
        check.prepare(request)
