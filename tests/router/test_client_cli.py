"""router/client.py's command line against the in-process fake server, in-process and as
`python -m router.client`: its flags, what it prints, and its errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from proto import nanoserve_pb2 as pb
from router.client import main, print_choices_as_they_finish
from tests.router.fake_server import FakeServer

REPO_ROOT = Path(__file__).resolve().parents[2]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city."}}


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.client", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


def test_cli_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--target", "--max-tokens", "--temperature", "--seed", "--timeout", "--chat", "--token-ids",
                 "--api-key-file", "-n N, --n N", "--tool JSON|FILE", "--tool-choice MODE|NAME"):
        assert flag in out


def test_cli_sends_flags_and_prints_usage(fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k3y\n")
    argv = ["[5, 6,7]", "--token-ids", "--target", fake.address, "--max-tokens", "2", "--temperature", "0",
            "--seed", "9", "--api-key-file", str(key_file)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "<5><6>\n"
    assert err == "prompt_tokens=3 completion_tokens=2 cached_tokens=0 finish_reason=length replica=fake-0\n"
    request = fake.servicer.last_request
    assert request is not None and list(request.token_ids.ids) == [5, 6, 7]
    assert request.params == pb.SamplingParams(max_tokens=2, temperature=0.0, seed=9)
    assert fake.servicer.last_metadata["authorization"] == "Bearer k3y"


def test_cli_chat_flag_sends_one_user_message(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["Hi there", "--chat", "--target", fake.address]) == 0
    assert capsys.readouterr().out == "user: Hi there\n"
    request = fake.servicer.last_request
    assert request is not None and not request.HasField("params")


def test_each_choice_is_printed_whole_as_soon_as_it_finishes(capsys: pytest.CaptureFixture[str]) -> None:
    """Interleaved chunks of two choices, choice 1 finishing first: it is on stdout before the stream goes on."""
    seen_before_the_last_chunk = []

    def chunks() -> Iterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(text="a", index=0)
        yield pb.GenerateResponse(text="x", index=1, tool_calls=[pb.ToolCall(name="f", arguments="{}")])
        yield pb.GenerateResponse(text="y", index=1, finish_reason=pb.FINISH_REASON_LENGTH)
        seen_before_the_last_chunk.append(capsys.readouterr().out)
        yield pb.GenerateResponse(text="b", index=0, finish_reason=pb.FINISH_REASON_STOP, replica="r0")

    last = print_choices_as_they_finish(chunks())
    assert seen_before_the_last_chunk == ["--- choice 1: length ---\nxy\ntool call: f {}\n"]
    assert capsys.readouterr().out == "--- choice 0: stop ---\nab\n" and last.replica == "r0"


def test_cli_n_prints_each_choice_under_a_line(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Each choice whole under a line naming it (the control: one choice streams as ever, with no such line)."""
    assert main(["a b c", "--target", fake.address, "-n", "2", "--max-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == "--- choice 0: length ---\na b \n--- choice 1: length ---\na b \n"
    assert "finish_reason=length" in err
    request = fake.servicer.last_request
    assert request is not None and request.params.n == 2
    assert main(["a b c", "--target", fake.address, "-n", "1"]) == 0
    assert capsys.readouterr().out == "a b c\n"


def test_cli_sends_tools_and_prints_the_calls(fake: FakeServer, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    tool_file = tmp_path / "tools.json"
    tool_file.write_text(json.dumps([WEATHER]))
    argv = ["Weather?", "--chat", "--target", fake.address, "--tool", str(tool_file), "--tool",
            '{"name": "get_time"}', "--tool-choice", "get_time"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "user: Weather?\ntool call: get_weather {}\ntool call: get_time {}\n"
    request = fake.servicer.last_request
    assert request is not None and [t.name for t in request.chat.tools] == ["get_weather", "get_time"]
    assert request.chat.tool_choice == pb.ToolChoice(function_name="get_time")
    assert main(argv[:-1] + ["required"]) == 0
    request = fake.servicer.last_request
    assert request is not None and request.chat.tool_choice == pb.ToolChoice(mode="required")


@pytest.mark.parametrize(("argv", "says"), [
    (["hi", "--tool", '{"name": "f"}'], "--tool and --tool-choice need --chat"),
    (["hi", "--chat", "--tool", "{name: f}"], "--tool '{name: f}': not JSON"),
    (["hi", "--chat", "--tool", "/nowhere/tools.json"], "No such file"),
    (["hi", "--chat", "--tool", '{"name": "f", "parameters": 3}'], "tools[0].parameters: wrong type"),
])
def test_cli_refuses_bad_tools_before_sending(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and says in capsys.readouterr().err


def test_cli_reports_server_errors_in_one_line(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    fake.servicer.fail_with = (grpc.StatusCode.INVALID_ARGUMENT, "params.max_tokens must be >= 1, got 0")
    assert main(["hi", "--target", fake.address, "--max-tokens", "0"]) == 1
    assert capsys.readouterr().err == "error: INVALID_ARGUMENT: params.max_tokens must be >= 1, got 0\n"


def test_cli_rejects_bad_token_ids(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["1,x", "--token-ids"])
    assert exited.value.code == 2
    assert "invalid literal" in capsys.readouterr().err


def test_cli_as_a_module_streams_text(fake: FakeServer) -> None:
    result = run_cli("Hello big world", "--target", fake.address, "--max-tokens", "2")
    assert (result.returncode, result.stdout) == (0, "Hello big \n"), result.stderr
    assert "completion_tokens=2" in result.stderr and "replica=fake-0" in result.stderr


def test_cli_against_a_closed_port_fails_cleanly() -> None:
    result = run_cli("hi", "--target", f"127.0.0.1:{closed_port()}", "--timeout", "5")
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ") and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""
