"""What an OpenAI body asks its output to match: OpenAI's response_format, vLLM's structured_outputs, and the
guided_* fields vLLM took before 0.12 (still what many clients send), read into one pb.StructuredOutput.

At most one of those fields per body. Their shapes are checked here; the schema, regex or grammar itself by the
validator, whose `params.structured_output.<kind>` errors `body_param` renames to the body field that gave it.
"""

from __future__ import annotations

import json
from typing import Any

from proto import nanoserve_pb2 as pb
from router.invalid_body import InvalidBody, as_json

# vLLM's names -> StructuredOutput's oneof.
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                       "json_object": "json_object"}
# vLLM's structured_outputs options this server does not implement (one grammar engine, its own JSON whitespace).
_UNSUPPORTED_OPTIONS = ("structural_tag", "whitespace_pattern", "disable_any_whitespace",
                        "disable_additional_properties", "disable_fallback")
_JSON_SCHEMA_FIELDS = ("name", "description", "schema", "strict")
FIELDS = frozenset({"response_format", "structured_outputs", *_GUIDED})


def read_structured_output(given: dict[str, Any], message: pb.StructuredOutput) -> str | None:
    """Fill `message` from the body's structured-output field; the body's name of the value it came from
    (`response_format.json_schema.schema`, `guided_regex`, ...), or None when the body asks for none."""
    asked = [name for name in ("response_format", "structured_outputs", *_GUIDED) if name in given]
    if len(asked) > 1:
        raise InvalidBody(asked[1], f"only one of response_format, structured_outputs and guided_* per request; "
                          f"{asked[0]} is given too")
    if not asked:
        return None
    name = asked[0]
    if name == "response_format":
        return _response_format(given[name], message)
    if name == "structured_outputs":
        return _structured_outputs(given[name], message)
    _set(message, _GUIDED[name], given[name], name)
    return name


def body_param(field: str, spec_param: str | None) -> str | None:
    """The body's name of the validator's `field` when it is about the structured output (None otherwise):
    `params.structured_output.choice[1]` -> `guided_choice[1]`."""
    prefix = "params.structured_output"
    if spec_param is None or not field.startswith(prefix):
        return None
    rest = field[len(prefix):].lstrip(".")
    kind_end = len(rest) - len(rest.lstrip("abcdefghijklmnopqrstuvwxyz_"))
    return spec_param + rest[kind_end:]


def _response_format(value: object, message: pb.StructuredOutput) -> str | None:
    """OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {name, schema, strict}}."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidBody("response_format", f'must be {{"type": "text" | "json_object" | "json_schema", ...}}, got '
                          f"{as_json(value)}")
    kind = value["type"]
    expected = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in expected:
        raise InvalidBody("response_format.type", f"not supported by this server (text, json_object or "
                          f"json_schema), got {as_json(kind)}")
    for extra in sorted(value.keys() - expected[kind]):
        raise InvalidBody(f"response_format.{extra}", f"unknown with type {as_json(kind)}")
    if kind == "text":
        return None
    if kind == "json_object":
        message.json_object = True
        return "response_format"
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidBody("response_format.json_schema", f"must be an object with a schema, got {as_json(spec)}")
    for extra in sorted(spec.keys() - set(_JSON_SCHEMA_FIELDS)):
        raise InvalidBody(f"response_format.json_schema.{extra}", f"unknown; it takes {', '.join(_JSON_SCHEMA_FIELDS)}")
    for name, kinds in (("name", str), ("description", str), ("strict", bool)):
        if spec.get(name) is not None and not isinstance(spec[name], kinds):
            raise InvalidBody(f"response_format.json_schema.{name}", f"wrong type: {as_json(spec[name])}")
    if not isinstance(spec.get("schema"), dict):  # strict or not, the schema is enforced
        raise InvalidBody("response_format.json_schema.schema", f"must be a JSON Schema object, got "
                          f"{as_json(spec.get('schema'))}")
    message.json_schema = json.dumps(spec["schema"])
    return "response_format.json_schema.schema"


def _structured_outputs(value: object, message: pb.StructuredOutput) -> str | None:
    """vLLM's {"json" | "regex" | "choice" | "grammar" | "json_object": ...}, exactly one."""
    if not isinstance(value, dict):
        raise InvalidBody("structured_outputs", f"must be an object, got {as_json(value)}")
    for name in value:
        if name in _UNSUPPORTED_OPTIONS:
            raise InvalidBody(f"structured_outputs.{name}", "not supported by this server")
        if name not in _STRUCTURED_OUTPUTS:
            raise InvalidBody(f"structured_outputs.{name}",
                              f"unknown; it takes one of {', '.join(_STRUCTURED_OUTPUTS)}")
    given = [name for name, v in value.items() if v is not None and v is not False]
    if len(given) != 1:
        raise InvalidBody("structured_outputs", f"set exactly one of {', '.join(_STRUCTURED_OUTPUTS)}; got "
                          f"{' and '.join(given) or 'none'}")
    [name] = given
    _set(message, _STRUCTURED_OUTPUTS[name], value[name], f"structured_outputs.{name}")
    return f"structured_outputs.{name}"


def _set(message: pb.StructuredOutput, kind: str, value: object, param: str) -> None:
    """message.<kind> = value, its JSON type checked; `param` names it in the error."""
    if kind == "json_schema" and isinstance(value, dict):
        value = json.dumps(value)
    if kind == "json_object":
        if value is not True:
            raise InvalidBody(param, f"must be true, got {as_json(value)}")
        message.json_object = True
    elif kind == "choice":
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise InvalidBody(param, f"must be a list of strings, got {as_json(value)}")
        message.choice.SetInParent()  # set even when empty, for the validator to name
        message.choice.choices.extend(value)
    elif not isinstance(value, str):
        wanted = "a JSON Schema object (or its JSON text)" if kind == "json_schema" else "a string"
        raise InvalidBody(param, f"must be {wanted}, got {as_json(value)}")
    else:
        setattr(message, kind, value)
