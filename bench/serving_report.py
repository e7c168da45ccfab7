"""Results of the serving benchmark: per-run summaries, the table, the issue's targets, the TTFT plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from serving_workloads import RequestRecord


def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    array = np.asarray(values) * 1e3
    return {"p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)),
            "mean": float(array.mean())}


def summarize(records: list[RequestRecord], replica_names: list[str]) -> dict[str, Any]:
    """Throughput, latency percentiles, prefix-cache hit rate and load spread of one run."""
    ok = [r for r in records if r.error is None]
    duration_s = max((r.sent_at + (r.e2e_s or 0.0) for r in records), default=0.0)
    per_replica = dict.fromkeys(replica_names, 0)
    tokens_per_replica = dict.fromkeys(replica_names, 0)
    for r in ok:
        per_replica[r.replica] = per_replica.get(r.replica, 0) + 1
        computed = r.num_prompt_tokens - r.num_cached_tokens + r.num_output_tokens
        tokens_per_replica[r.replica] = tokens_per_replica.get(r.replica, 0) + computed
    num_output = sum(r.num_output_tokens for r in ok)
    num_prompt = sum(r.num_prompt_tokens for r in ok)
    return {
        "num_requests": len(records),
        "num_failures": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration_s,
        "requests_per_s": len(ok) / duration_s if duration_s else 0.0,
        "output_tokens_per_s": num_output / duration_s if duration_s else 0.0,
        "ttft_ms": percentiles_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": percentiles_ms([gap for r in ok for gap in r.token_gaps_s]),
        "e2e_ms": percentiles_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "prefix_hit_rate": sum(r.num_cached_tokens for r in ok) / max(1, num_prompt),
        "requests_per_replica": per_replica,
        "load_spread": spread(list(per_replica.values())),
        # Work each replica did: prompt tokens it computed (not cached) + tokens it generated.
        "computed_tokens_per_replica": tokens_per_replica,
        "load_spread_tokens": spread(list(tokens_per_replica.values())),
    }


def spread(loads: list[int]) -> float:
    """Max / mean; 1.0 is perfectly even."""
    mean = sum(loads) / len(loads) if loads else 0
    return max(loads) / mean if mean else 0.0


def record_json(r: RequestRecord) -> dict[str, Any]:
    itl = sum(r.token_gaps_s) / len(r.token_gaps_s) if r.token_gaps_s else None
    return {"key": r.key, "sent_at": r.sent_at, "ttft_s": r.ttft_s, "e2e_s": r.e2e_s, "mean_itl_s": itl,
            "prompt_tokens": r.num_prompt_tokens, "cached_tokens": r.num_cached_tokens,
            "output_tokens": r.num_output_tokens, "chunks": r.num_chunks, "replica": r.replica, "error": r.error}


COLUMNS = ("workload", "rate", "policy", "start s", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
           "hit rate", "per replica", "spread", "fail", "load")


def print_header() -> None:
    print(" | ".join(COLUMNS), flush=True)


def print_row(run: dict[str, Any]) -> None:
    ms = lambda value: "-" if value is None else f"{value:.1f}"  # noqa: E731
    counts = "/".join(str(n) for n in run["requests_per_replica"].values())
    cells = (run["workload"], f"{run['rate']:g}", run["policy"], f"{run['startup_s']:.0f}",
             f"{run['requests_per_s']:.2f}",
             f"{run['output_tokens_per_s']:.0f}", ms(run["ttft_ms"]["p50"]), ms(run["ttft_ms"]["p99"]),
             ms(run["itl_ms"]["p50"]), ms(run["itl_ms"]["p99"]), f"{run['prefix_hit_rate']:.1%}", counts,
             f"{run['load_spread']:.2f}", str(run["num_failures"]), f"{run['load_avg_after']:.1f}")
    print(" | ".join(cells), flush=True)


def check_targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets on the shared-prefix workload, at each rate where prefix and round-robin both ran."""
    by_key = {(r["workload"], r["rate"], r["policy"]): r for r in runs}
    checks = []
    for (workload, rate, policy), prefix in by_key.items():
        baseline = by_key.get((workload, rate, "round-robin"))
        if workload != "shared-prefix" or policy != "prefix" or baseline is None:
            continue
        hit_ratio = prefix["prefix_hit_rate"] / max(1e-9, baseline["prefix_hit_rate"])
        ttft_ratio = (baseline["ttft_ms"]["p50"] or 0.0) / max(1e-9, prefix["ttft_ms"]["p50"] or 0.0)
        checks.append({"rate": rate, "hit_rate_ratio": hit_ratio, "hit_rate_ok": hit_ratio >= 2.0,
                       "ttft_p50_ratio": ttft_ratio, "ttft_ok": ttft_ratio >= 1.5,
                       "max_load_spread": prefix["load_spread"], "spread_ok": prefix["load_spread"] <= 1.5,
                       "failures": sum(r["num_failures"] for r in runs if r["rate"] == rate)})
    return checks


def print_targets(checks: list[dict[str, Any]]) -> None:
    mark = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    for c in checks:
        print(f"targets @ {c['rate']:g} req/s (shared-prefix, prefix vs round-robin): "
              f"hit rate {c['hit_rate_ratio']:.2f}x (>= 2x: {mark(c['hit_rate_ok'])}), "
              f"TTFT p50 {c['ttft_p50_ratio']:.2f}x lower (>= 1.5x: {mark(c['ttft_ok'])}), "
              f"load spread {c['max_load_spread']:.2f} (<= 1.5: {mark(c['spread_ok'])}), "
              f"failures {c['failures']}")


def plot_ttft(runs: list[dict[str, Any]], path: Path) -> None:
    """TTFT p50 (solid) and p99 (dashed) against rate, one line pair per policy, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        for i, policy in enumerate(dict.fromkeys(r["policy"] for r in runs)):
            points = sorted((r["rate"], r["ttft_ms"]) for r in runs if r["workload"] == workload
                            and r["policy"] == policy and r["ttft_ms"]["p50"] is not None)
            rates = [rate for rate, _ in points]
            color = f"C{i}"
            ax.plot(rates, [t["p50"] for _, t in points], "o-", color=color, label=f"{policy} p50")
            ax.plot(rates, [t["p99"] for _, t in points], "s--", color=color, label=f"{policy} p99")
        unit = "conversations/s" if workload == "multi-turn" else "requests/s"
        ax.set(title=workload, xlabel=f"arrival rate ({unit})", ylabel="TTFT (ms)", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
