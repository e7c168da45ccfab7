"""Sampling defaults from the checkpoint's generation_config.json, as vLLM's `--generation-config auto` reads them.

Qwen3's checkpoints ship temperature 0.6, top_p 0.95 and top_k 20 there: the settings the model was tuned to be
sampled with. A request that leaves one of these fields unset gets the checkpoint's value; one it sets wins.
"vllm" ignores the file (SamplingParams' own defaults), as vLLM's `--generation-config vllm` does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

GENERATION_CONFIG_MODES = ("auto", "vllm")
# The fields a checkpoint may default (vLLM's list, less max_new_tokens: a request's length is its own business).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model_dir: Path, mode: str) -> dict[str, float | int]:
    """The checkpoint's sampling defaults in `mode` (one of GENERATION_CONFIG_MODES), checked as a request's
    would be."""
    path = model_dir / "generation_config.json"
    if mode == "vllm" or not path.is_file():
        return {}
    config = json.loads(path.read_text())
    defaults = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    try:
        SamplingParams.from_kwargs(**defaults)
    except ValueError as e:
        raise ValueError(f"model: {path.name} has a sampling default the engine cannot use ({e})") from None
    if defaults:
        log.info("sampling defaults from %s (requests that leave them unset): %s; generation_config='vllm' ignores "
                 "them", path.name, ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults
