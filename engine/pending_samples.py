"""Tokens a launched step is sampling, on their way from the device to the host.

The copies start as soon as the sampler is queued and the host reads them only when it has planned
and launched the next step, so the device never waits for the host in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampler import SamplerOutput
from engine.sequence import Sequence, TokenLogprobs


@dataclass(slots=True)
class PendingSamples:
    """One step's sampled tokens (row i belongs to `seqs[i]`) and, when asked for, their logprobs."""

    seqs: list[Sequence]
    token_ids: torch.Tensor | None  # [S] int64 on the host (pinned), valid once `ready` has fired
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # chosen [S], top ids [S, N], top [S, N]
    ready: torch.cuda.Event | None  # None: already on the host (CPU)

    @classmethod
    def none(cls) -> PendingSamples:
        """A step in which no sequence samples (only prefill chunks)."""
        return cls([], None, None, None)

    @classmethod
    def start(cls, seqs: list[Sequence], out: SamplerOutput) -> PendingSamples:
        """Queue the copies of `out` to the host behind the sampler, without waiting for either."""
        on_device = out.token_ids.is_cuda
        tensors = [out.token_ids]
        if out.logprobs is not None:
            assert out.top_token_ids is not None and out.top_logprobs is not None
            tensors += [out.logprobs, out.top_token_ids, out.top_logprobs]
        host = [t.to("cpu", non_blocking=True) for t in tensors] if on_device else tensors
        ready = None
        if on_device:  # recorded behind the copies, on the stream of the device that runs them
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(out.token_ids.device))
        logprobs = (host[1], host[2], host[3]) if len(host) == 4 else None
        return cls(seqs, host[0], logprobs, ready)

    def results(self) -> list[tuple[int, TokenLogprobs | None]]:
        """(token id, logprobs) per row, waiting for the device if it is not done yet."""
        if self.token_ids is None:
            return []
        if self.ready is not None:
            self.ready.synchronize()
        token_ids: list[int] = self.token_ids.tolist()
        if self.logprobs is None:
            return [(t, None) for t in token_ids]
        chosen, top_ids, top_lps = (t.tolist() for t in self.logprobs)
        results: list[tuple[int, TokenLogprobs | None]] = []
        for i, seq in enumerate(self.seqs):
            n = seq.params.logprobs
            lp = None if n is None else TokenLogprobs(chosen[i], dict(zip(top_ids[i][:n], top_lps[i][:n])))
            results.append((token_ids[i], lp))
        return results
