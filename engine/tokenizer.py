"""Tokenizer wrapper: a Hugging Face `tokenizer.json` plus its chat template, without torch or transformers."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import Template
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from engine.sampling_params import InvalidRequest

log = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a JSON object")
    return data


def _token_content(token: str | dict[str, Any] | None) -> str | None:
    """A special token's text, whether the config stores it as a string or as an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _eos_ids(value: int | list[int] | None) -> set[int]:
    """`eos_token_id` from a model or generation config, which may be an int or a list."""
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def _select_chat_template(value: str | list[dict[str, str]] | None) -> str | None:
    """The chat template string; configs may hold a list of named templates, of which we take "default"."""
    if value is None or isinstance(value, str):
        return value
    named = {entry["name"]: entry["template"] for entry in value}
    return named.get("default")


def _chat_template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    """The checkpoint's chat template: `chat_template.jinja` (where recent transformers save it; it wins,
    as in transformers), else tokenizer_config.json's `chat_template`; None when it has neither."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return _select_chat_template(config.get("chat_template"))


def _raise_exception(message: str) -> NoReturn:
    raise InvalidRequest("messages", message)


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str) -> Template:
    """Compile a chat template with the globals and filters that real (Qwen) templates use."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def validate_messages(messages: list[dict[str, Any]]) -> None:
    """Check chat messages; raise InvalidRequest (a ValueError) naming the bad field, e.g. `messages[2].role`."""
    # ValueError, not TypeError, for wrong types too: this is request input (INVALID_ARGUMENT).
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}]", f"must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(f"messages[{i}].role", "must be a string")
        if role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"unknown role {role!r}")
        if not isinstance(message.get("content"), str):
            raise InvalidRequest(f"messages[{i}].content", "must be a string")


class Tokenizer:
    """Encode, decode and render chat prompts for one model, from its folder's tokenizer files."""

    def __init__(
        self,
        hf_tokenizer: HFTokenizer,
        eos_token_ids: frozenset[int],
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._hf = hf_tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._bos_token = bos_token
        self._eos_token = eos_token
        self.chat_template_source = chat_template  # what the template writes (router/reasoning_grammar.py: thinking)
        self._chat_template = _compile_chat_template(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json`, the chat template and the eos ids of the model
        configs in `model_dir`."""
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"tokenizer.json: not found in {model_dir}")
        hf_tokenizer = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(model_dir / "tokenizer_config.json")
        eos_token = _token_content(config.get("eos_token"))
        eos_ids = _eos_ids(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        eos_ids |= _eos_ids(_read_json(model_dir / "config.json").get("eos_token_id"))
        if eos_token is not None:
            eos_id = hf_tokenizer.token_to_id(eos_token)
            if eos_id is None:
                raise ValueError(f"tokenizer_config.json: eos_token {eos_token!r} is not in the vocabulary")
            eos_ids.add(eos_id)
        if not eos_ids:
            log.warning(
                "no eos token found in %s; generation stops only on max_tokens or stop strings", model_dir
            )
        return cls(
            hf_tokenizer,
            eos_token_ids=frozenset(eos_ids),
            chat_template=_chat_template_source(model_dir, config),
            bos_token=_token_content(config.get("bos_token")),
            eos_token=eos_token,
        )

    @property
    def has_chat_template(self) -> bool:
        """Whether `apply_chat_template` can render messages for this model."""
        return self._chat_template is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids, and no BOS/EOS is added."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; incomplete UTF-8 at the end comes out as U+FFFD."""
        return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, object] | None = None, tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render chat `messages` into the prompt text, ending with the assistant header if asked.
        `template_kwargs`: more variables for the template (Qwen3's `enable_thinking`), vLLM's chat_template_kwargs.
        `tools`: the functions the model may call, as transformers passes them ({"type": "function", "function":
        {"name", "description", "parameters"}}); an assistant message's `tool_calls` and a tool message's
        `tool_call_id` reach the template as given."""
        if self._chat_template is None:
            raise InvalidRequest("messages", "the model has no chat template (its checkpoint ships none); send text "
                                 "instead")
        validate_messages(messages)
        variables = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=self._bos_token or "", eos_token=self._eos_token or "", tools=tools or None)
        template_kwargs = template_kwargs or {}
        for name in template_kwargs.keys() & variables.keys():
            raise InvalidRequest(f"template_kwargs.{name}", "set by the server, not by a request")
        return self._chat_template.render(**variables, **template_kwargs)
