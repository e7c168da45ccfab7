"""Tokenizer wrapper: loading from a model folder, eos ids, encode/decode and chat templates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer

from engine.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "tool", "content": '{"ok": true}'},
]


def make_model_dir(
    tmp_path: Path, source_dir: Path, config_updates: dict[str, Any] | None = None, **json_files: Any
) -> Path:
    """A model folder linking the cached tokenizer.json, with an edited tokenizer_config and extra JSON files."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").symlink_to(source_dir / "tokenizer.json")
    config = json.loads((source_dir / "tokenizer_config.json").read_text())
    config.update(config_updates or {})
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in json_files.items():
        (model_dir / f"{name}.json").write_text(json.dumps(content))
    return model_dir


@pytest.fixture(scope="module")
def hf(qwen_tokenizer_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))


def test_basic_surface(qwen_tokenizer: Tokenizer) -> None:
    assert qwen_tokenizer.vocab_size == 151669
    assert qwen_tokenizer.eos_token_ids == frozenset({151645})
    assert qwen_tokenizer.has_chat_template
    assert qwen_tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert qwen_tokenizer.encode("<|im_start|>hi<|im_end|>") == [151644, 6023, 151645]
    ids = qwen_tokenizer.encode("<|im_start|>héllo 世界<|im_end|>")
    assert qwen_tokenizer.decode(ids) == "héllo 世界"
    assert qwen_tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>héllo 世界<|im_end|>"
    assert qwen_tokenizer.decode(()) == ""


def test_eos_ids_union_of_configs(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    model_dir = make_model_dir(
        tmp_path,
        qwen_tokenizer_dir,
        generation_config={"eos_token_id": [151643, 151645]},
        config={"eos_token_id": 151667},
    )
    assert Tokenizer.from_dir(str(model_dir)).eos_token_ids == frozenset({151643, 151645, 151667})


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_unknown_eos_token(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    model_dir = make_model_dir(tmp_path, qwen_tokenizer_dir, {"eos_token": "<|nope|>"})
    with pytest.raises(ValueError, match="tokenizer_config.json: eos_token"):
        Tokenizer.from_dir(model_dir)


def test_chat_template(qwen_tokenizer: Tokenizer) -> None:
    """The embedded template, Qwen3's shape: tool results in a user turn, an earlier answer's <think> span dropped,
    enable_thinking=false closing an empty span up front."""
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"ok": true}\n</tool_response><|im_end|>\n'
    )
    assert qwen_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected
    assert qwen_tokenizer.apply_chat_template(CONVERSATION) == expected + "<|im_start|>assistant\n"
    thought = [*CONVERSATION[:2], {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, CONVERSATION[3]]
    assert qwen_tokenizer.apply_chat_template(thought, add_generation_prompt=False) == expected
    off = qwen_tokenizer.apply_chat_template(CONVERSATION, template_kwargs={"enable_thinking": False})
    assert off == expected + "<|im_start|>assistant\n<think>\n\n</think>\n\n"


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_EXCHANGE = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_chat_template_with_tools(qwen_tokenizer: Tokenizer, qwen_tokenizer_dir: Path) -> None:
    """The embedded template, Qwen3's shape: tools described in the system turn, an earlier answer's calls as
    <tool_call> JSON, their results in a user turn; transformers renders it alike from the same arguments."""
    from transformers import AutoTokenizer

    ours = qwen_tokenizer.apply_chat_template(TOOL_EXCHANGE, tools=TOOLS)
    assert ours == (
        "<|im_start|>system\n# Tools\n\nFunctions you may call, as JSON signatures:\n<tools>\n"
        + json.dumps(TOOLS[0]) + "\n</tools>\n\nTo call one, answer with its name and arguments as a JSON object "
        'between tags:\n<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    hf_tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    assert ours == hf_tokenizer.apply_chat_template(TOOL_EXCHANGE, tools=TOOLS, tokenize=False,
                                                    add_generation_prompt=True)
    two_calls = [{**TOOL_EXCHANGE[1], "content": "Looking.", "tool_calls": TOOL_EXCHANGE[1]["tool_calls"] * 2}]
    rendered = qwen_tokenizer.apply_chat_template(two_calls, add_generation_prompt=False)
    assert 'Looking.\n<tool_call>\n{"name"' in rendered and "</tool_call>\n<tool_call>" in rendered


def test_chat_template_list_form_takes_default(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0]['content'] }}"},
    ]
    model_dir = make_model_dir(tmp_path, qwen_tokenizer_dir, {"chat_template": templates})
    assert Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


# Qwen2.5's shape of template: a default system prompt unless the conversation brings one.
SYSTEM_DEFAULT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("conversation", [CONVERSATION, CONVERSATION[1:]], ids=["system", "default-system"])
def test_chat_template_saved_by_transformers_renders_as_transformers_does(
    conversation: list[dict[str, str]], tmp_path: Path, qwen_tokenizer_dir: Path
) -> None:
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    hf_tokenizer.chat_template = SYSTEM_DEFAULT_TEMPLATE
    hf_tokenizer.save_pretrained(tmp_path)  # writes the template to chat_template.jinja, not tokenizer_config.json
    assert (tmp_path / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    ours = Tokenizer.from_dir(tmp_path).apply_chat_template(conversation)
    assert ours == hf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<|im_start|>system\n")


def test_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    model_dir = make_model_dir(tmp_path, qwen_tokenizer_dir, {"chat_template": "from the config"})
    assert Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "hi"}]) == "from the config"
    (model_dir / "chat_template.jinja").write_text("from the file: {{ messages[0]['content'] }}")
    assert Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "hi"}]) == "from the file: hi"


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], r"^messages: must be a non-empty list"),
        ("hello", r"^messages: must be a non-empty list"),
        (["hello"], r"^messages\[0\]: must be a dict"),
        ([{"content": "x"}], r"^messages\[0\]\.role: must be a string"),
        ([{"role": 3, "content": "x"}], r"^messages\[0\]\.role: must be a string"),
        (
            CONVERSATION[:2] + [{"role": "wizard", "content": "x"}],
            r"^messages\[2\]\.role: unknown role 'wizard'",
        ),
        ([{"role": "user"}], r"^messages\[0\]\.content: must be a string"),
        ([{"role": "user", "content": ["x"]}], r"^messages\[0\]\.content: must be a string"),
    ],
)
def test_bad_messages(qwen_tokenizer: Tokenizer, messages: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        qwen_tokenizer.apply_chat_template(messages)


def test_no_chat_template(hf: HFTokenizer) -> None:
    tokenizer = Tokenizer(hf, eos_token_ids=frozenset())
    assert not tokenizer.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_extras(hf: HFTokenizer) -> None:
    template = (
        "{{ bos_token }}[{{ eos_token }}]"
        "{% for m in messages %}{% if loop.index0 > 0 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}{{ tools is none }}"
    )
    tokenizer = Tokenizer(hf, frozenset(), chat_template=template, bos_token="<s>", eos_token="</s>")
    messages = [{"role": "user", "content": "héllo"}, {"role": "user", "content": "skipped"}]
    assert tokenizer.apply_chat_template(messages) == '<s>[</s>]{"role": "user", "content": "héllo"}4True'


def test_template_raise_exception(hf: HFTokenizer) -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system message first') }}{% endif %}"
    )
    tokenizer = Tokenizer(hf, frozenset(), chat_template=template)
    with pytest.raises(ValueError, match="system message first"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_is_sandboxed(hf: HFTokenizer) -> None:
    tokenizer = Tokenizer(hf, frozenset(), chat_template="{{ messages.append(1) }}")
    with pytest.raises(Exception, match="unsafe|immutable|not safely callable"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_imports_stay_torch_free() -> None:
    """What the router imports from the engine (DESIGN.md) must not pull torch in."""
    code = (
        "import sys, engine.tokenizer, engine.detokenizer, engine.qwen_tokenizer, engine.block_hash, "
        "engine.sampling_params; "
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
