"""Access control over a real router: API keys on every NanoServe call (health and reflection stay open),
TLS, and the flags that configure both."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import openai
import pytest

from proto import nanoserve_pb2 as pb
from router.__main__ import parse_args
from router.client import Client
from router.config import RouterConfig
from tests.router.test_client import self_signed_certificate
from tests.serving import RouterThread, greedy, served_services

KEYS = ("k1", "k2")
WRONG_KEY = "not-a-key-7f3a"


@pytest.fixture(scope="module")
def router(start_module_router: Callable[..., RouterThread]) -> RouterThread:
    return start_module_router(num_replicas=1, api_keys=KEYS, http_port=0)


def every_call(client: Client) -> dict[str, Callable[[], object]]:
    """One call of each NanoServe method, by name."""
    return {
        "Generate": lambda: list(client.generate([1, 2, 3], timeout=30, **greedy(2))),
        "Complete": lambda: client.complete([4, 5, 6], timeout=30, **greedy(2)),
        "GetModelInfo": lambda: client.model_info(timeout=10),
        "GetClusterStatus": lambda: client.cluster_status(timeout=10),
    }


def refusals(router: RouterThread) -> float:
    return router.router.metrics.requests.labels("UNAUTHENTICATED")._value.get()


def prompt_tokens_in(router: RouterThread) -> float:
    return router.router.metrics.tokens.labels("in")._value.get()


@pytest.mark.parametrize(("api_key", "word"), [(None, "missing"), (WRONG_KEY, "invalid"), ("", "invalid")])
def test_calls_without_a_valid_key_are_unauthenticated(router: RouterThread, api_key: str | None, word: str) -> None:
    before, tokens_before = refusals(router), prompt_tokens_in(router)
    with Client(router.address, api_key=api_key) as client:
        for name, call in every_call(client).items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert word in info.value.details(), name
            assert WRONG_KEY not in info.value.details()
    assert refusals(router) == before + 4
    assert prompt_tokens_in(router) == tokens_before  # nothing reached a replica


def test_authorization_that_is_not_a_bearer_token_is_invalid(router: RouterThread) -> None:
    with grpc.insecure_channel(router.address) as channel:
        call = channel.unary_unary("/nanoserve.v1.NanoServe/GetModelInfo",
                                   request_serializer=pb.GetModelInfoRequest.SerializeToString,
                                   response_deserializer=pb.ModelInfo.FromString)
        for value in ("k1", "Basic k1", "bearer k1", "Bearer  k1", "Bearer k1 "):
            with pytest.raises(grpc.RpcError) as info:
                call(pb.GetModelInfoRequest(), metadata=(("authorization", value),), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
            assert "invalid" in info.value.details(), value


@pytest.mark.parametrize("key", KEYS)
def test_either_key_opens_every_call(router: RouterThread, key: str) -> None:
    before = refusals(router)
    with Client(router.address, api_key=key) as client:
        chunks = list(client.generate([1, 2, 3], timeout=30, **greedy(2)))
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert client.complete([4, 5, 6], timeout=30, **greedy(2)).finish_reason == pb.FINISH_REASON_LENGTH
        assert client.model_info(timeout=10).vocab_size > 0
        assert len(client.cluster_status(timeout=10).replicas) == 1
    assert refusals(router) == before


def test_health_and_reflection_need_no_key(router: RouterThread) -> None:
    assert "nanoserve.v1.NanoServe" in served_services(router.address)
    with urllib.request.urlopen(f"http://127.0.0.1:{router.router.http_port}/health", timeout=10) as answer:
        assert answer.status == 200


def test_the_http_api_needs_a_key_too(router: RouterThread) -> None:
    base = f"http://127.0.0.1:{router.router.http_port}/v1"
    before, tokens_before = refusals(router), prompt_tokens_in(router)
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{base}/models", timeout=10)
    error = json.loads(missing.value.read())["error"]
    assert missing.value.code == 401 and error["type"] == "authentication_error" and "missing" in error["message"]
    with openai.OpenAI(base_url=base, api_key=WRONG_KEY, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as wrong:
            client.completions.create(model="any", prompt=[1, 2, 3], max_tokens=2)
        assert "invalid" in wrong.value.message and WRONG_KEY not in wrong.value.message
    assert refusals(router) == before + 2
    assert prompt_tokens_in(router) == tokens_before  # nothing reached a replica
    with openai.OpenAI(base_url=base, api_key=KEYS[1], max_retries=0) as client:
        model = client.models.list().data[0].id
        answer = client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=2, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens == 2
    assert refusals(router) == before + 2


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[bytes, bytes]:
    return self_signed_certificate(tmp_path)


def test_tls_serves_tls_clients_only(start_router: Callable[..., RouterThread],
                                     certificate: tuple[bytes, bytes]) -> None:
    key, cert = certificate
    router = start_router(num_replicas=1, tls_cert=cert, tls_key=key, api_keys=("tls-key",), http_port=0)
    try:
        with Client(router.address, api_key="tls-key", tls_root_cert=cert) as client:
            assert client.complete([1, 2, 3], timeout=30, **greedy(2)).finish_reason == pb.FINISH_REASON_LENGTH
        with Client(router.address, tls_root_cert=cert) as client, pytest.raises(grpc.RpcError) as refused:
            client.model_info(timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(router.address, api_key="tls-key") as client, pytest.raises(grpc.RpcError) as plaintext:
            client.model_info(timeout=10)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        models = urllib.request.Request(f"https://127.0.0.1:{router.router.http_port}/v1/models",
                                        headers={"Authorization": "Bearer tls-key"})
        with urllib.request.urlopen(models, timeout=10, context=ssl.create_default_context(cadata=cert.decode())) as a:
            assert a.status == 200  # the HTTP API serves HTTPS with the same certificate
        with pytest.raises(ConnectionError):  # plaintext HTTP to the TLS port: the server hangs up
            urllib.request.urlopen(f"http://127.0.0.1:{router.router.http_port}/health", timeout=10)
    finally:
        router.stop()


# ---------------------------------------------------------------------------------------------
# The flags


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text("# team A\nalpha-1\n\n   beta-2  \n# retired: gamma-3\n")
    return path


def test_api_key_file_holds_one_key_a_line(key_file: Path) -> None:
    config = parse_args(["--api-key-file", str(key_file)])
    assert config.api_keys == ("alpha-1", "beta-2")
    assert "alpha-1" not in repr(config)


def test_unusable_api_key_files_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    for path, message in [(empty, "holds no key"), (tmp_path / "absent", "cannot read"),
                          (spaced, "api_keys[0] must be printable ASCII without spaces")]:
        with pytest.raises(SystemExit) as exited:
            parse_args(["--api-key-file", str(path)])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "two words" not in err


def test_tls_flags_go_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "cert.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    for argv in (["--tls-cert", str(pem)], ["--tls-key", str(pem)]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--tls-cert", str(pem), "--tls-key", str(tmp_path / "absent.pem")])
    assert "--tls-key: cannot read" in capsys.readouterr().err
    config = parse_args(["--tls-cert", str(pem), "--tls-key", str(pem)])
    assert config.tls_cert == config.tls_key == pem.read_bytes()


def test_config_checks_tls_and_keys_itself() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        RouterConfig(tls_cert=b"cert")
    with pytest.raises(ValueError, match=r"api_keys\[1\]"):
        RouterConfig(api_keys=("ok", "caf\u00e9"))
