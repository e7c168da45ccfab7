"""The gRPC contract from a second language: tests/router/node/client.js (grpc-js, proto loaded at run
time) streams Generate and checks health against `router_address`.

Skipped, with the reason, where node/npm are missing or `npm install` cannot reach a registry. The
packages are installed once per version of package.json under ~/.cache/nanoserve/node (outside the
repo, so no node_modules in the work tree) and found through NODE_PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proto import nanoserve_pb2 as pb
from router.client import Client
from tests.router.fake_server import running_fake_server
from tests.serving import RouterThread

NODE_DIR = Path(__file__).resolve().parent / "node"
INSTALLED_MARK = ".installed"  # written last, so a half-done install is redone
NPM_INSTALL_TIMEOUT_S = 300


def node_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanoserve" / "node"


def skip_unless_npm_install(install_dir: Path) -> None:
    """Run `npm install` in install_dir; skip the tests (saying why) when it fails or hangs."""
    try:
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"],
            cwd=install_dir, capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install timed out after {NPM_INSTALL_TIMEOUT_S}s (no network to the npm registry?)")
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("npm error")] or ["no error output"]
        pytest.skip(f"npm install failed (no network to the npm registry?): {errors[0]}")


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """node_modules holding client.js's dependencies, installed once per version of package.json."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not on PATH; install Node.js >= 18 to run the Node.js client test")
    manifest = (NODE_DIR / "package.json").read_bytes()
    install_dir = node_cache_root() / hashlib.sha256(manifest).hexdigest()[:16]
    if not (install_dir / INSTALLED_MARK).exists():
        install_dir.mkdir(parents=True, exist_ok=True)
        (install_dir / "package.json").write_bytes(manifest)
        skip_unless_npm_install(install_dir)
        (install_dir / INSTALLED_MARK).touch()
    return install_dir / "node_modules"


@pytest.fixture(scope="module")
def router_address(start_module_router: Callable[..., RouterThread]) -> str:
    """A real router with one replica of the embedded model (the real Qwen vocabulary, so text prompts work)."""
    from engine.default_model import default_model_dir

    return start_module_router(num_replicas=1, model=str(default_model_dir())).address


def run_node_client(node_modules: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(NODE_DIR / "client.js"), *args],
        env={**os.environ, "NODE_PATH": str(node_modules)}, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("prompt", ["Hello from Node", [101, 102, 103]], ids=["text", "token_ids"])
def test_node_client_streams_generate_and_sees_serving(
    node_modules: Path, router_address: str, prompt: str | list[int]
) -> None:
    greedy: dict[str, Any] = {"max_tokens": 8, "temperature": 0}
    result = run_node_client(node_modules, router_address, json.dumps(prompt), "8", json.dumps({"temperature": 0}))
    assert result.returncode == 0, result.stderr
    *chunk_lines, health_line = [json.loads(line) for line in result.stdout.splitlines()]
    assert health_line == {"health": "SERVING"}
    chunks = [line["chunk"] for line in chunk_lines]

    with Client(router_address) as client:  # the same greedy request, answered to the Python client
        expected = client.complete(prompt, **greedy)
    assert "".join(chunk["text"] for chunk in chunks) == expected.text
    assert [token_id for chunk in chunks for token_id in chunk["token_ids"]] == list(expected.token_ids)
    last = chunks[-1]
    assert last["finish_reason"] == pb.FinishReason.Name(expected.finish_reason) != "FINISH_REASON_UNSPECIFIED"
    assert last["usage"]["completion_tokens"] == len(expected.token_ids)
    assert last["replica"] == expected.replica


def test_node_client_echoes_the_fake_server(node_modules: Path) -> None:
    with running_fake_server() as fake:
        result = run_node_client(node_modules, fake.address, json.dumps([{"role": "user", "content": "Hi"}]), "8")
        request = fake.servicer.last_request
    assert result.returncode == 0, result.stderr
    chunks = [json.loads(line)["chunk"] for line in result.stdout.splitlines()[:-1]]
    assert [chunk["text"] for chunk in chunks] == ["user: ", "Hi"]
    assert request is not None and request.params == pb.SamplingParams(max_tokens=8)


def test_node_client_exits_non_zero_on_a_grpc_error(node_modules: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    result = run_node_client(node_modules, closed, json.dumps("hi"), "4")
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: "), result.stderr
