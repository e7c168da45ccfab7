"""Names the tests leave in /dev/shm: multiprocessing's semaphores (sem.mp-*) and our own shared memory and
semaphores (nanoserve-tp-*, sem.nanoserve-tp-*). Nothing else can remove a name whose processes all died, so
one that outlives them stays until the machine reboots."""

from __future__ import annotations

import os
import time
from pathlib import Path

DEV_SHM = Path("/dev/shm")


def shm_names() -> set[str]:
    """The names in /dev/shm that tests (or the code they run) create."""
    return {name for name in os.listdir(DEV_SHM) if name.startswith("sem.mp-") or "nanoserve" in name}


def held_open() -> set[str]:
    """Names in /dev/shm that a live process has mapped: in use, so their owner still unlinks them."""
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(f"{DEV_SHM}/"):
                held.add(fields[5].removeprefix(f"{DEV_SHM}/").removesuffix(" (deleted)"))
    return held


def leaked_since(before: set[str], grace_s: float = 5.0) -> set[str]:
    """Names created since `before` that no live process holds, after up to `grace_s` seconds for resource
    trackers and exiting processes to remove theirs."""
    deadline = time.monotonic() + grace_s
    while (leaked := shm_names() - before - held_open()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return leaked
