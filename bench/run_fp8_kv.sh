#!/usr/bin/env bash
# The FP8 KV cache on one GPU, in one device call (issue 20), each step under `timeout -k`: nano-vLLM's workload,
# decode steps and prefill with the model's KV cache and with FP8 side by side, the kernel tests (paged attention,
# the FP8 store), the 64-request identity in the batch-invariant mode with FP8, FP8's accuracy against float32, and
# last how the decode loop's widening and stages cost, block ids loaded a pass ahead as the engine's FP8 decode
# does (bench/fp8_attention_variants.py --ids-ahead). Logs go to
# $OUT (or ./bench-out). About 9 minutes. On the device machine, from the repo root, carrying .whl (bench/NOTES.md):
#   timeout -k 10 590 bash bench/run_fp8_kv.sh
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for kv in auto fp8; do
  timeout -k 10 90 python3 bench/offline_throughput.py --kv-cache-dtype $kv 2>&1 | grep -v Warning | tail -1 \
    | tee -a "$out/offline.txt"
  timeout -k 10 90 python3 bench/decode_roofline.py --kv-cache-dtype $kv 2>&1 | tail -5 | tee -a "$out/decode.txt"
  timeout -k 10 60 python3 bench/prefill.py --kv-cache-dtype $kv 2>&1 | tail -1 | tee -a "$out/prefill.txt"
done
timeout -k 10 200 python3 -m pytest -q -rf -p no:cacheprovider tests/kernels/test_paged_attention.py \
  tests/kernels/test_fused_ops.py tests/engine/test_gpu_runner.py -k "attention or fp8" 2>&1 | tail -8 \
  | tee "$out/kernel_tests.txt"
model=$(python3 -c "import sys; sys.path.insert(0, 'bench'); from common import random_qwen3_0_6b; print(random_qwen3_0_6b())")
timeout -k 10 150 python3 -m tests.engine.batch_invariance_runs --model "$model" --out "$out/identity_fp8.json" \
  --batch-invariant --kv-cache-dtype fp8 \
  && python3 -c "import json, sys; from tests.engine.test_gpu_batch_invariance import differences
print('requests differing from their run alone (seeded, greedy), the mode with fp8:',
      differences(json.load(open(sys.argv[1]))))" "$out/identity_fp8.json" | tee "$out/identity.txt"
timeout -k 10 120 python3 bench/kv_fp8_quality.py 2>&1 | tail -3 | tee "$out/quality.txt"
timeout -k 10 240 python3 bench/fp8_attention_variants.py --ids-ahead 2>&1 | grep -v Warning \
  | tee "$out/variants.txt"
