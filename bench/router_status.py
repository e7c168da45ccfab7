"""Start `python -m router` as a user would, wait until it listens and its replicas serve, report where they
were placed and each one's state and KV cache, answer one request, then stop it with SIGTERM.

    python bench/router_status.py [--replicas 4] [--out FILE.json] [--log FILE] -- --device cuda [--model DIR]

Flags after `--` go to the router as they are (it always gets --replicas, --host 127.0.0.1, --port 0 and
--metrics-port -1). Printed: the router's placement and replica start-up log lines, and each replica's
state and KV blocks as GetClusterStatus reports them. Exits 1 unless every replica serves with the same
number of KV blocks. bench/run_shared_gpu.sh runs it on one GPU (issue 23).
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

from proto import nanoserve_pb2 as pb  # noqa: E402
from router.client import Client  # noqa: E402

# The router's log lines worth keeping: where the replicas went, their KV caches, and what went wrong. (The
# replicas' own INFO lines, such as the KV budget's, stay in Ray's worker logs.)
LOG_MARKERS = (": placement:", ": serving (", "failed to start", "ERROR")


def start_router(replicas: int, router_args: list[str], log_path: Path) -> subprocess.Popen[str]:
    args = ["--replicas", str(replicas), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *router_args]
    with log_path.open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "router", *args], cwd=REPO_ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=log)


def wait_for_port(router: subprocess.Popen[str], timeout_s: float) -> int | None:
    """The port of the router's "... listening on host:port" line; None if it exits or the time runs out."""
    assert router.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and router.poll() is None:
        ready, _, _ = select.select([router.stdout], [], [], 1.0)
        line = router.stdout.readline() if ready else ""
        if "listening on" in line:
            return int(line.rsplit(":", 1)[1])
    return None


def wait_for_serving(client: Client, replicas: int, timeout_s: float) -> pb.ClusterStatus:
    """The cluster status once `replicas` replicas serve and have reported their stats (the router polls them),
    or the last one seen when the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.cluster_status(timeout=10)
        serving = [r for r in status.replicas if r.state == pb.REPLICA_STATE_SERVING and r.num_kv_blocks_total]
        if len(serving) >= replicas or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def stop(router: subprocess.Popen[str]) -> int:
    """SIGTERM, as in production (the router drains and exits); SIGKILL after 60 s. Returns the exit code."""
    if router.poll() is None:
        router.send_signal(signal.SIGTERM)
    try:
        return router.wait(60)
    except subprocess.TimeoutExpired:
        router.kill()
        return router.wait()


def query(client: Client, args: argparse.Namespace, started: float, result: dict[str, Any]) -> None:
    """Record each replica's state and KV blocks once all serve, then the length of one greedy answer."""
    status = wait_for_serving(client, args.replicas, args.timeout_s)
    result["serving_after_s"] = round(time.monotonic() - started, 1)
    result["replicas"] = [
        {"name": r.name, "state": pb.ReplicaState.Name(r.state), "num_kv_blocks_total": r.num_kv_blocks_total}
        for r in status.replicas
    ]
    answer = client.complete([1, 2, 3, 4], max_tokens=8, temperature=0.0, ignore_eos=True, timeout=60)
    result["answer_tokens"] = len(answer.token_ids)


def check(args: argparse.Namespace, router_args: list[str]) -> dict[str, Any]:
    """Run the router once; what it showed."""
    result: dict[str, Any] = {"router_args": router_args, "replicas": []}
    router = start_router(args.replicas, router_args, args.log)
    started = time.monotonic()
    try:
        port = wait_for_port(router, args.timeout_s)
        if port is not None:
            result["listening_after_s"] = round(time.monotonic() - started, 1)
            with Client(f"127.0.0.1:{port}") as client:
                query(client, args, started, result)
    except grpc.RpcError as e:
        result["error"] = f"{e.code()}: {e.details()}"
    finally:
        result["exit_code"] = stop(router)
    result["log"] = [line for line in args.log.read_text().splitlines() if any(m in line for m in LOG_MARKERS)]
    states = {r["state"] for r in result["replicas"]}
    blocks = {r["num_kv_blocks_total"] for r in result["replicas"]}
    result["ok"] = len(result["replicas"]) == args.replicas and states == {"REPLICA_STATE_SERVING"} and len(blocks) == 1
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--timeout-s", type=float, default=240.0, help="for the router to listen, then for all to serve")
    p.add_argument("--log", type=Path, default=Path("router.log"), help="the router's stderr")
    p.add_argument("--out", type=Path, help="also write the result here as JSON")
    args, router_args = p.parse_known_args()
    result = check(args, [a for a in router_args if a != "--"])
    for line in result["log"]:
        print(line)
    for replica in result["replicas"]:
        print(f"{replica['name']}: {replica['state']}, {replica['num_kv_blocks_total']} KV blocks")
    if not result["ok"]:
        print("\n".join([*filter(None, [result.get("error")]), *args.log.read_text().splitlines()[-30:]]))
    print(f"{'OK' if result['ok'] else 'FAILED'}: {len(result['replicas'])} replicas reported; "
          f"answer of {result.get('answer_tokens')} tokens; router exit code {result['exit_code']}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
