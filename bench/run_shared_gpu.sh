#!/usr/bin/env bash
# Replicas sharing one GPU (issue 23) in one device call on a one-GPU machine, each step under `timeout -k`:
#  (a) tests/engine/test_gpu_memory_share.py: engines side by side get the same KV blocks, and one starting
#      while another process holds the memory waits for it;
#  (b) `python -m router --replicas 4 --device cuda` on the embedded tiny model, then on the random
#      Qwen3-0.6B-shape checkpoint (bench/common.py): its placement line, 4 replicas SERVING, their KV blocks
#      (bench/router_status.py; exit 1 unless all serve with equal counts);
#  (c) the GPU chaos test that kills a replica mid-stream: 2 replicas share the GPU, one is replaced.
# Logs and results go to $OUT (or ./bench-out); about 6 minutes. On the device machine, from the repo root,
# carrying .devpkgs and .whl (bench/NOTES.md: Ray and the wheels the image lacks; unpacked here when Ray is
# not importable yet):   timeout -k 10 1200 bash bench/run_shared_gpu.sh
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import ray" 2>/dev/null && [ -f .devpkgs/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .devpkgs/site.tar.xz -C /tmp/site
  [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # the replicas, Ray's workers, inherit it
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/gpu.txt"

echo "== (a) engines sharing the GPU"
timeout -k 10 180 python3 -m pytest tests/engine/test_gpu_memory_share.py -q -p no:cacheprovider 2>&1 \
  | tail -15 | tee "$out/memory_share_tests.txt"

router_status() {  # NAME ROUTER_FLAGS...: one router run, its lines on stdout and in $out/router_NAME.*
  local name=$1; shift
  echo "== (b) python -m router --replicas 4 $*"
  timeout -k 10 420 python3 bench/router_status.py --replicas 4 --timeout-s 180 --log "$out/router_$name.log" \
    --out "$out/router_$name.json" -- "$@" 2>&1 | tee "$out/router_$name.txt"
}
router_status embedded --device cuda
model=$(cd bench && timeout -k 10 180 python3 -c "from common import random_qwen3_0_6b; print(random_qwen3_0_6b())" \
  2>>"$out/model.log" | tail -1)
router_status qwen3-0.6b --device cuda --model "$model"

echo "== (c) a replica killed mid-stream, on the shared GPU"
NANOSERVE_TEST_DEVICE=cuda timeout -k 10 300 python3 -m pytest tests/chaos/test_replica_failures.py -q \
  -p no:cacheprovider -k killed_mid_stream -o log_cli=true --log-cli-level=INFO > "$out/chaos_log.txt" 2>&1
grep -m 2 "placement:" "$out/chaos_log.txt"
tail -15 "$out/chaos_log.txt" | tee "$out/chaos.txt"
