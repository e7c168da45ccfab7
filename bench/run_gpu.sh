#!/usr/bin/env bash
# Every GPU check and benchmark in one go (one device call): kernel tests, then the benchmarks.
# Logs go to $OUT (or ./bench-out). On the device machine, run from the repo root.
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest tests/kernels tests/engine/test_gpu_runner.py -q -p no:cacheprovider 2>&1 | tail -4 | tee "$out/kernel_tests.txt"
python3 bench/fused_ops.py 2>&1 | tail -7 | tee "$out/fused.txt"
python3 bench/offline_throughput.py "$@" 2>&1 | tail -4 | tee "$out/offline.txt"
python3 bench/decode_roofline.py 2>&1 | tail -5 | tee "$out/decode.txt"
python3 bench/prefill.py 2>&1 | tail -3 | tee "$out/prefill.txt"
python3 bench/step_profile.py 2>&1 | tail -9 | tee "$out/step_profile.txt"
