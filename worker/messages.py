"""The typed messages a replica exchanges with its router across the Ray boundary.

Plain data only (str, int, float, bool, None, lists, dicts, in dataclasses): they pickle cheaply,
hold no torch object, and convert field by field to msgpack or protobuf. This module imports
nothing heavy, so the router can unpickle them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from engine.outputs import EngineStats
from engine.sequence import FinishReason

# Why a request was not queued; each maps onto one gRPC status of DESIGN.md.
ErrorCode = Literal["invalid_argument", "resource_exhausted", "unavailable"]
# loading: building its engine; running: stepping or idle; failed: the engine failed to load or raised (see
# `error`) and the replica must be replaced; stopped: shut down on request.
ReplicaState = Literal["loading", "running", "failed", "stopped"]


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to queue: prompt token ids, and engine `SamplingParams` fields by name. After a failover
    the prompt ends with the `resumed_tokens` an earlier attempt streamed (see `LLMEngine.add_request`)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    resumed_tokens: int = 0


@dataclass(frozen=True, slots=True)
class SubmitError:
    """Why one `RequestSpec` was not queued. `message` names the bad field for invalid_argument."""

    code: ErrorCode
    message: str


class LogprobEntry(TypedDict):
    """One sampled token's log-probability and the top-N alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float]


@dataclass(slots=True)
class RequestDelta:
    """One choice's progress since the previous batch: the tokens choice `index` of the request gained, and
    whether it is done (a request of n choices is done once each has said so).

    Mutable because the outbox merges a choice's steps into one delta before sending it.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    logprobs: list[LogprobEntry]  # one per new token if the request asked for logprobs, else empty
    index: int = 0  # the choice (SamplingParams.n)


@dataclass(frozen=True, slots=True)
class StepEvents:
    """Everything a replica did since its previous batch: one message for all its requests.

    `seq` counts batches from 1 within an `epoch` (one engine's life). Every batch gets a seq, even
    one the replica had to drop (its consumer fell too far behind, or was replaced while the batch
    was in flight), so a gap in the seqs a consumer sees means it lost data: it must re-snapshot
    the KV view and recover the requests it has in flight on this replica.

    A subscription's first batch comes at once with whatever was pending, and may be empty.

    `kv_stored` / `kv_evicted` hold each block hash's last change in the window (the two never share
    a hash). Applied as set add / discard, they bring a view that was exact at any step inside the
    window (a `KVSnapshot` with seq == self.seq - 1, or an earlier batch) to the state at its end.
    """

    replica: str
    epoch: str
    seq: int
    num_steps: int  # engine steps merged into this batch (more than 1 when the consumer lagged)
    outputs: list[RequestDelta]  # at most one per choice of a request, except a finished id reused later
    kv_stored: list[int]
    kv_evicted: list[int]


@dataclass(frozen=True, slots=True)
class KVSnapshot:
    """Every block hash resident on a replica. Batches with seq > `seq`, applied on top, keep it exact."""

    replica: str
    epoch: str
    seq: int  # the latest batch seq already reflected here (0: none yet)
    block_hashes: list[int]


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the router must know of a replica's engine: limits for validation, the block size for hashing."""

    model_dir: str
    random_weights: bool  # the embedded default model (no --model given)
    max_model_len: int
    vocab_size: int
    block_size: int
    tensor_parallel_size: int
    dtype: str
    kv_cache_dtype: str  # the model's dtype, or float8_e4m3fn (engine/kv_scales.py)
    eos_token_ids: list[int]
    num_kv_blocks: int
    sampling_defaults: dict[str, float | int]  # for a request's unset fields (engine/generation_config.py)


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    """Liveness from the replica's step thread: its heartbeat (see engine/heartbeat.py), which beats while
    idle and through a long step, and stops only when that thread is stuck.

    Ages are measured on the replica's own clock, so clock skew between hosts does not matter.
    """

    replica: str
    epoch: str
    state: ReplicaState
    draining: bool  # takes no new request; exits once those it has are done (or its drain timeout passed)
    has_work: bool
    num_steps: int
    seconds_since_heartbeat: float
    step_running_s: float | None  # how long the step in progress has run; None between steps
    step_num_tokens: int  # tokens the step in progress computes
    error: str | None  # why the replica failed, when it did


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """A replica's load and cache: its engine's stats plus the bound on its queue."""

    replica: str
    epoch: str
    num_steps: int
    max_queued_requests: int  # engine.num_waiting beyond this is refused as resource_exhausted
    engine: EngineStats
