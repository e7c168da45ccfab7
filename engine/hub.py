"""Where a `model` argument's files are: a local checkpoint directory, or a Hugging Face model id
(`Qwen/Qwen3-0.6B`) resolved through the Hugging Face cache.

Ids go through `huggingface_hub`, so its settings apply: HF_HOME / HF_HUB_CACHE (where the cache is),
HF_HUB_OFFLINE (never contact the hub), HF_ENDPOINT and HF_TOKEN. A cached snapshot is used as is
when the hub cannot be reached; files are downloaded only when it can. Pure Python (no torch): the
router resolves the tokenizer files with it too.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# What the engine reads from a checkpoint: config and tokenizer JSON, the chat template, the weights.
CHECKPOINT_FILES = ("*.json", "*.jinja", "*.safetensors")
TOKENIZER_FILES = ("*.json", "*.jinja")  # enough for the router, which never loads weights


def resolve_model_dir(model: str | Path, patterns: tuple[str, ...] = CHECKPOINT_FILES) -> Path:
    """The directory holding `model`'s files (those matching `patterns`, for a model id).

    ValueError naming `model` and where it was looked for when it is neither a local directory
    nor a model id that is cached or downloadable.
    """
    if not isinstance(model, (str, Path)) or not str(model):
        raise ValueError(f"model must be a checkpoint directory or a Hugging Face model id, got {model!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    return _snapshot_dir(str(model), patterns)


def _snapshot_dir(repo_id: str, patterns: tuple[str, ...]) -> Path:
    """The cached snapshot of Hugging Face model `repo_id`, downloaded first when the hub is reachable."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    not_local = f"model: {repo_id!r} is not a local directory ({Path(repo_id).expanduser().absolute()})"
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except HFValidationError:
        raise ValueError(f"{not_local}, nor a Hugging Face model id such as 'Qwen/Qwen3-0.6B'") from None
    except LocalEntryNotFoundError as e:  # not cached (or only partly), and the hub out of reach
        offline = constants.HF_HUB_OFFLINE
        reach = "HF_HUB_OFFLINE is set" if offline else f"the hub ({constants.ENDPOINT}) is unreachable"
        raise ValueError(
            f"{not_local}, and as a Hugging Face model id it is not (completely) in the cache "
            f"{constants.HF_HUB_CACHE} (set by HF_HOME or HF_HUB_CACHE) while {reach}: download it where the hub "
            f"is reachable (`hf download {repo_id}`) or pass a checkpoint directory. huggingface_hub says: {e}"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise ValueError(
            f"{not_local}, and the hub ({constants.ENDPOINT}) has no model {repo_id!r} that this machine may "
            f"read (for a gated or private model, log in with `hf auth login` or set HF_TOKEN): "
            f"{type(e).__name__}"
        ) from None
    except OSError as e:  # other hub errors (HfHubHTTPError, server errors) and disk errors
        raise ValueError(f"{not_local}, and fetching the Hugging Face model id failed: {e}") from e
    log.info("model %s: using %s", repo_id, snapshot)
    return snapshot
