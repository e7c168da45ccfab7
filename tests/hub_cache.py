"""A Hugging Face hub cache built by hand (no network): a checkpoint stored as `snapshot_download` leaves it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex revision


def write_hub_cache(
    cache_dir: Path, repo_id: str, checkpoint: Path, patterns: tuple[str, ...] = ("*",)
) -> Path:
    """Store `checkpoint`'s files matching `patterns` as revision `main` of model `repo_id` in the hub cache
    `cache_dir` (`$HF_HOME/hub`): content-addressed blobs, a snapshot folder of links to them, and the ref.
    Returns the snapshot folder."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    files = {f for pattern in patterns for f in checkpoint.glob(pattern) if f.is_file()}
    for file in sorted(files):
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot
