#!/usr/bin/env bash
# The batch-invariant mode on one GPU, in one device call (issue 18), each step under `timeout -k`: the kernel
# tests (a row's bits alone and in batches, every kernel; a query reduced alike on every attention path), the
# engine's identity test on the Qwen3-0.6B shape and the tiny checkpoint (64 requests every way the engine runs
# them: bitwise the same with the mode; not without it), the chaos test that kills a replica mid-stream in bf16
# with the mode and, as its control, without (needs Ray: carry .devpkgs), then the cost: nano-vLLM's workload,
# decode steps and prefill with the mode off and on, side by side. Logs go to $OUT (or ./bench-out). About 9
# minutes. On the device machine, from the repo root, carrying .whl and .devpkgs (bench/NOTES.md: the wheels
# and Ray the image lacks; unpacked here when Ray is not importable yet):
#   timeout -k 10 590 bash bench/run_batch_invariance.sh
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import ray" 2>/dev/null && [ -f .devpkgs/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .devpkgs/site.tar.xz -C /tmp/site
  [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # the replicas, Ray's workers, inherit it
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout -k 10 150 python3 -m pytest -q -rP -p no:cacheprovider tests/kernels/test_batch_invariance.py \
  tests/kernels/test_paged_attention.py tests/engine/test_sampler.py -k "batch or invariant or alone" \
  2>&1 | tail -15 | tee "$out/kernel_tests.txt"
timeout -k 10 420 python3 -m pytest -q -rP -p no:cacheprovider tests/engine/test_gpu_batch_invariance.py \
  2>&1 | grep -E "differing|without the mode|passed|failed|Error" | tee "$out/engine_test.txt"
if python3 -c "import ray" 2>/dev/null; then
  for invariant in 1 0; do
    echo "== chaos, bf16, NANOSERVE_TEST_BATCH_INVARIANT=$invariant (0: the control, expected to fail)"
    NANOSERVE_TEST_BATCH_INVARIANT=$invariant NANOSERVE_TEST_DEVICE=cuda timeout -k 10 200 python3 -m pytest -q \
      -p no:cacheprovider tests/chaos/test_replica_failures.py -k "killed_mid_stream and ray.kill" 2>&1 \
      | grep -E "passed|failed|differs" | tail -3
  done | tee "$out/chaos.txt"
fi
for mode in "" --batch-invariant; do
  timeout -k 10 100 python3 bench/offline_throughput.py $mode 2>&1 | grep -v Warning | tail -1 | tee -a "$out/offline.txt"
  timeout -k 10 100 python3 bench/decode_roofline.py $mode 2>&1 | tail -4 | tee -a "$out/decode.txt"
  timeout -k 10 60 python3 bench/prefill.py $mode 2>&1 | tail -1 | tee -a "$out/prefill.txt"
done
