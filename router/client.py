"""A small client for the nanoserve router: blocking `Client`, asyncio `AsyncClient`, and a CLI.

`python -m router.client "Hello"` streams the answer to stdout and a usage line to stderr (`-n 3`: three choices,
each printed whole; `--chat --tool '{...}'`: a chat answer that may call the tool, its calls printed).
It needs only grpcio and proto/ (never torch), so it runs on any machine that talks to a router.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import AsyncIterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import FieldDescriptor

from proto import nanoserve_pb2 as pb
from proto import nanoserve_pb2_grpc as pb_grpc
from router.client_tools import build_tool_choice, build_tools

DEFAULT_TARGET = "localhost:50051"

# Text, token ids, or chat messages such as [{"role": "user", "content": "Hi"}].
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
Metadata = tuple[tuple[str, str], ...]

# The sampling kwargs accepted by generate/complete: exactly the fields of SamplingParams.
SAMPLING_FIELDS = frozenset(field.name for field in pb.SamplingParams.DESCRIPTOR.fields)
# What a value of each proto field kind must be, as a type error says it: (one value, a list of them).
_EXPECTED = {
    FieldDescriptor.CPPTYPE_INT64: ("an int", "a list of ints"),
    FieldDescriptor.CPPTYPE_DOUBLE: ("a number", "a list of numbers"),
    FieldDescriptor.CPPTYPE_BOOL: ("a bool", "a list of bools"),
    FieldDescriptor.CPPTYPE_STRING: ("a str", "a list of strs"),
}


def build_request(prompt: Prompt, request_id: str | None, sampling: Mapping[str, Any],
                  tools: Sequence[Any] | None = None, tool_choice: Any = None) -> pb.GenerateRequest:
    """The GenerateRequest both clients send: the one place kwargs are mapped onto the proto. `tools` and
    `tool_choice` (router/client_tools.py says their shapes) go with a chat prompt only."""
    request = pb.GenerateRequest(request_id=request_id or "", params=build_sampling_params(sampling))
    if isinstance(prompt, str):
        request.text = prompt
    elif not prompt:
        raise ValueError("prompt is an empty list: give at least one token id or chat message")
    elif all(isinstance(token_id, int) for token_id in prompt):
        request.token_ids.ids.extend(prompt)
    elif all(isinstance(message, Mapping) for message in prompt):
        request.chat.messages.extend(pb.ChatMessage(**message) for message in prompt)  # type: ignore[arg-type]
    else:
        raise TypeError("prompt must be a str, a list of token ids, or a list of {'role', 'content'} dicts")
    if (tools is not None or tool_choice is not None) and request.WhichOneof("prompt") != "chat":
        raise ValueError(f"{'tools' if tools is not None else 'tool_choice'}: only with a chat prompt (a list of "
                         "messages)")
    if tools is not None:
        request.chat.tools.extend(build_tools(tools))
    if tool_choice is not None:
        request.chat.tool_choice.CopyFrom(build_tool_choice(tool_choice))
    return request


def build_sampling_params(sampling: Mapping[str, Any]) -> pb.SamplingParams | None:
    """SamplingParams with presence set exactly for the kwargs given; None kwargs stay unset (engine default)."""
    unknown = sorted(set(sampling) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unexpected sampling parameter {unknown[0]!r}; known: {', '.join(sorted(SAMPLING_FIELDS))}")
    given = {name: value for name, value in sampling.items() if value is not None}
    if not given:
        return None
    if isinstance(given.get("stop"), str):
        given["stop"] = [given["stop"]]  # protobuf would otherwise split a lone string into characters
    params = pb.SamplingParams()
    for name, value in given.items():
        _set_field(params, name, value)
    return params


def _set_field(params: pb.SamplingParams, name: str, value: Any) -> None:
    """Set one field, raising TypeError/ValueError that name it: protobuf's own do not ("'float' object cannot be
    interpreted as an integer"). A bool is refused for a number and a number for a bool, which protobuf would
    convert (temperature=True is a mistake, not 1.0)."""
    field = pb.SamplingParams.DESCRIPTOR.fields_by_name[name]
    if field.message_type is not None and field.message_type.GetOptions().map_entry:  # logit_bias
        _set_map(params, name, value)
        return
    if field.message_type is not None:
        params.structured_output.CopyFrom(structured_output(value))
        return
    expected = _EXPECTED[field.cpp_type][field.is_repeated]
    problem = f"{name}: expected {expected}, got {value!r} ({type(value).__name__})"
    if not field.is_repeated and isinstance(value, bool) != (field.cpp_type == FieldDescriptor.CPPTYPE_BOOL):
        raise TypeError(problem)
    try:
        if field.is_repeated:
            getattr(params, name).extend(value)
        else:
            setattr(params, name, value)
    except TypeError:
        raise TypeError(problem) from None
    except ValueError as e:  # an int outside int64 ("Value out of range: ..."), or bytes that are not UTF-8
        raise ValueError(f"{name}: {e}") from None


def _set_map(params: pb.SamplingParams, name: str, value: Any) -> None:
    """A map field from a mapping of int keys to numbers (a bool is neither)."""
    problem = f"{name}: expected a dict of int -> number, got {value!r}"
    if not isinstance(value, Mapping) or any(
        isinstance(k, bool) or not isinstance(k, int) or isinstance(v, bool) or not isinstance(v, (int, float))
        for k, v in value.items()
    ):
        raise TypeError(problem)
    try:
        getattr(params, name).update(value)
    except ValueError as e:  # a key outside int64
        raise ValueError(f"{name}: {e}") from None


def structured_output(value: Any) -> pb.StructuredOutput:
    """The structured_output kwarg as its message: one given, or a dict of one of its fields, as
    {"json_schema": {...}} (a dict or its JSON text), {"json_object": True}, {"regex": "..."},
    {"choice": ["yes", "no"]} or {"grammar": "..."}."""
    if isinstance(value, pb.StructuredOutput):
        return value
    kinds = [f.name for f in pb.StructuredOutput.DESCRIPTOR.fields]
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in kinds:
        raise TypeError(f"structured_output: expected a dict of one of {', '.join(kinds)}, got {value!r}")
    [(kind, spec)] = value.items()
    if kind == "json_schema" and isinstance(spec, Mapping):
        spec = json.dumps(spec)
    if kind == "choice":
        if isinstance(spec, str) or not isinstance(spec, Sequence):
            raise TypeError(f"structured_output.choice: expected a list of strs, got {spec!r}")
        spec = pb.Choices(choices=spec)
    try:
        return pb.StructuredOutput(**{kind: spec})
    except TypeError:
        raise TypeError(f"structured_output.{kind}: wrong type, got {spec!r}") from None


def choices_of(answer: pb.CompleteResponse) -> list[pb.CompleteChoice]:
    """Every choice of a Complete answer, by index: its `choices` (n > 1), or its own fields as choice 0 (n = 1)."""
    if answer.choices:
        return sorted(answer.choices, key=lambda choice: choice.index)
    return [pb.CompleteChoice(index=0, text=answer.text, token_ids=answer.token_ids, logprobs=answer.logprobs,
                              finish_reason=answer.finish_reason, replica=answer.replica,
                              reasoning_text=answer.reasoning_text, tool_calls=answer.tool_calls)]


def auth_metadata(api_key: str | None) -> Metadata | None:
    """The call metadata that carries the API key, as the router expects it."""
    return None if api_key is None else (("authorization", f"Bearer {api_key}"),)


def open_channel(channels: ModuleType, target: str, tls_root_cert: bytes | None) -> Any:
    """A channel from `grpc` or `grpc.aio` (same function names): TLS when a root certificate is given."""
    if tls_root_cert is None:
        return channels.insecure_channel(target)
    return channels.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_root_cert))


class Client:
    """Blocking client over one channel, reused by every call; close it, or use it as a context manager."""

    def __init__(
        self, target: str = DEFAULT_TARGET, *, api_key: str | None = None, tls_root_cert: bytes | None = None
    ) -> None:
        self._channel = open_channel(grpc, target, tls_root_cert)
        self._stub = pb_grpc.NanoServeStub(self._channel)
        self._metadata = auth_metadata(api_key)

    def generate(
        self, prompt: Prompt, *, timeout: float | None = None, request_id: str | None = None,
        tools: Sequence[Any] | None = None, tool_choice: Any = None, **sampling: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Stream the answer; the last chunk carries finish_reason and usage. The iterator is the gRPC
        call, so `.cancel()` on it aborts the request (and frees its KV cache) at once. With n > 1 the
        choices' chunks interleave, each carrying its choice's `index`; a chat answer's calls of `tools`
        come as `tool_calls`."""
        request = build_request(prompt, request_id, sampling, tools, tool_choice)
        return self._stub.Generate(request, timeout=timeout, metadata=self._metadata)

    def complete(
        self, prompt: Prompt, *, timeout: float | None = None, request_id: str | None = None,
        tools: Sequence[Any] | None = None, tool_choice: Any = None, **sampling: Any
    ) -> pb.CompleteResponse:
        """The whole answer at once, when it finishes (`choices_of` gives each choice, whatever n)."""
        request = build_request(prompt, request_id, sampling, tools, tool_choice)
        return self._stub.Complete(request, timeout=timeout, metadata=self._metadata)

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        """What model is served, and its limits."""
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    def cluster_status(self, *, timeout: float | None = None) -> pb.ClusterStatus:
        """Every replica's state and load, as the router sees it."""
        return self._stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of `Client` (grpc.aio); create it inside the event loop that will use it."""

    def __init__(
        self, target: str = DEFAULT_TARGET, *, api_key: str | None = None, tls_root_cert: bytes | None = None
    ) -> None:
        self._channel = open_channel(grpc.aio, target, tls_root_cert)
        self._stub = pb_grpc.NanoServeStub(self._channel)
        self._metadata = auth_metadata(api_key)

    def generate(
        self, prompt: Prompt, *, timeout: float | None = None, request_id: str | None = None,
        tools: Sequence[Any] | None = None, tool_choice: Any = None, **sampling: Any
    ) -> AsyncIterable[pb.GenerateResponse]:
        """Stream the answer with `async for`; the last chunk carries finish_reason and usage. The iterable
        is the grpc.aio call, so `.cancel()` on it aborts the request at once. Choices and tools: as
        `Client.generate`."""
        request = build_request(prompt, request_id, sampling, tools, tool_choice)
        return self._stub.Generate(request, timeout=timeout, metadata=self._metadata)

    async def complete(
        self, prompt: Prompt, *, timeout: float | None = None, request_id: str | None = None,
        tools: Sequence[Any] | None = None, tool_choice: Any = None, **sampling: Any
    ) -> pb.CompleteResponse:
        """The whole answer at once, when it finishes (`choices_of` gives each choice, whatever n)."""
        request = build_request(prompt, request_id, sampling, tools, tool_choice)
        return await self._stub.Complete(request, timeout=timeout, metadata=self._metadata)

    async def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        """What model is served, and its limits."""
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def cluster_status(self, *, timeout: float | None = None) -> pb.ClusterStatus:
        """Every replica's state and load, as the router sees it."""
        request = pb.GetClusterStatusRequest()
        return await self._stub.GetClusterStatus(request, timeout=timeout, metadata=self._metadata)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments; `--help` documents each."""
    parser = argparse.ArgumentParser(
        prog="python -m router.client",
        description="Send one prompt to a nanoserve router and stream the answer to stdout; "
        "a usage line (tokens, finish reason, replica) goes to stderr.",
    )
    parser.add_argument("prompt", help="the prompt: text, or token ids with --token-ids")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="router address host:port (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, help="most tokens to generate (server default: 16)")
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy (server default: 1.0)")
    parser.add_argument("--seed", type=int, help="sampling seed, for answers that repeat exactly (default: random)")
    parser.add_argument("--timeout", type=float, help="deadline for the whole request, in seconds (default: none)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--chat", action="store_true", help="send the prompt as one user message, with the chat template")
    kind.add_argument("--token-ids", action="store_true", help="the prompt is token ids, e.g. '1,2,3' or '[1, 2, 3]'")
    parser.add_argument(
        "--api-key-file", type=Path, help="file holding the API key, sent as 'authorization: Bearer <key>'"
    )
    parser.add_argument("-n", "--n", type=int, metavar="N", help="how many answers (choices) to generate for the "
                        "prompt (default: 1); with N > 1 each is printed whole as soon as it finishes, under a "
                        "'--- choice I: FINISH_REASON ---' line")
    parser.add_argument("--tool", action="append", metavar="JSON|FILE", help="a function the model may call (with "
                        "--chat): OpenAI's tool JSON, {\"type\": \"function\", \"function\": {\"name\": ..., "
                        "\"description\": ..., \"parameters\": {JSON Schema}}}, or the function object alone, or "
                        "a JSON list of them, given inline or as a file holding it; repeat for more tools. The "
                        "answer's calls are printed after its text, one a line: 'tool call: NAME ARGUMENTS_JSON'")
    parser.add_argument("--tool-choice", metavar="MODE|NAME", help="with --tool: 'auto' (the default: the model "
                        "may call the tools), 'none' (it answers in text), 'required' (it answers with one or more "
                        "calls), or a function's name (exactly one call of it)")
    return parser


def cli_prompt(args: argparse.Namespace) -> Prompt:
    """The prompt as --chat / --token-ids ask for it; ValueError on ids that are not integers."""
    if args.chat:
        return [{"role": "user", "content": args.prompt}]
    if args.token_ids:
        return [int(token) for token in re.split(r"[\s,\[\]]+", args.prompt) if token]
    return str(args.prompt)


def cli_tools(values: list[str] | None) -> list[Any] | None:
    """The --tool values as tools: each inline JSON (a tool or a list of them) or a file holding it."""
    if not values:
        return None
    tools: list[Any] = []
    for value in values:
        text = value if value.lstrip().startswith(("{", "[")) else Path(value).read_text()
        try:
            given = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--tool {value!r}: not JSON ({e})") from None
        tools += given if isinstance(given, list) else [given]
    build_tools(tools)  # refused here, with the argument named, rather than as a traceback
    return tools


def cli_tool_choice(value: str | None) -> str | dict[str, Any] | None:
    """--tool-choice: a mode as it is, any other word as the name of the one function to call."""
    if value is None or value in ("auto", "none", "required"):
        return value
    return {"type": "function", "function": {"name": value}}


def finish_name(reason: int) -> str:
    return pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def usage_line(last: pb.GenerateResponse | pb.CompleteResponse) -> str:
    """One line for stderr summing up a finished answer (a stream's last chunk, or a Complete answer)."""
    usage = last.usage
    return (
        f"prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
        f"cached_tokens={usage.cached_prompt_tokens} finish_reason={finish_name(last.finish_reason)} "
        f"replica={last.replica}\n"
    )


def write_calls(calls: Sequence[pb.ToolCall]) -> None:
    for call in calls:
        sys.stdout.write(f"tool call: {call.name} {call.arguments}\n")


def stream_to_stdout(chunks: Iterator[pb.GenerateResponse]) -> pb.GenerateResponse:
    """Write each chunk's text as it arrives, then the answer's tool calls; return the last chunk (the one with
    usage)."""
    last = pb.GenerateResponse()
    calls: list[pb.ToolCall] = []
    for last in chunks:
        sys.stdout.write(last.text)
        sys.stdout.flush()
        calls += last.tool_calls
    sys.stdout.write("\n")
    write_calls(calls)
    return last


def print_choices_as_they_finish(chunks: Iterator[pb.GenerateResponse]) -> pb.GenerateResponse:
    """n > 1: the choices' chunks interleave, so each choice is gathered and printed whole as soon as its last chunk
    arrives, under a line naming it and its finish reason, its tool calls after its text; returns the stream's
    last chunk (the one with usage)."""
    texts: dict[int, list[str]] = defaultdict(list)
    calls: dict[int, list[pb.ToolCall]] = defaultdict(list)
    last = pb.GenerateResponse()
    for last in chunks:
        texts[last.index].append(last.text)
        calls[last.index] += last.tool_calls
        if last.finish_reason:
            text = "".join(texts.pop(last.index))
            sys.stdout.write(f"--- choice {last.index}: {finish_name(last.finish_reason)} ---\n{text}\n")
            write_calls(calls.pop(last.index))
            sys.stdout.flush()
    return last


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0, 1 on a gRPC error, 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tool or args.tool_choice) and not args.chat:
        parser.error("--tool and --tool-choice need --chat (tools go with chat prompts)")
    try:
        prompt = cli_prompt(args)
        api_key = args.api_key_file.read_text().strip() if args.api_key_file else None
        tools = cli_tools(args.tool)
    except (ValueError, TypeError, OSError) as error:
        parser.error(str(error))
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed, "n": args.n}
    asked = dict(timeout=args.timeout, tools=tools, tool_choice=cli_tool_choice(args.tool_choice), **sampling)
    try:
        with Client(args.target, api_key=api_key) as client:
            chunks = client.generate(prompt, **asked)
            several = args.n is not None and args.n > 1  # their chunks interleave: streamed, they would mix
            last = print_choices_as_they_finish(chunks) if several else stream_to_stdout(chunks)
    except grpc.RpcError as error:
        sys.stderr.write(f"error: {error.code().name}: {error.details()}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    sys.stderr.write(usage_line(last))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
