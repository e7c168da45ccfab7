"""The router's own cost, for `python bench/serving_bench.py --overhead`.

(a) Added latency (`overhead_latency.py`): the same requests straight to a replica, through the router,
    and to a bare gRPC server with the router's API (the transport's floor); TTFT and per-token p50 / p99.
(b) Streaming capacity (`overhead_streaming.py`): many long streams through a router whose replica is a
    fast stand-in; tokens and chunks received per second, and the router process's CPU time.
The router runs as a process of its own (`overhead_router.py`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from overhead_latency import measure_added_latency, print_latency
from overhead_router import OverheadConfig
from overhead_streaming import measure_streaming, print_streaming

__all__ = ["OverheadConfig", "run_overhead"]


def run_overhead(config: OverheadConfig) -> dict[str, Any]:
    """Measure (a) and (b), print them and write OUT/serving_overhead.json."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    latency = measure_added_latency(config)
    print_latency(latency, config)
    streaming = measure_streaming(config)
    print_streaming(streaming, config)
    result = {"config": {**asdict(config), "model": str(config.model)}, "latency": latency, "streaming": streaming}
    (config.out_dir / "serving_overhead.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {config.out_dir / 'serving_overhead.json'}")
    return result
