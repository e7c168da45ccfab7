"""`python -m router --replicas 4`: serve the nanoserve gRPC API (and, with --http-port, an OpenAI-compatible
HTTP API) from Ray replicas of the engine."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from engine.generation_config import GENERATION_CONFIG_MODES
from router.config import RouterConfig
from router.policies import POLICY_NAMES
from router.reasoning import REASONING_PARSERS
from router.replica_pool import StartupError
from router.server import Router

log = logging.getLogger("router")
DEFAULTS = RouterConfig()  # the one place the defaults are written


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it has none or its help already says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or "") or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The router's flags; `--help` documents each."""
    p = argparse.ArgumentParser(
        prog="python -m router",
        description="Serve the nanoserve gRPC API (nanoserve.v1.NanoServe, plus grpc.health.v1 and server "
        "reflection), and with --http-port an OpenAI-compatible HTTP API, from Ray actor replicas of the engine, "
        "balanced by prefix-cache affinity, with failover.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=DEFAULTS.num_replicas, help="engine replicas to run (Ray actors)")
    p.add_argument("--model", help="Hugging Face model id (e.g. Qwen/Qwen3-0.6B: each node finds it in its Hugging "
                   "Face cache, honouring HF_HOME and HF_HUB_OFFLINE, or downloads it when the hub is reachable) or "
                   "checkpoint directory; without it, the embedded tiny Qwen3 with RANDOM weights (gibberish "
                   "text, for trying things out)")
    p.add_argument("--tensor-parallel-size", type=int, default=DEFAULTS.tensor_parallel_size,
                   help="GPUs per replica (one engine over them)")
    p.add_argument("--policy", choices=POLICY_NAMES, default=DEFAULTS.policy,
                   help="prefix: the replica holding the longest cached prompt prefix unless loads are too "
                   "uneven; least-load: fewest queued + running tokens; round-robin: in turn")
    p.add_argument("--prefix-imbalance-ratio", type=float, default=DEFAULTS.prefix_imbalance_ratio,
                   help="prefix policy: a replica is a candidate for cache affinity only while its load (queued + "
                   "running tokens) is at most RATIO x the least-loaded replica's + --prefix-imbalance-slack-tokens; "
                   "lower keeps loads more even, higher follows the cache further")
    p.add_argument("--prefix-imbalance-slack-tokens", type=int,
                   default=DEFAULTS.prefix_imbalance_slack_tokens,
                   help="prefix policy: the tokens added to that bound (so that light loads do not count as uneven)")
    p.add_argument("--host", default=DEFAULTS.host, help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULTS.port, help="gRPC port (0 picks a free one)")
    p.add_argument("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API on this port "
                   "(/v1/completions, /v1/chat/completions, /v1/models, /health; 0 picks a free one); "
                   "off without it")
    p.add_argument("--ray-address", help="'auto' joins the running Ray cluster (ray start / ray up); "
                   "without it a local Ray instance is started")
    p.add_argument("--metrics-port", type=int, default=DEFAULTS.metrics_port,
                   help="Prometheus metrics port; -1 turns it off")
    p.add_argument("--device", default="auto", help="engine device: auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", help="engine dtype: auto, float32, bfloat16, float16")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="engine KV cache: auto (the model's dtype) or fp8 (8-bit keys and values, e4m3 with a scale "
                   "per layer and KV head that no input exceeds: twice the tokens in the same memory; README)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences an engine batches at once")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="fraction of a GPU's memory each replica may use for weights, activations and KV cache "
                   "(default: 0.9 on a GPU of its own; replicas that share a GPU, when --replicas x "
                   "--tensor-parallel-size exceeds the GPUs, split 0.9 of it evenly)")
    p.add_argument("--num-kv-blocks", type=int, help="KV cache blocks per replica (default: sized from memory)")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction,
                   help="batch-invariant numerics: each token's logits bitwise independent of the batch around it, "
                   "so a stream moved to another replica continues exactly (default: on for replicas on GPUs; CPU "
                   "replicas are invariant anyway); --no-batch-invariant trades that for speed (bench/RESULTS.md)")
    p.add_argument("--generation-config", choices=GENERATION_CONFIG_MODES, default="auto",
                   help="auto: the checkpoint's generation_config.json fills the sampling fields a request leaves "
                   "unset (temperature, top_p, top_k, min_p, repetition_penalty), as in vLLM; vllm: ignore it")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS,
                   help="chat answers' reasoning apart from their reply (vLLM's flag): qwen3 returns the <think> span "
                   "as reasoning_content (HTTP) / reasoning_text (gRPC); off without it")
    p.add_argument("--max-queued-per-replica", type=int, default=DEFAULTS.max_queued_per_replica,
                   help="requests waiting in one replica before it refuses more (RESOURCE_EXHAUSTED)")
    p.add_argument("--drain-timeout", type=float, default=DEFAULTS.drain_timeout_s,
                   help="seconds in-flight streams get to finish on SIGTERM/SIGINT to the router, or on SIGTERM to "
                   "a replica's process (or its drain call); a drained replica's leftovers move to another replica")
    p.add_argument("--stall-timeout", type=float, default=DEFAULTS.stall_timeout_s,
                   help="seconds without a heartbeat from a replica's step thread before it counts as hung and is "
                   "replaced (its requests move on); the thread beats while idle and after every layer of a step, "
                   "so a long prefill is not a hang")
    p.add_argument("--max-stream-buffer-tokens", type=int, default=DEFAULTS.max_stream_buffer_tokens,
                   help="tokens the router holds for a client that reads slower than its request generates (beyond "
                   "gRPC's own flow-control window); past it the request is paused, its KV cache freed, and resumed "
                   "once the client has read them")
    p.add_argument("--stalled-stream-timeout", type=float, default=DEFAULTS.stalled_stream_timeout_s,
                   help="seconds a client may take no output of its stream before the request is stopped and the "
                   "stream ended with RESOURCE_EXHAUSTED")
    p.add_argument("--api-key-file", help="file of API keys, one a line (blank lines and # comments skipped); "
                   "every NanoServe call and /v1 HTTP request must then send 'authorization: Bearer <key>' "
                   "(gRPC health, reflection and HTTP /health stay open)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve over TLS (needs --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--replica-prefix", default=DEFAULTS.replica_prefix,
                   help="replicas are the detached Ray actors PREFIX-0..N-1: a router started again with the same "
                   "prefix re-attaches to them without reloading the model")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def parse_args(argv: list[str] | None = None) -> RouterConfig:
    """The RouterConfig the flags describe (exits with a usage error naming the bad flag)."""
    p = build_parser()
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together: give both or neither")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_kwargs = {
        "device": args.device, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
        "max_num_seqs": args.max_num_seqs,
        "tensor_parallel_size": args.tensor_parallel_size, "generation_config": args.generation_config,
    }
    if args.gpu_memory_utilization is not None:
        engine_kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.max_model_len is not None:
        engine_kwargs["max_model_len"] = args.max_model_len
    if args.num_kv_blocks is not None:
        engine_kwargs["num_kv_blocks"] = args.num_kv_blocks
    try:
        return RouterConfig(
            num_replicas=args.replicas, model=args.model, tensor_parallel_size=args.tensor_parallel_size,
            engine_kwargs=engine_kwargs, policy=args.policy, prefix_imbalance_ratio=args.prefix_imbalance_ratio,
            prefix_imbalance_slack_tokens=args.prefix_imbalance_slack_tokens,
            host=args.host, port=args.port, http_port=args.http_port, ray_address=args.ray_address,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            max_queued_per_replica=args.max_queued_per_replica, drain_timeout_s=args.drain_timeout,
            stall_timeout_s=args.stall_timeout, batch_invariant=args.batch_invariant,
            reasoning_parser=args.reasoning_parser,
            max_stream_buffer_tokens=args.max_stream_buffer_tokens,
            stalled_stream_timeout_s=args.stalled_stream_timeout,
            replica_prefix=args.replica_prefix, api_keys=read_api_keys(args.api_key_file) if args.api_key_file else (),
            tls_cert=read_pem("--tls-cert", args.tls_cert), tls_key=read_pem("--tls-key", args.tls_key),
        )
    except ValueError as e:
        p.error(str(e))
        raise


def read_api_keys(path: str) -> tuple[str, ...]:
    """The keys of an --api-key-file: one a line, blank lines and # comments skipped; ValueError if none."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file: cannot read {path} ({e})") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ValueError(f"--api-key-file: {path} holds no key (one a line; blank lines and # comments are skipped)")
    return keys


def read_pem(flag: str, path: str | None) -> bytes | None:
    """The bytes of a --tls-* file (None without the flag); ValueError naming the flag if unreadable."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path} ({e.strerror})") from None


async def serve(config: RouterConfig) -> None:
    router = Router(config)
    await router.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after Ray's start, which installs handlers of its own
        loop.add_signal_handler(sig, stop.set)
    print(f"nanoserve router listening on {config.host}:{router.port}", flush=True)
    if router.http_port is not None:
        print(f"OpenAI-compatible HTTP API on http://{config.host}:{router.http_port}/v1", flush=True)
    await stop.wait()
    log.info("signal received: draining")
    await router.stop()


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        asyncio.run(serve(config))
    except (ValueError, StartupError) as e:  # found at start: a model that cannot be found, replicas that cannot
        log.error("%s", e)  # be placed or whose engines all fail to load
        sys.exit(2)


if __name__ == "__main__":
    main()
