"""The router's settings: one frozen, validated object built from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router.policies import POLICY_NAMES
from router.reasoning import REASONING_PARSERS
from worker.replica import DRAIN_TIMEOUT_S

NAMESPACE = "nanoserve"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    num_replicas: int = 1
    model: str | None = None  # None: the embedded tiny random Qwen3
    tensor_parallel_size: int = 1
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to LLMEngine as is
    # Batch-invariant numerics (LLMEngine's batch_invariant), so a request moved to another replica continues
    # exactly; None: on for replicas on GPUs (CPU replicas are invariant anyway).
    batch_invariant: bool | None = None
    # Chat answers' reasoning apart from their text (router/reasoning.py: "qwen3"); None: text as generated.
    reasoning_parser: str | None = None
    policy: str = "prefix"
    # The prefix policy weighs cache affinity only among replicas whose load is at most
    # ratio x (the least load) + slack tokens; past that bound, load wins.
    prefix_imbalance_ratio: float = 1.5
    prefix_imbalance_slack_tokens: int = 4096
    host: str = "0.0.0.0"
    port: int = 50051
    http_port: int | None = None  # None: no OpenAI-compatible HTTP API; 0 picks a free port
    ray_address: str | None = None  # None: start a local Ray; "auto": join the running cluster
    metrics_port: int | None = 9400  # None: no metrics endpoint
    namespace: str = NAMESPACE
    replica_prefix: str = "nanoserve-replica"
    max_queued_per_replica: int = 256  # requests waiting in a replica's engine before it refuses more
    max_inflight_per_replica: int = 512  # requests the router places on one replica before RESOURCE_EXHAUSTED
    # A request whose replica failed this many times is not moved again: it may be what kills them.
    max_failovers_per_request: int = 3
    health_interval_s: float = 1.0
    health_timeout_s: float = 5.0  # a health call slower than this marks the replica down
    # A replica whose step thread has not beaten for this long is hung, and down. The thread beats after every
    # layer of a step and while idle, so this bounds one layer's time, not a step's (a long prefill is fine).
    stall_timeout_s: float = 30.0
    # On SIGTERM to the router or a replica, how long its streams may take to finish.
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    # A client that reads slower than its request generates: past this many tokens waiting for it (beyond what
    # gRPC's flow-control window holds), the request is paused: taken off its replica, its KV blocks freed, and
    # resumed from where it stopped once the client has read them. Bounds the router's memory per stream.
    max_stream_buffer_tokens: int = 1024
    stalled_stream_timeout_s: float = 60.0  # a stream whose client takes nothing for this long is ended
    max_message_bytes: int = 4 << 20  # larger gRPC requests get RESOURCE_EXHAUSTED
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no API key needed; else one of these
    tls_cert: bytes | None = None  # PEM certificate chain; with tls_key, serve over TLS
    tls_key: bytes | None = field(default=None, repr=False)  # PEM private key

    def __post_init__(self) -> None:
        for name in ("num_replicas", "tensor_parallel_size", "max_queued_per_replica", "max_inflight_per_replica",
                     "max_stream_buffer_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got "
                             f"{self.reasoning_parser!r}")
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}")
        if not self.prefix_imbalance_ratio >= 1:  # also refuses NaN
            raise ValueError(f"prefix_imbalance_ratio must be >= 1, got {self.prefix_imbalance_ratio!r}")
        slack = self.prefix_imbalance_slack_tokens
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(f"prefix_imbalance_slack_tokens must be an integer >= 0, got {slack!r}")
        for name in ("health_interval_s", "health_timeout_s", "stall_timeout_s", "drain_timeout_s",
                     "stalled_stream_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for i, key in enumerate(self.api_keys):  # never echo a key: errors show where it is, not what it is
            if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
                raise ValueError(f"api_keys[{i}] must be printable ASCII without spaces (as gRPC metadata carries it)")
        for name in ("port", "http_port"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536):
                raise ValueError(f"{name} must be in [0, 65535], got {value!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")

    @property
    def replica_orphan_timeout_s(self) -> float:
        """How long a replica with requests may hear nothing from this router before it aborts them as orphans.
        Longer than any silence of a live router, which checks each replica every health_interval_s and gives a
        check health_timeout_s: one answered slowly, the interval, then one that reaches the replica slowly."""
        return 2 * self.health_timeout_s + self.health_interval_s

    @property
    def replica_names(self) -> list[str]:
        return [f"{self.replica_prefix}-{i}" for i in range(self.num_replicas)]
