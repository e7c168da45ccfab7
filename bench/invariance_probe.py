"""Which kernels make a token's numbers depend on the batch around it (GPU, bf16, Qwen3-0.6B shapes).

For each kernel on the engine's path, one row (a token, or a sequence's last token) is computed alone and
then inside batches of other rows, or through the other code path the engine may take for it (prefill
instead of decode, another KV split count, the multi-head rotary variant); the report says, per case,
whether that row's output stayed bitwise equal, and the largest difference. The batch-invariant mode
(issue 18) must make every line say "same" (the attention probe reports mode off and the mode apart).

    python bench/invariance_probe.py                       # cuBLAS as the engine uses it
    CUBLAS_WORKSPACE_CONFIG=:0:0 python bench/invariance_probe.py --only gemm   # cuBLAS without workspace
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels.paged_attention import paged_attention  # noqa: E402
from kernels.rms_norm import rms_norm  # noqa: E402
from kernels.rotary_kv_store import rotary_kv_store  # noqa: E402

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1024, 16, 8, 128, 151936
GEMMS = {"qkv": (1024, 4096), "o_proj": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024),
         "lm_head": (1024, VOCAB)}
ROWS = (1, 2, 3, 8, 16, 24, 64, 128, 256, 512, 2048, 8192)


def report(name: str, reference: torch.Tensor, variants: dict[str, torch.Tensor]) -> None:
    """One line: which variants differ from the reference row, and by how much."""
    differ = {k: (v.float() - reference.float()).abs().max().item() for k, v in variants.items()
              if not torch.equal(v, reference)}
    verdict = "same" if not differ else "DIFFER " + ", ".join(f"{k} ({d:.2g})" for k, d in differ.items())
    print(f"{name:42s} {verdict}", flush=True)


def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE)


def probe_gemms() -> None:
    print(f"-- GEMM (F.linear, cuBLAS; CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')!r}); "
          f"row 0 alone vs inside M rows")
    for name, (k, n) in GEMMS.items():
        w = rand(n, k, scale=0.02)
        x = rand(max(ROWS), k)
        alone = F.linear(x[:1], w)[0]
        report(f"{name} [{k} -> {n}]", alone, {f"M={m}": F.linear(x[:m], w)[0] for m in ROWS[1:]})


def probe_attention() -> None:
    print("-- paged attention: the last token of a 1000-token sequence, decode path with 1 split as reference; "
          "mode off, then the batch-invariant mode (no splits there)")
    page, context = 16, 1000
    blocks = -(-context // page)
    num_seqs = 64
    k_cache = rand(num_seqs * blocks, page, KV_HEADS, HEAD_DIM)
    v_cache = rand(num_seqs * blocks, page, KV_HEADS, HEAD_DIM)
    tables = torch.arange(num_seqs * blocks, device=DEVICE, dtype=torch.int32).view(num_seqs, blocks)
    q_all = rand(context, HEADS, HEAD_DIM)  # the sequence's queries (only the last one's output is compared)

    def run(q: torch.Tensor, q_lens: list[int], seq_lens: list[int], splits: int, invariant: bool) -> torch.Tensor:
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32)
        out = paged_attention(q, k_cache, v_cache, starts, torch.tensor(seq_lens, device=DEVICE, dtype=torch.int32),
                              tables[: len(seq_lens)], HEAD_DIM**-0.5, max(q_lens), splits, batch_invariant=invariant)
        return out[q_lens[0] - 1]  # sequence 0's last token

    last = q_all[-1:]
    for invariant in (False, True):
        reference = run(last, [1], [context], 1, invariant)
        variants = {} if invariant else {f"decode, {s} splits": run(last, [1], [context], s, invariant)
                                         for s in (2, 4, 8, 16)}
        for batch in (8, 64):
            others = rand(batch - 1, HEADS, HEAD_DIM)
            variants[f"decode in a batch of {batch}"] = run(torch.cat([last, others]), [1] * batch,
                                                            [context] + [context - 37] * (batch - 1), 1, invariant)
        for chunk in (2, 64, 512, context):
            variants[f"prefill chunk of the last {chunk}"] = run(q_all[-chunk:], [chunk], [context], 1, invariant)
        # Mixed steps: the token as a one-token "chunk" of a prefill launch, and its chunk beside another sequence's.
        variants["decode row in a prefill launch"] = run(torch.cat([last, q_all[:64]]), [1, 64], [context, 64], 1,
                                                         invariant)
        variants["chunk beside another's"] = run(torch.cat([q_all[-64:], rand(100, HEADS, HEAD_DIM)]), [64, 100],
                                                 [context, 700], 1, invariant)
        report(f"attention, last token{', the mode' if invariant else ''}", reference, variants)


def probe_rms_norm() -> None:
    print("-- fused residual + RMSNorm: row 0 alone vs inside M rows")
    weight = rand(HIDDEN)
    x, residual = rand(max(ROWS), HIDDEN), rand(max(ROWS), HIDDEN)
    alone = rms_norm(x[:1], weight, 1e-6, residual[:1])
    report("rms_norm output", alone[0][0], {f"M={m}": rms_norm(x[:m], weight, 1e-6, residual[:m])[0][0]
                                             for m in ROWS[1:]})


def probe_rotary() -> None:
    print("-- q/k norm + rotary + KV store: a 1,023-token step (a head per program) vs its tokens inside T tokens "
          "(8 heads per program)")
    qkv = rand(4096, (HEADS + 2 * KV_HEADS) * HEAD_DIM, scale=4.0)
    positions = torch.arange(4096, device=DEVICE)
    half = torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM
    freqs = torch.outer(torch.arange(8192, device=DEVICE).float(), 1.0 / (1e6**half))
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    qw, kw = rand(HEAD_DIM), rand(HEAD_DIM)

    def run(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache = torch.zeros(n, 1, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        v_cache = torch.zeros_like(k_cache)
        q = rotary_kv_store(qkv[:n], positions[:n], qw, kw, cos, sin, 1e-6, HEADS, KV_HEADS, k_cache, v_cache,
                            torch.arange(n, device=DEVICE))
        return q[:1023], k_cache[:1023]

    q_alone, k_alone = run(1023)
    runs = {f"T={t}": run(t) for t in (1024, 4096)}
    report("rotary q", q_alone, {k: v[0] for k, v in runs.items()})
    report("rotary k (cache)", k_alone, {k: v[1] for k, v in runs.items()})


def probe_logits() -> None:
    print("-- log_softmax and argmax of a logits row: alone vs inside M rows")
    logits = rand(256, VOCAB, scale=3.0)
    alone = torch.log_softmax(logits[:1].float(), -1)[0]
    report("log_softmax", alone, {f"M={m}": torch.log_softmax(logits[:m].float(), -1)[0] for m in (2, 64, 256)})
    argmax = logits[:1].float().argmax(-1)
    report("argmax", argmax, {f"M={m}": logits[:m].float().argmax(-1)[:1] for m in (2, 64, 256)})
    for name, fn in {"softmax": lambda x: x.softmax(-1), "sort": lambda x: x.sort(-1, descending=True).values,
                     "cumsum of softmax": lambda x: x.softmax(-1).cumsum(-1),
                     "topk(20)": lambda x: x.topk(20, dim=-1).values}.items():
        ref = fn(logits[:1].float())[0]
        report(name, ref, {f"M={m}": fn(logits[:m].float())[0] for m in (2, 8, 64, 256)})


def probe_engine() -> None:
    print("-- the engine in the batch-invariant mode (eager): a prompt's last token alone vs after another prompt in "
          "the same prefill step, module by module (first differing modules)")
    from common import random_qwen3_0_6b

    from engine import LLMEngine, SamplingParams

    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: object, args: object, output: object) -> None:
            out = output[0] if isinstance(output, tuple) else output
            seen.setdefault(name, []).append(out.reshape(out.shape[0], -1)[-1].clone())
        return hook

    def run(prompts: list[list[int]]) -> list[dict]:
        """On a fresh engine (no prefix hits), hooks on every module down to the layers' parts."""
        with LLMEngine(random_qwen3_0_6b(), batch_invariant=True, enforce_eager=True, max_model_len=4096) as engine:
            for name, module in engine.model_runner.model.named_modules():
                if name and name.count(".") <= 4 and not isinstance(module, torch.nn.ModuleList):
                    module.register_forward_hook(keep(name))
            greedy = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)
            return engine.generate(prompts, greedy, use_tqdm=False)  # type: ignore[return-value]

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 150000, (1500,), generator=g).tolist()
    b = torch.randint(0, 150000, (900,), generator=g).tolist()
    [alone] = run([a])
    first = {name: outs[0] for name, outs in seen.items()}
    seen.clear()
    b_then_a = run([b, a])
    print(f"alone: token {alone['token_ids']} logprob {alone['logprobs'][0]['logprob']!r}; after another prompt: "
          f"token {b_then_a[1]['token_ids']} logprob {b_then_a[1]['logprobs'][0]['logprob']!r}, cached "
          f"{b_then_a[1]['num_cached_tokens']}")
    differing = [n for n, outs in seen.items() if n in first and not torch.equal(outs[0], first[n])]
    print("modules whose last row differs, in call order:", differing[:12], f"({len(differing)} in all)")


PROBES: dict[str, Callable[[], None]] = {"gemm": probe_gemms, "attention": probe_attention, "rms_norm": probe_rms_norm,
                                         "rotary": probe_rotary, "logits": probe_logits, "engine": probe_engine}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(PROBES), action="append", help="run just these probes (repeatable)")
    args = p.parse_args()
    torch.manual_seed(0)
    for name in args.only or PROBES:
        PROBES[name]()


if __name__ == "__main__":
    main()
