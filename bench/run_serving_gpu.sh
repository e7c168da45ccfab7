#!/usr/bin/env bash
# Serving on a multi-GPU device machine in one call (issues 7 and 8): the serving benchmark with TP=2
# replicas, the replica-kill chaos tests with one GPU per replica, and the router's overhead on the host's
# many cores. Logs and results go to $OUT (or ./bench-out). On the device machine, from the repo root,
# with Ray carried (../shared/devtools/device-pkgs.sh) and the wheels the image lacks (bench/NOTES.md):
#   bash bench/run_serving_gpu.sh [REPLICAS]        (REPLICAS x TP=2 needs 2 x REPLICAS GPUs; default 1)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
replicas=${1:-1}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
timeout -k 10 200 python3 bench/serving_bench.py --preset full --device cuda --dtype bfloat16 \
  --replicas "$replicas" --tensor-parallel-size 2 --num-kv-blocks 6000 --rates 16,32 --policies prefix \
  --workloads shared-prefix --out "$out/serving" > "$out/serving.txt" 2>&1
grep -v "Warning\|INFO\|WARN" "$out/serving.txt" | tail -8
NANOSERVE_TEST_DEVICE=cuda timeout -k 10 200 python3 -m pytest tests/chaos/test_replica_failures.py -q \
  -p no:cacheprovider -k "killed_mid_stream or before_the_first_token" 2>&1 | tail -15 | tee "$out/chaos.txt"
timeout -k 10 150 python3 bench/serving_bench.py --overhead --out "$out/overhead" > "$out/overhead.txt" 2>&1
tail -12 "$out/overhead.txt"
