"""Load Hugging Face safetensors shards into our model, one tensor at a time."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy every checkpoint tensor into its (possibly packed, possibly sharded) parameter.

    Each tensor is read on its own and handed to its parameter's `weight_loader`, so no more
    than one full checkpoint tensor is held at a time. Fails naming any missing or unexpected weight.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {model_dir}")
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    tied = "lm_head.weight" not in params  # the head shares the embedding's parameter
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if tied and name == "lm_head.weight":
                    continue
                target, shard_id = _map_name(name, packed)
                param = params.get(target)
                if param is None:
                    raise ValueError(f"model: checkpoint tensor {name!r} in {file.name} matches no model parameter")
                weight_loader = getattr(param, "weight_loader", _copy_whole)
                tensor = f.get_tensor(name)
                try:
                    weight_loader(param, tensor, shard_id)
                except (RuntimeError, ValueError) as e:  # shapes that do not fit config.json
                    raise ValueError(
                        f"model: checkpoint tensor {name!r} {tuple(tensor.shape)} does not fit parameter "
                        f"{target!r} {tuple(param.shape)}; does config.json match the weights?"
                    ) from e
                loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"model: checkpoint in {model_dir} lacks weights for {', '.join(missing[:5])}")
    log.info("loaded %d tensors from %d safetensors file(s)", len(loaded), len(files))


def _copy_whole(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Loader of unsharded parameters (norm weights)."""
    if param.shape != loaded.shape:
        raise ValueError(f"model: checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(loaded)


def _map_name(name: str, packed: dict[str, tuple[str, object]]) -> tuple[str, object]:
    for checkpoint_part, (packed_part, shard_id) in packed.items():
        if f".{checkpoint_part}." in name:
            return name.replace(f".{checkpoint_part}.", f".{packed_part}."), shard_id
    return name, None
