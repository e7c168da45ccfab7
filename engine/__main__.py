"""`python -m engine "prompt" --max-tokens 32`: an offline generation demo.

Without --model it runs the embedded tiny Qwen3 with RANDOM weights (real tokenizer, gibberish
text): a check that the engine works on this machine. For real output pass --model: a Hugging Face
model id (Qwen/Qwen3-0.6B, found in the Hugging Face cache, downloaded there when missing and the
hub is reachable) or a checkpoint directory.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys

from engine.architectures import SUPPORTED_ARCHITECTURES
from engine.generation_config import GENERATION_CONFIG_MODES
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

log = logging.getLogger("engine")

# The engine flags' defaults are LLMEngine's own, the sampling flags' SamplingParams' (except where the demo
# differs on purpose: 32 tokens, greedy): --help shows each with %(default)s, defined once.
ENGINE_DEFAULTS = {name: p.default for name, p in inspect.signature(LLMEngine).parameters.items()}
SAMPLING_DEFAULTS = SamplingParams()


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags; --help shows each default once, from the one place it is defined."""
    p = argparse.ArgumentParser(
        prog="python -m engine",
        description=f"{__doc__}\nSupported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompts", nargs="+", help="one or more prompts; each is generated independently, in one batch")
    p.add_argument("--model", default=ENGINE_DEFAULTS["model"],
                   help="Hugging Face model id or checkpoint directory (default: the embedded tiny random model); "
                   "ids honour HF_HOME and HF_HUB_OFFLINE")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy; higher = more random (default %(default)s)")
    def model_default(value: object) -> str:
        return f"default: the checkpoint's generation_config.json, else {value}"

    g.add_argument("--top-p", type=float,
                   help=f"nucleus sampling mass in (0, 1]; 1 = off ({model_default(SAMPLING_DEFAULTS.top_p)})")
    g.add_argument("--top-k", type=int,
                   help=f"sample among the k most likely tokens; -1 = off ({model_default(SAMPLING_DEFAULTS.top_k)})")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability; 0 = off "
                   f"({model_default(SAMPLING_DEFAULTS.min_p)})")
    g.add_argument("--seed", type=int, help="random seed for sampling (reproducible output)")
    g.add_argument("--stop", action="append", help="stop string (repeatable); text is cut before it")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    e = p.add_argument_group("engine")
    e.add_argument("--device", default=ENGINE_DEFAULTS["device"],
                   help="cpu, cuda or cuda:N (default %(default)s: CUDA if available)")
    e.add_argument("--dtype", default=ENGINE_DEFAULTS["dtype"],
                   help="float32, bfloat16 or float16 (default %(default)s: the checkpoint's; float32 on CPU)")
    e.add_argument("--kv-cache-dtype", default=ENGINE_DEFAULTS["kv_cache_dtype"],
                   help="fp8: keys and values in 8 bits (e4m3, a scale per layer and KV head that no input exceeds): "
                   "twice the tokens in the same memory, for a small error (README) (default %(default)s: the "
                   "model's dtype)")
    e.add_argument("--max-model-len", type=int, default=ENGINE_DEFAULTS["max_model_len"],
                   help="longest prompt + output in tokens (default: the model's)")
    e.add_argument("--max-num-seqs", type=int, default=ENGINE_DEFAULTS["max_num_seqs"],
                   help="most requests in one batch (default %(default)s)")
    e.add_argument("--max-num-batched-tokens", type=int, default=ENGINE_DEFAULTS["max_num_batched_tokens"],
                   help="token budget per step (default: 8192 on a GPU, 2048 on CPU)")
    e.add_argument("--gpu-memory-utilization", type=float, default=ENGINE_DEFAULTS["gpu_memory_utilization"],
                   help="GPU memory fraction to use (default %(default)s)")
    e.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs (GPU only)")
    e.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction,
                   default=ENGINE_DEFAULTS["batch_invariant"],
                   help="GPU: each token's logits bitwise independent of the batch around it (default: off)")
    e.add_argument("--generation-config", choices=GENERATION_CONFIG_MODES,
                   default=ENGINE_DEFAULTS["generation_config"],
                   help="auto: the checkpoint's generation_config.json fills the sampling fields a request leaves "
                   "unset; vllm: ignore it (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(
            args.model, device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
            batch_invariant=args.batch_invariant, generation_config=args.generation_config,
        )
        given = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                     max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos, seed=args.seed)
        params = engine.default_sampling_params(**{k: v for k, v in given.items() if v is not None})
        prompts = [_chat(engine, p) if args.chat else p for p in args.prompts]
        results = engine.generate(prompts, params, use_tqdm=not args.no_progress)
        assert isinstance(results, list)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, result in zip(args.prompts, results):
        summary = f"[{len(result['token_ids'])} tokens, finish: {result['finish_reason']}]"
        print(f"\n>>> {prompt}\n{result['text']}\n{summary}")
    return 0


def _chat(engine: LLMEngine, prompt: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])


if __name__ == "__main__":
    sys.exit(main())
