"""Soak: many short requests through a router with 2 CPU replicas; zero failures, no request state left
(I3) and flat memory (I4) at the end.

    python bench/soak.py [--requests 20000] [--concurrency 32] [--inject-leak]

RSS of the router process and of each replica is read after a warm-up and again at the end; the
check fails if either grew by more than --rss-budget-mib. `--inject-leak` keeps every finished request
alive in the router (a deliberate leak) to show the check catches one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from engine.default_model import write_random_qwen3  # noqa: E402
from engine.qwen_tokenizer import cache_root  # noqa: E402
from router.client import AsyncClient  # noqa: E402
from router.config import RouterConfig  # noqa: E402
from router.inflight import InFlightRequest  # noqa: E402
from router.server import Router  # noqa: E402

SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


def rss_mib(pid: int | None = None) -> float:
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


def replica_rss(router: Router) -> dict[str, float]:
    return {slot.name: asyncio.run(slot.handle.run(lambda replica: rss_mib(), timeout_s=30))
            for slot in router.pool.slots if slot.handle is not None}


async def run_requests(address: str, n: int, concurrency: int, seed: int) -> int:
    """Send n short greedy requests; return how many failed."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1024) for _ in range(rng.randint(4, 40))] for _ in range(n)]
    failures = 0
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)

    async def worker() -> None:
        nonlocal failures
        async with AsyncClient(address) as client:
            while not queue.empty():
                prompt = queue.get_nowait()
                try:
                    await client.complete(prompt, timeout=60, max_tokens=rng.randint(1, 8), temperature=0.0)
                except Exception:  # noqa: BLE001 (counted)
                    failures += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rss-budget-mib", type=float, default=64.0)
    p.add_argument("--inject-leak", action="store_true")
    args = p.parse_args()
    model = cache_root() / "soak-tiny-qwen3"
    if not (model / "config.json").is_file():
        write_random_qwen3(model, SHAPE, init_std=0.3)
    if args.inject_leak:
        leaked: list[InFlightRequest] = []
        original = InFlightRequest.__init__

        def leaky_init(self: InFlightRequest, *a: object, **k: object) -> None:
            original(self, *a, **k)  # type: ignore[arg-type]
            leaked.append(self)

        InFlightRequest.__init__ = leaky_init  # type: ignore[method-assign]
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    call = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result()  # noqa: E731
    router = Router(RouterConfig(num_replicas=2, model=str(model), port=0, metrics_port=None,
                                 engine_kwargs=dict(device="cpu", dtype="float32", num_kv_blocks=512),
                                 replica_prefix=f"soak-{os.getpid()}"))
    call(router.start())
    address = f"127.0.0.1:{router.port}"
    failures = asyncio.run(run_requests(address, args.warmup, args.concurrency, seed=0))
    before = {"router": rss_mib(), **replica_rss(router)}
    start = time.monotonic()
    failures += asyncio.run(run_requests(address, args.requests, args.concurrency, seed=1))
    seconds = time.monotonic() - start
    after = {"router": rss_mib(), **replica_rss(router)}
    stats = [asyncio.run(s.handle.stats(timeout_s=30)).engine for s in router.pool.slots if s.handle is not None]
    leftover = [s for s in stats if s.num_running or s.num_waiting or s.num_kv_blocks_used]
    inflight = sum(len(s.inflight) for s in router.pool.slots)
    print(f"{args.requests} requests in {seconds:.0f} s ({args.requests / seconds:.0f} req/s), {failures} failed")
    for name in before:
        print(f"  RSS {name}: {before[name]:.0f} MiB -> {after[name]:.0f} MiB ({after[name] - before[name]:+.1f})")
    print(f"  request state left: {len(leftover)} replicas busy, {inflight} in flight in the router")
    grew = {n: after[n] - before[n] for n in before if after[n] - before[n] > args.rss_budget_mib}
    call(router.stop())
    ok = failures == 0 and not leftover and not inflight and not grew
    print("PASS" if ok else f"FAIL: grew beyond {args.rss_budget_mib:g} MiB: {grew}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
