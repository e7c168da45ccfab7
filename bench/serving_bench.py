"""Serving benchmark: routing policies through a real router over N replicas on local Ray.

For every workload, rate and policy it starts a fresh router in this process (on its own event-loop
thread, as tests/router/conftest.py does) with fresh replicas, so every run starts with cold caches,
warms each replica with one short request, runs the workload through `router.client.AsyncClient`
(streaming, greedy, ignore_eos) and records per request: TTFT, inter-token latency, end-to-end
latency, the replica that served it and its cached / prompt tokens. Workloads are in
`serving_workloads.py`; `--overhead` measures the router itself instead (see `serving_overhead.py`).

Reported per workload x rate x policy: output tok/s and req/s, TTFT / ITL p50 and p99, prefix-cache
hit rate (sum of cached / sum of prompt tokens), requests per replica and load spread (max / mean),
failures. A table goes to stdout, all of it to `--out`/serving_results.json, and TTFT p50 / p99
against request rate per policy to a PNG (needs matplotlib).

CPU (the default preset: a 4-layer random "small" Qwen3, 4 replicas; a few minutes on 2 cores):

    python bench/serving_bench.py [--rates 4,8] [--workloads shared-prefix,multi-turn]
    python bench/serving_bench.py --overhead

Full size, 4 replicas sharing one GPU (random Qwen3-0.6B shape; SGLang's workload sizes: 32 groups
x 16 requests, 2,000-token prefix, 100-token question, 200 output tokens):

    python bench/serving_bench.py --preset full --device cuda --dtype bfloat16 --rates 4,8,16,32

Ray sees the machine's GPUs; when --replicas x --tensor-parallel-size exceeds them, the router's plan
(worker/resources.py) has the replicas share: with k to a GPU, each asks Ray for 1/k of it and sizes its
KV cache from 0.9/k of its memory (`--gpu-memory-utilization` sets that share per replica). On an H200 that
is about 28 GiB of KV cache a replica; `--num-kv-blocks N` makes the cache scarce instead (1,500 blocks of 16
tokens: 24k tokens, 2.6 GiB at Qwen3-0.6B's 112 KiB per token, so that no replica can cache every group's
prefix, as in RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
from serving_report import (  # noqa: E402
    check_targets,
    plot_ttft,
    print_header,
    print_row,
    print_targets,
    record_json,
    summarize,
)
from serving_workloads import (  # noqa: E402
    MultiTurnWorkload,
    RequestRecord,
    SharedPrefixWorkload,
    Workload,
    generated_shared_prefix,
    multi_turn_chat,
    random_tokens,
)

from router.client import AsyncClient  # noqa: E402
from router.config import RouterConfig  # noqa: E402
from router.policies import POLICY_NAMES  # noqa: E402
from router.server import Router  # noqa: E402

T = TypeVar("T")
NAMESPACE = "nanoserve-bench"
WORKLOAD_NAMES = {SharedPrefixWorkload: "shared-prefix", MultiTurnWorkload: "multi-turn"}
ROUTER_DEFAULTS = RouterConfig()

# Random Qwen3 shapes for the default checkpoint: a tiny vocabulary keeps the LM head cheap on CPU.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True),
}

# Defaults of the size flags: `cpu` finishes in minutes on 2 cores; `full` is SGLang's workload on a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(groups=8, per_group=8, prefix_len=256, question_len=16, conversations=16, turns=4, first_len=256,
                turn_len=32, output_len=16, rates="4,8", model_shape="small", device="cpu", num_kv_blocks=96),
    "full": dict(groups=32, per_group=16, prefix_len=2000, question_len=100, conversations=64, turns=6,
                 first_len=1000, turn_len=100, output_len=200, rates="4,8,16,32", model_shape="qwen3-0.6b",
                 device="cuda", num_kv_blocks=None),
}


@dataclass(frozen=True, slots=True)
class SweepConfig:
    """One benchmark sweep: every workload x rate x policy, each on a fresh router."""

    workloads: tuple[Workload, ...]
    policies: tuple[str, ...]
    rates: tuple[float, ...]  # requests/s (shared-prefix) or conversations/s (multi-turn); inf: all at once
    num_replicas: int
    model: Path
    tensor_parallel_size: int = 1  # GPUs per replica
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    out_dir: Path = Path("bench-out/serving")
    plot_path: Path | None = None  # None: out_dir/serving_ttft.png
    seed: int = 0
    prefix_imbalance_ratio: float = ROUTER_DEFAULTS.prefix_imbalance_ratio  # the prefix policy's balance bound
    prefix_imbalance_slack_tokens: int = ROUTER_DEFAULTS.prefix_imbalance_slack_tokens

    def __post_init__(self) -> None:
        for policy in self.policies:
            if policy not in POLICY_NAMES:
                raise ValueError(f"policies: unknown policy {policy!r}; expected some of {', '.join(POLICY_NAMES)}")
        if not self.rates or any(not rate > 0 for rate in self.rates):
            raise ValueError(f"rates: give positive rates (inf for all at once), got {self.rates}")
        if self.num_replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {self.num_replicas}")
        max_model_len = self.engine_kwargs.get("max_model_len")
        for workload in self.workloads:
            if max_model_len is not None and workload.max_len > max_model_len:
                raise ValueError(f"max_model_len: {max_model_len} < {workload.max_len} tokens of {workload}")


class RouterThread:
    """A Router running on its own asyncio loop thread; the benchmark talks to it over gRPC."""

    def __init__(self, config: RouterConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="router-loop", daemon=True)
        self.thread.start()
        self.router = Router(config)
        self._call(self.router.start(), timeout_s=600)
        self.address = f"127.0.0.1:{self.router.port}"

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        """Stop the router; it kills its replicas and waits until their names are free (their processes exit)."""
        self._call(self.router.stop(kill_replicas=True), timeout_s=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def bench_model(shape_name: str) -> Path:
    """The random checkpoint of a named shape, written once into the nanoserve cache."""
    import torch

    from engine.default_model import write_random_qwen3
    from engine.qwen_tokenizer import cache_root

    if shape_name == "qwen3-0.6b":
        from common import random_qwen3_0_6b

        return random_qwen3_0_6b()
    path = cache_root() / f"bench-serving-{shape_name}"
    if not (path / "config.json").is_file():
        write_random_qwen3(path, MODEL_SHAPES[shape_name], dtype=torch.float32, init_std=0.3)
    return path


def init_ray(num_replicas: int) -> None:
    """Local Ray with the machine's GPUs and logical CPUs for every replica (plus room for the ones being torn
    down); the router's plan shares the GPUs when the replicas outnumber them."""
    ray.init(num_cpus=4 * num_replicas + 4, include_dashboard=False, namespace=NAMESPACE,
             logging_level=logging.WARNING)


# --- one run -------------------------------------------------------------------------------------


def run_sweep(config: SweepConfig) -> list[dict[str, Any]]:
    """Every workload x rate x policy, policies back to back per rate (the VM's speed drifts)."""
    runs = []
    print_header()
    for workload in config.workloads:
        for rate in config.rates:
            for policy in config.policies:
                runs.append(run_once(config, workload, policy, rate))
                print_row(runs[-1])
    return runs


def run_once(config: SweepConfig, workload: Workload, policy: str, rate: float) -> dict[str, Any]:
    """Start a fresh router, warm its replicas, run the workload, stop it; the run's summary."""
    router_config = RouterConfig(
        num_replicas=config.num_replicas, model=str(config.model), engine_kwargs=dict(config.engine_kwargs),
        tensor_parallel_size=config.tensor_parallel_size,
        policy=policy, host="127.0.0.1", port=0, metrics_port=None, namespace=NAMESPACE,
        replica_prefix=f"bench-{uuid.uuid4().hex[:6]}", prefix_imbalance_ratio=config.prefix_imbalance_ratio,
        prefix_imbalance_slack_tokens=config.prefix_imbalance_slack_tokens,
    )
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    router = RouterThread(router_config)
    startup_s = time.perf_counter() - started
    try:
        records, wall_s = asyncio.run(drive(router.address, workload, rate, config))
    finally:
        router.stop()
    summary = summarize(records, router_config.replica_names)
    return {"workload": WORKLOAD_NAMES[type(workload)], "policy": policy, "rate": rate,
            "workload_sizes": asdict(workload), "startup_s": startup_s, "wall_s": wall_s,
            # The machine's 1-minute load average: well above its core count means other work competed.
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0], **summary,
            "records": [record_json(r) for r in records]}


async def drive(
    address: str, workload: Workload, rate: float, config: SweepConfig
) -> tuple[list[RequestRecord], float]:
    """Warm up, then run the workload through one AsyncClient; (records, seconds the workload took)."""
    async with AsyncClient(address) as client:
        vocab_size = (await client.model_info(timeout=30)).vocab_size
        await warm_up(client, config.num_replicas, vocab_size, config.seed)
        started_at = time.perf_counter()
        if isinstance(workload, SharedPrefixWorkload):
            records = await generated_shared_prefix(client, workload, rate, vocab_size, config.seed)
        else:
            records = await multi_turn_chat(client, workload, rate, vocab_size, config.seed)
        return records, time.perf_counter() - started_at


async def warm_up(client: AsyncClient, num_replicas: int, vocab_size: int, seed: int) -> None:
    """One short request per replica, all at once so every policy spreads them (their random prompts
    never match the workload's, so the cache statistics are unaffected)."""
    import random

    rng = random.Random(seed + 1000)
    prompts = [random_tokens(rng, 32, vocab_size) for _ in range(num_replicas)]
    await asyncio.gather(*(client.complete(p, max_tokens=4, temperature=0.0, ignore_eos=True) for p in prompts))


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="defaults of the size flags (default: cpu)")
    p.add_argument("--overhead", action="store_true", help="measure the router's own overhead instead (see "
                   "serving_overhead.py); takes the engine flags and --out")
    overhead = p.add_argument_group("--overhead")
    overhead.add_argument("--requests", type=int, default=100, help="(a) sequential requests per path and regime")
    overhead.add_argument("--streams", type=int, default=256, help="(b) concurrent streams")
    overhead.add_argument("--stream-len", type=int, default=500, help="(b) tokens per stream")
    overhead.add_argument("--step-ms", type=float, default=2.0,
                          help="(b) the stand-in model's step time (256 streams x 2 ms: 128k tok/s offered)")
    p.add_argument("--workloads", default="shared-prefix,multi-turn", help="comma-separated: shared-prefix, multi-turn")
    p.add_argument("--policies", default="prefix,least-load,round-robin")
    p.add_argument("--rates", help="comma-separated arrival rates; 'inf' sends everything at once")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix-imbalance-ratio", type=float, default=ROUTER_DEFAULTS.prefix_imbalance_ratio,
                   help="the prefix policy's balance bound, as the router's flag of that name")
    p.add_argument("--prefix-imbalance-slack-tokens", type=int, default=ROUTER_DEFAULTS.prefix_imbalance_slack_tokens,
                   help="the prefix policy's balance bound, as the router's flag of that name")
    p.add_argument("--out", type=Path, default=Path("bench-out/serving"), help="folder for JSON and plots")
    p.add_argument("--plot", type=Path, help="TTFT plot path (default: OUT/serving_ttft.png)")
    sizes = p.add_argument_group("workload sizes (defaults from --preset)")
    for flag in ("groups", "per-group", "prefix-len", "question-len", "conversations", "turns", "first-len",
                 "turn-len", "output-len"):
        sizes.add_argument(f"--{flag}", type=int)
    engine = p.add_argument_group("model and engine")
    engine.add_argument("--model", type=Path, help="checkpoint dir (default: a random checkpoint of --model-shape)")
    engine.add_argument("--model-shape", choices=[*MODEL_SHAPES, "qwen3-0.6b"])
    engine.add_argument("--device")
    engine.add_argument("--dtype", default="auto")
    engine.add_argument("--num-kv-blocks", type=int, help="KV blocks per replica (cpu preset: 96)")
    engine.add_argument("--max-model-len", type=int, help="default: the longest request, rounded up to 256")
    engine.add_argument("--max-num-seqs", type=int, default=256)
    engine.add_argument("--max-num-batched-tokens", type=int, default=8192)
    engine.add_argument("--gpu-memory-utilization", type=float,
                        help="of a GPU, per replica (default: 0.9 on a GPU of its own, 0.9/k for k sharing one)")
    engine.add_argument("--enforce-eager", action="store_true")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica (a sweep flag)")
    args = p.parse_args(argv)
    args.model_shape_default = args.model_shape is None
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def workloads_from(args: argparse.Namespace) -> tuple[Workload, ...]:
    known: dict[str, Workload] = {
        "shared-prefix": SharedPrefixWorkload(args.groups, args.per_group, args.prefix_len, args.question_len,
                                              args.output_len),
        "multi-turn": MultiTurnWorkload(args.conversations, args.turns, args.first_len, args.turn_len,
                                        args.output_len),
    }
    names = [name for name in args.workloads.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"workloads: unknown {unknown[0]!r}; expected some of {', '.join(known)}")
    return tuple(known[name] for name in names)


def engine_kwargs_from(args: argparse.Namespace, workloads: tuple[Workload, ...]) -> dict[str, Any]:
    longest = max((w.max_len for w in workloads), default=256)
    kwargs: dict[str, Any] = dict(
        device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len or -(-longest // 256) * 256,
    )
    if args.gpu_memory_utilization is not None:  # else the router's plan picks it (worker/resources.py)
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.num_kv_blocks is not None:
        kwargs["num_kv_blocks"] = args.num_kv_blocks
    return kwargs


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    workloads = workloads_from(args)
    model = args.model or bench_model("tiny" if args.overhead and args.model_shape_default else args.model_shape)
    init_ray(args.replicas)
    if args.overhead:
        from serving_overhead import OverheadConfig, run_overhead

        kwargs = engine_kwargs_from(args, ())
        run_overhead(OverheadConfig(model=model, engine_kwargs=kwargs, out_dir=args.out, num_requests=args.requests,
                                    num_streams=args.streams, stream_len=args.stream_len, step_ms=args.step_ms))
        return
    config = SweepConfig(
        workloads=workloads, policies=tuple(args.policies.split(",")),
        rates=tuple(float(rate) for rate in args.rates.split(",")), num_replicas=args.replicas, model=model,
        tensor_parallel_size=args.tensor_parallel_size, engine_kwargs=engine_kwargs_from(args, workloads),
        out_dir=args.out, plot_path=args.plot, seed=args.seed,
        prefix_imbalance_ratio=args.prefix_imbalance_ratio,
        prefix_imbalance_slack_tokens=args.prefix_imbalance_slack_tokens,
    )
    runs = run_sweep(config)
    checks = check_targets(runs)
    print_targets(checks)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    results = {"config": {**asdict(config), "model": str(model)}, "targets": checks, "runs": runs}
    (config.out_dir / "serving_results.json").write_text(json.dumps(results, indent=1, default=str))
    plot_path = config.plot_path or config.out_dir / "serving_ttft.png"
    plot_ttft(runs, plot_path)
    print(f"wrote {config.out_dir / 'serving_results.json'} and {plot_path}")


if __name__ == "__main__":
    main()
