"""The router's Prometheus metrics (text format on --metrics-port), one registry per router.

These are the names deploy/grafana/nanoserve.json and deploy/prometheus/alerts.yml query; the
replicas' load and cache figures come through here too (the router publishes their stats), so
one scrape of the router sees the whole cluster.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from worker.messages import EngineInfo, ReplicaStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nanoserve_requests", "Finished requests by gRPC status code", ["status"], registry=r)
        self.ttft = Histogram("nanoserve_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("nanoserve_inter_token_latency_seconds", "Mean time between tokens, per request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("nanoserve_tokens", "Prompt (in) and generated (out) tokens", ["direction"], registry=r)
        self.tokens_in, self.tokens_out = self.tokens.labels("in"), self.tokens.labels("out")
        self.prefix_hit_tokens = Counter(
            "nanoserve_prefix_cache_hit_tokens",
            "Prompt tokens a replica served from its prefix cache (over nanoserve_tokens_total{direction=\"in\"}: "
            "the hit rate over any window)", registry=r)
        self.prefix_hit_rate = Gauge("nanoserve_prefix_cache_hit_rate",
                                     "Prompt tokens served by the prefix cache / prompt tokens, since start",
                                     ["replica"], registry=r)
        self.kv_usage = Gauge("nanoserve_kv_cache_usage", "Fraction of KV blocks in use", ["replica"], registry=r)
        self.kv_blocks = Gauge("nanoserve_kv_cache_blocks", "KV blocks the replica's cache holds (an FP8 cache holds "
                               "twice a bf16 one's from the same memory)", ["replica"], registry=r)
        self.queue_depth = Gauge("nanoserve_queue_depth", "Requests waiting in the replica's engine", ["replica"],
                                 registry=r)
        self.inflight = Gauge("nanoserve_inflight_requests", "Requests the router has in flight", ["replica"],
                              registry=r)
        self.replica_up = Gauge("nanoserve_replica_up", "1 while the replica serves", ["replica"], registry=r)
        self.replica_info = Gauge("nanoserve_replica_info", "1 per replica, labelled with its weights' and its KV "
                                  "cache's dtypes (float8_e4m3fn: --kv-cache-dtype fp8)",
                                  ["replica", "dtype", "kv_cache_dtype"], registry=r)
        self.failovers = Counter("nanoserve_failovers", "Requests moved to another replica after a failure",
                                 registry=r)
        self.failovers_waiting = Gauge("nanoserve_failovers_waiting",
                                       "Failovers the retry budget holds back (one runs per replica at a time)",
                                       registry=r)
        self.queries_of_death = Counter(
            "nanoserve_queries_of_death",
            "Requests stopped (ABORTED) because two replicas died while running them, with no token in between",
            registry=r)
        self.slow_clients = Counter("nanoserve_slow_client_streams",
                                    "Streams whose client fell behind: paused (the request left its replica), "
                                    "resumed, or ended (no output taken for the stalled-stream timeout)",
                                    ["event"], registry=r)
        for event in ("paused", "resumed", "ended"):  # exported at 0 from the start, so rate() sees the first
            self.slow_clients.labels(event)
        self.replica_restarts = Counter("nanoserve_replica_restarts", "Replicas restarted after a failure",
                                        ["replica"], registry=r)
        self._server: WSGIServer | None = None

    def add_replica(self, name: str) -> None:
        """Export the replica's series at 0 from the start: dashboards list it before its first stats, and
        increase() sees its first restart (a series that appears at 1 shows no increase)."""
        for per_replica in (self.prefix_hit_rate, self.kv_usage, self.kv_blocks, self.queue_depth, self.inflight,
                            self.replica_up):
            per_replica.labels(name).set(0)
        self.replica_restarts.labels(name)

    def describe_replica(self, name: str, info: EngineInfo) -> None:
        """What a replica's engine is, once it serves: its dtypes and its KV cache's size."""
        self.replica_info.labels(name, info.dtype, info.kv_cache_dtype).set(1)
        self.kv_blocks.labels(name).set(info.num_kv_blocks)

    def publish_stats(self, stats: ReplicaStats) -> None:
        """A replica's latest load and cache figures."""
        engine, name = stats.engine, stats.replica
        self.prefix_hit_rate.labels(name).set(engine.num_prefix_hit_tokens / max(1, engine.num_prompt_tokens))
        self.kv_usage.labels(name).set(engine.num_kv_blocks_used / max(1, engine.num_kv_blocks_total))
        self.queue_depth.labels(name).set(engine.num_waiting)

    def serve(self, port: int, host: str) -> int:
        """Serve /metrics on host:port (0 picks a free port); return the port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
