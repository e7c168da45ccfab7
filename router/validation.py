"""A client's GenerateRequest, checked field by field and turned into what a replica runs.

Every problem is an InvalidRequest naming the field (the service answers INVALID_ARGUMENT), so a
bad request never reaches a replica.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from engine.block_hash import hash_blocks
from engine.grammar_text import check_grammar
from engine.sampling_params import InvalidRequest, SamplingParams, max_tokens_error
from engine.structured_output import StructuredOutput
from engine.tokenizer import Tokenizer
from proto import nanoserve_pb2 as pb
from router.chat_prompt import ChatPrompt, read_chat
from router.reasoning_grammar import ThinkTags
from router.tool_grammar import CallTags
from worker.messages import EngineInfo

MAX_REQUEST_ID_LEN = 256
M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """Request bytes that are not a valid `message_name` message (bad wire format, or invalid UTF-8 in a string)."""

    message_name: str
    reason: str

    def error(self) -> InvalidRequest:
        return InvalidRequest("request", f"not a valid {self.message_name} message ({self.reason})")


def request_parser(message_type: type[M]) -> Callable[[bytes], M | UndecodableRequest]:
    """A request deserializer for the server. grpc answers a deserializer's exception with UNKNOWN; this one
    returns bad bytes as an UndecodableRequest instead, which the service refuses with INVALID_ARGUMENT."""
    name = message_type.DESCRIPTOR.name

    def parse(data: bytes) -> M | UndecodableRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return UndecodableRequest(name, str(e).rpartition(": ")[2] or "corrupt wire format")

    return parse


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # always with a seed: a failed-over request resumes the same random stream
    prompt_hashes: list[int]  # block-hash chain of the prompt's full blocks, as the replicas' prefix caches hash it
    split_reasoning: bool = False  # a chat answer whose reasoning goes apart from its text (router/reasoning.py)
    parse_tool_calls: bool = False  # a chat answer whose tool calls go apart from its text (router/tool_calls.py)


class RequestValidator:
    def __init__(self, tokenizer: Tokenizer, info: EngineInfo, reasoning_parser: str | None = None) -> None:
        """`reasoning_parser`: one of router/reasoning.py's REASONING_PARSERS, for chat prompts; None: none."""
        self.tokenizer, self.info, self.reasoning_parser = tokenizer, info, reasoning_parser
        self.call_tags = CallTags.of(tokenizer)
        self.think_tags = ThinkTags.of(tokenizer) if reasoning_parser is not None else None

    def prepare(
        self, request: pb.GenerateRequest | UndecodableRequest, max_tokens_to_context_end: bool = False
    ) -> PreparedRequest:
        """The request, checked. `max_tokens_to_context_end`: an unset max_tokens means all the context has left
        after the prompt (OpenAI's chat default) instead of SamplingParams' default."""
        if isinstance(request, UndecodableRequest):
            raise request.error()
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_LEN or not request_id.isprintable():
            raise InvalidRequest("request_id", f"at most {MAX_REQUEST_ID_LEN} printable characters")
        params = self._params(request.params)
        token_ids, chat, thinking = self._prompt(request)
        if chat is not None and chat.tool_grammar is not None:
            params = _with_tool_grammar(params, chat.tool_grammar)
        if thinking and params.structured_output is not None:  # the one place a grammar learns to wait for reasoning
            params = self._after_reasoning(params)
        max_model_len = self.info.max_model_len
        room = max_model_len - len(token_ids)
        if room < 1:
            raise InvalidRequest(
                "prompt", f"{len(token_ids)} tokens leave no room to generate within max_model_len={max_model_len}")
        if max_tokens_to_context_end and not request.params.HasField("max_tokens"):
            try:
                params = dataclasses.replace(params, max_tokens=room)
            except InvalidRequest as e:  # min_tokens beyond what fits
                raise e.within("params") from None
        if params.max_tokens > room:
            raise max_tokens_error(params.max_tokens, len(token_ids), max_model_len).within("params")
        return PreparedRequest(request_id, token_ids, params, hash_blocks(token_ids, self.info.block_size),
                               split_reasoning=self.reasoning_parser is not None and chat is not None,
                               parse_tool_calls=chat is not None and chat.parse_tool_calls)

    def _after_reasoning(self, params: SamplingParams) -> SamplingParams:
        """`params`, whose grammar now holds the answer after a reasoning span (router/reasoning_grammar.py)."""
        assert self.think_tags is not None and params.structured_output is not None
        ends = self.tokenizer.eos_token_ids | set(params.stop_token_ids)
        return dataclasses.replace(params, structured_output=self.think_tags.before(params.structured_output, ends))

    def _prompt(self, request: pb.GenerateRequest) -> tuple[list[int], ChatPrompt | None, bool]:
        """The prompt's token ids, for a chat prompt what was read of it, and whether the answer may think first
        and have its reasoning split off (router/reasoning_grammar.py)."""
        kind = request.WhichOneof("prompt")
        if kind == "text":
            if not request.text:
                raise InvalidRequest("text", "must not be empty")
            return self.tokenizer.encode(request.text), None, False
        if kind == "chat":
            try:  # the template may refuse messages too (Qwen's: "No user query found in messages.")
                chat = read_chat(request.chat, self.call_tags)
                text = self.tokenizer.apply_chat_template(chat.messages, template_kwargs=chat.template_kwargs,
                                                          tools=chat.tools)
            except InvalidRequest as e:  # "messages[0].role: unknown role ..."
                raise e.within("chat") from None
            return self.tokenizer.encode(text), chat, self.think_tags is not None and self.think_tags.thinking(text)
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidRequest("token_ids", "must not be empty")
            vocab_size = self.info.vocab_size
            for i, t in enumerate(ids):
                if not 0 <= t < vocab_size:
                    raise InvalidRequest(f"token_ids.ids[{i}]", f"{t} is outside the vocabulary [0, {vocab_size})")
            return ids, None, False
        raise InvalidRequest("prompt", "set one of text, chat or token_ids")

    def _params(self, message: pb.SamplingParams) -> SamplingParams:
        # Every field is optional or repeated: the fields set are those the client gave (a repeated one non-empty).
        given = {**self.info.sampling_defaults, **{field.name: value for field, value in message.ListFields()}}
        for name in given.keys() & {"stop", "stop_token_ids", "allowed_token_ids", "logit_bias"}:
            given[name] = dict(given[name]) if name == "logit_bias" else tuple(given[name])  # protobuf's containers
        if "structured_output" in given:
            given["structured_output"] = _structured_output(given["structured_output"])
        given.setdefault("seed", random.getrandbits(63))
        try:
            params = SamplingParams.from_kwargs(**given)
            params.check_token_ids(self.info.vocab_size)  # the engine indexes its logits by them
            if params.structured_output is not None:  # refused here, so no replica compiles a bad grammar
                check_grammar(params.structured_output)
        except InvalidRequest as e:
            raise e.within("params") from None
        return params


def _structured_output(message: pb.StructuredOutput) -> dict[str, object]:
    """The set field of the oneof as StructuredOutput's mapping ({} when none is set: refused by name there)."""
    kind = message.WhichOneof("kind")
    if kind is None:
        return {}
    value = getattr(message, kind)
    return {kind: list(value.choices) if kind == "choice" else value}


def _with_tool_grammar(params: SamplingParams, grammar: StructuredOutput) -> SamplingParams:
    """`params` holding the answer's tool calls to `grammar` (tool_choice "required", a named function, or strict
    tools), which takes the place of a structured_output: the two do not combine."""
    if params.structured_output is not None:
        raise InvalidRequest("chat.tool_choice", '"required", a named function or strict tools hold the answer to '
                             "tool calls, which does not combine with params.structured_output")
    try:
        return dataclasses.replace(params, structured_output=grammar)
    except InvalidRequest as e:  # min_tokens
        raise e.within("params") from None

