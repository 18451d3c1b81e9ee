"""The ``scout-diff-cache`` command as an operator runs it: a real process, its sockets, its exit status.

Started from the console script pip installed, with the seed's environment (TARGET_API_URL, HOST,
PORT), the user's config file and flags; stopped with SIGTERM and Ctrl-C while requests are in
flight; given bad settings; and ``doctor`` and ``preview`` as a user reads them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from scout_diff_cache.settings import SETTING_NAMES
from support import (
    SCRIPT,
    HttpResult,
    MitmwebApi,
    Repo,
    Upstream,
    free_port,
    http_request,
    mitmdump_executable,
    mitmweb_args,
    proxy_env,
    stop_process,
    wait_ready,
)
from test_listener import listening

COMMAND = str(Path(sys.executable).with_name("scout-diff-cache"))
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_CHAT = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


@dataclass
class Command:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.log()}") from None


def post_chat(command: Command) -> HttpResult:
    return http_request(
        "POST", command.base_url + "/v1/chat/completions", CHAT, {"content-type": "application/json"}, timeout=60
    )


def command_env(work_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """proxy_env without SCOUT_CONFIG (the command finds the user's file) and with a home of its own."""
    result = proxy_env({}, work_dir)
    del result["SCOUT_CONFIG"]
    home = work_dir / "home"
    home.mkdir(exist_ok=True)
    return {**result, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), **env}


@contextlib.contextmanager
def run_command(
    work_dir: Path, env: Mapping[str, str], args: tuple[str, ...] = (), wait_port: int | None = None
) -> Iterator[Command]:
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "command.log"
    full_env = command_env(work_dir, env)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [COMMAND, *args, *(() if "--" in args else ("--",)), "--set", f"confdir={work_dir / 'mitmproxy-conf'}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=work_dir,
        )
    command = Command(process, wait_port or 0, log_path)
    try:
        if wait_port is not None:
            wait_ready(
                process,
                lambda: ("127.0.0.1", wait_port) in _listening_or_empty(process.pid),
                30,
                0.05,
                lambda: f"the command did not listen on {wait_port}:\n{command.log()}",
            )
        yield command
    finally:
        stop_process(process)


def _listening_or_empty(pid: int) -> set[tuple[str, int]]:
    try:
        return listening(pid)
    except Exception:  # the process is gone
        return set()


def write_user_config(work_dir: Path, text: str) -> None:
    config = work_dir / "home" / ".config" / "scout-diff-cache" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)


@pytest.fixture
def repo(make_repo: Callable[..., Repo]) -> Repo:
    return make_repo({"app.py": "print('the cli test repository')\n", "README.md": "# cli\n"})


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/"])
def test_the_seeds_environment_runs_the_proxy_on_exactly_that_address(
    repo: Repo, upstream: Upstream, tmp_path: Path, suffix: str
) -> None:
    port = free_port()
    env = {"TARGET_API_URL": upstream.url + suffix, "HOST": "127.0.0.1", "PORT": str(port)}
    with run_command(tmp_path / "run", {**env, "GIT_REPO_PATH": str(repo.path)}, wait_port=port) as command:
        assert listening(command.process.pid) == {("127.0.0.1", port)}
        answer = post_chat(command)
        assert answer.status == 200, answer.body
    sent = upstream.chat_requests()[-1]
    assert sent.path == "/v1/chat/completions"
    assert "the cli test repository" in sent.json()["messages"][0]["content"]


def test_flags_win_over_the_environment_which_wins_over_the_users_config_file(
    repo: Repo, upstream: Upstream, tmp_path: Path
) -> None:
    work_dir = tmp_path / "run"
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    write_user_config(
        work_dir,
        f"target_api_url: {upstream.url}\nport: {file_port}\ngit_repo_path: {repo.path}\n"
        "max_file_bytes: 1000\nmax_diff_bytes: 2000\n",
    )
    env = {"PORT": str(env_port), "MAX_FILE_BYTES": "1100"}
    args = ("--port", str(flag_port), "--max-diff-bytes", "2100")
    with run_command(work_dir, env, args, wait_port=flag_port) as command:
        assert listening(command.process.pid) == {("127.0.0.1", flag_port)}
    start_line = next(line for line in (work_dir / "command.log").read_text().splitlines() if "changed from" in line)
    assert "config file " + str(work_dir / "home" / ".config" / "scout-diff-cache" / "config.yaml") in start_line
    assert "max_file_bytes=1100 (environment)" in start_line
    assert "max_diff_bytes=2100 (option)" in start_line
    assert f"repository {repo.path}, " in start_line  # from the file
    # Only what differs from the built-in defaults is named (STOP_GRACE_MS: the tests' own, see proxy_env).
    changed = start_line.partition("changed from the defaults: ")[2].split(", ")
    assert sorted(item.partition("=")[0] for item in changed) == ["max_diff_bytes", "max_file_bytes", "stop_grace_ms"]


def test_with_the_file_alone_the_proxy_listens_where_the_file_says(
    repo: Repo, upstream: Upstream, tmp_path: Path
) -> None:
    work_dir = tmp_path / "run"
    port = free_port()
    write_user_config(work_dir, f"target_api_url: {upstream.url}/v1\nport: {port}\ngit_repo_path: {repo.path}\n")
    with run_command(work_dir, {}, wait_port=port) as command:
        assert listening(command.process.pid) == {("127.0.0.1", port)}
        assert post_chat(command).status == 200


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        pytest.param({"MAX_FILE_BYTES": "abc"}, (), "invalid setting max_file_bytes (environment variable", id="env"),
        pytest.param({}, ("--layout", "sideways"), "invalid setting layout (option", id="flag"),
        pytest.param({"TARGET_API_URL": "http://h:1/api"}, (), "invalid setting target_api_url", id="url-path"),
        pytest.param({"PORT": "99999"}, (), "invalid setting port (environment variable PORT)", id="port"),
        pytest.param({"GIT_REPO_PATH": "/"}, (), "invalid setting git_repo_path", id="not-a-repo"),
        pytest.param({"SECRET_PATTERNS": "(unclosed"}, (), "invalid setting secret_patterns", id="pattern"),
        pytest.param(
            {"BUILD_CACHE_DIR": "/tmp"}, (), "invalid setting build_cache_dir: /tmp may be written", id="cache"
        ),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_status_2_with_nothing_bound(
    repo: Repo, tmp_path: Path, env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    port = free_port()
    result = subprocess.run(  # noqa: PLW1510 (the status is asserted)
        [COMMAND, *args],
        env=command_env(tmp_path, {"GIT_REPO_PATH": str(repo.path), "PORT": str(port), **env}),
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scout-diff-cache: ") and message in lines[0], lines
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # nothing ever listened there


def test_help_documents_every_setting_and_the_launch_settings(tmp_path: Path) -> None:
    result = subprocess.run(
        [COMMAND, "--help"], capture_output=True, timeout=60, env=command_env(tmp_path, {}), check=False
    )
    assert result.returncode == 0
    text = result.stdout.decode()
    for name in ("target_api_url", "host", "port", *SETTING_NAMES):
        assert "--" + name.replace("_", "-") in text, name
    assert "Env TARGET_API_URL; default http://127.0.0.1:8000." in " ".join(text.split())


def _stream_lines(port: int, body: bytes, received: list[bytes], done: threading.Event) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = connection.getresponse()
        received.append(f"status {response.status}\n".encode())
        while chunk := response.read1(65536):
            received.append(chunk)
    except (OSError, http.client.HTTPException) as e:
        received.append(f"error {type(e).__name__}".encode())
    finally:
        connection.close()
        done.set()


def stream_started(port: int) -> tuple[list[bytes], threading.Event]:
    """A streamed chat request in a thread, once its first event has arrived: what it received, and when it ended."""
    received: list[bytes] = []
    done = threading.Event()
    threading.Thread(target=_stream_lines, args=(port, STREAM_CHAT, received, done), daemon=True).start()
    deadline = time.monotonic() + 20
    while b"part0" not in b"".join(received) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b"part0" in b"".join(received), b"".join(received)
    return received, done


def test_sigterm_stops_accepting_lets_a_stream_finish_and_exits_0(
    repo: Repo, upstream: Upstream, tmp_path: Path
) -> None:
    gate = threading.Event()
    upstream.behaviour.stream_gate = gate
    port = free_port()
    env = {"TARGET_API_URL": upstream.url, "PORT": str(port), "GIT_REPO_PATH": str(repo.path), "STOP_GRACE_MS": "20000"}
    with run_command(tmp_path / "run", env, wait_port=port) as command:
        received, done = stream_started(port)
        command.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while listening(command.process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert listening(command.process.pid) == set(), "still accepting connections after SIGTERM"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert command.process.poll() is None, "exited with a stream in flight"
        gate.set()  # the upstream finishes the stream
        assert done.wait(20)
        assert command.wait_exit(10) == 0
        assert "waiting up to 20.0 s for 1 requests in flight" in command.log()
    stream = b"".join(received)
    assert stream.startswith(b"status 200") and b"part2" in stream and stream.rstrip().endswith(b"data: [DONE]")


@pytest.mark.parametrize("waiting_for", ["the upstream", "its context"])
def test_a_request_still_waiting_when_the_grace_ends_gets_a_503_and_the_proxy_exits_0(
    repo: Repo, tmp_path: Path, waiting_for: str
) -> None:
    """An upstream that accepts connections and never answers. The chat waits either for its answer
    (sent once message 1 is ready) or for its context (sent at once: the window is still being asked
    of that silent upstream). Either way the client gets the envelope, not a cut connection."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        port = free_port()
        env = {
            "TARGET_API_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "PORT": str(port),
            "GIT_REPO_PATH": str(repo.path),
            "STOP_GRACE_MS": "1000",
        }
        with run_command(tmp_path / "run", env, wait_port=port) as command:
            if waiting_for == "the upstream":
                wait_for_log(command, "message 1 for ")
            answer: list[HttpResult] = []
            thread = threading.Thread(target=lambda: answer.append(post_chat(command)), daemon=True)
            thread.start()
            if waiting_for == "the upstream":
                wait_for_log(command, "server connect")  # forwarded
                time.sleep(0.2)
            else:
                time.sleep(0.3)
                assert "server connect" not in command.log()
            started = time.monotonic()
            command.process.send_signal(signal.SIGTERM)
            assert command.wait_exit(15) == 0
            assert time.monotonic() - started >= 0.9
            thread.join(10)
            assert "Traceback" not in command.log()
    assert answer and answer[0].status == 503, command.log()
    assert answer[0].json()["error"]["code"] == "proxy_stopping"


def wait_for_log(command: Command, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in command.log():
        if time.monotonic() > deadline or command.process.poll() is not None:
            raise AssertionError(f"{text!r} not logged within {timeout} s:\n{command.log()}")
        time.sleep(0.02)


def test_a_stream_still_running_when_the_grace_ends_gets_an_error_event_and_a_clean_end(
    repo: Repo, upstream: Upstream, tmp_path: Path
) -> None:
    gate = threading.Event()
    upstream.behaviour.stream_gate = gate  # the upstream sends its first event, then waits
    port = free_port()
    env = {"TARGET_API_URL": upstream.url, "PORT": str(port), "GIT_REPO_PATH": str(repo.path), "STOP_GRACE_MS": "1000"}
    try:
        with run_command(tmp_path / "run", env, wait_port=port) as command:
            received, done = stream_started(port)
            command.process.send_signal(signal.SIGTERM)
            assert done.wait(15)
            assert command.wait_exit(15) == 0
            assert "Traceback" not in command.log()
    finally:
        gate.set()
    stream = b"".join(received)
    assert stream.startswith(b"status 200") and b"part0" in stream and b"part1" not in stream
    assert b"error " not in stream, stream  # the chunked body ended cleanly: no IncompleteRead
    events = [json.loads(line[6:]) for line in stream.split(b"\n") if line.startswith(b"data: {")]
    assert events[-1]["error"]["code"] == "proxy_stopping"


def test_a_second_ctrl_c_stops_at_once(repo: Repo, upstream: Upstream, tmp_path: Path) -> None:
    gate = threading.Event()
    upstream.behaviour.stream_gate = gate
    port = free_port()
    env = {"TARGET_API_URL": upstream.url, "PORT": str(port), "GIT_REPO_PATH": str(repo.path), "STOP_GRACE_MS": "60000"}
    try:
        with run_command(tmp_path / "run", env, wait_port=port) as command:
            stream_started(port)  # a stream in flight: the first Ctrl-C waits for it
            command.process.send_signal(signal.SIGINT)
            time.sleep(0.5)
            assert command.process.poll() is None
            started = time.monotonic()
            command.process.send_signal(signal.SIGINT)
            assert command.wait_exit(10) == 0
            assert time.monotonic() - started < 5
            assert "SIGINT again: stopping now, 1 requests cut" in command.log()
    finally:
        gate.set()


def test_an_idle_proxy_stops_on_sigterm_at_once_with_status_0(repo: Repo, upstream: Upstream, tmp_path: Path) -> None:
    port = free_port()
    env = {"TARGET_API_URL": upstream.url, "PORT": str(port), "GIT_REPO_PATH": str(repo.path), "STOP_GRACE_MS": "60000"}
    with run_command(tmp_path / "run", env, wait_port=port) as command:
        started = time.monotonic()
        command.process.send_signal(signal.SIGTERM)
        assert command.wait_exit(10) == 0
        assert time.monotonic() - started < 5


def test_web_runs_mitmweb_with_the_addons_and_the_verdict_column(
    repo: Repo, upstream: Upstream, tmp_path: Path
) -> None:
    port, web_port = free_port(), free_port()
    env = {"TARGET_API_URL": upstream.url, "PORT": str(port), "GIT_REPO_PATH": str(repo.path)}
    args = ("--web", "--", *mitmweb_args(web_port, "web-token"), "--set", "web_open_browser=false")
    with run_command(tmp_path / "run", env, args, wait_port=port) as command:
        assert post_chat(command).status == 200
        deadline = time.monotonic() + 20
        while ("127.0.0.1", web_port) not in listening(command.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        api = MitmwebApi(web_port, "web-token")
        assert "comment" in json.loads(api.get("/options"))["web_columns"]["value"]
        [flow] = api.chat_flows()
        assert flow["comment"].startswith(("miss ", "unknown")), flow["comment"]


def test_plain_mitmdump_without_reverse_mode_says_so_at_start(repo: Repo, tmp_path: Path) -> None:
    result = subprocess.run(  # noqa: PLW1510 (the status is asserted)
        [mitmdump_executable(), "-s", str(SCRIPT), "-p", str(free_port()), "--set", f"confdir={tmp_path / 'conf'}"],
        env=proxy_env({"GIT_REPO_PATH": str(repo.path)}, tmp_path),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert b"started without one (mode regular)" in result.stdout + result.stderr


def test_preview_into_a_pipe_closed_early_ends_quietly(repo: Repo, tmp_path: Path) -> None:
    env = command_env(tmp_path, {"GIT_REPO_PATH": str(repo.path)})
    with subprocess.Popen([COMMAND, "preview"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as process:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        process.stdout.close()  # `| head -1`
        errors = process.stderr.read()
        status = process.wait(timeout=60)
    assert first.startswith(b"repository: ")
    assert errors == b"" and status == 0


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        pytest.param("vllm", {"upstream": "ok", "tokenizer": "ok", "cache reporting": "ok", "window": "ok"}, id="vllm"),
        pytest.param(None, {"upstream": "ok", "tokenizer": "warn", "cache reporting": "warn"}, id="no-reports"),
    ],
)
def test_doctor_gives_a_verdict_per_check(
    repo: Repo, upstream: Upstream, tmp_path: Path, engine: str | None, expected: dict[str, str]
) -> None:
    upstream.behaviour.engine = engine
    upstream.behaviour.max_model_len = 65536 if engine else None
    port = free_port()
    env = command_env(tmp_path, {"TARGET_API_URL": upstream.url, "PORT": str(port), "GIT_REPO_PATH": str(repo.path)})
    result = subprocess.run([COMMAND, "doctor"], env=env, capture_output=True, timeout=120, check=False)
    verdicts = {
        line.split(":")[0][6:]: line[:5].strip() for line in result.stdout.decode().splitlines() if ":" in line[:40]
    }
    expected = {"git": "ok", "repository": "ok", "build cache": "ok", "listen policy": "ok", "port": "ok", **expected}
    for check, level in expected.items():
        assert verdicts.get(check) == level, (check, result.stdout.decode())
    assert result.returncode == 0, result.stdout.decode()
    if engine:
        assert "65,536 tokens" in result.stdout.decode()
    # Only what differs from the built-in defaults (the checkout's config.yaml lists every default).
    settings_line = next(line for line in result.stdout.decode().splitlines() if line.startswith("ok    settings: "))
    assert settings_line.endswith("; changed from the defaults: stop_grace_ms=1000 (environment)"), settings_line


def test_doctor_fails_on_an_unreachable_upstream_a_remote_listener_without_key_and_a_shared_cache_dir(
    repo: Repo, tmp_path: Path
) -> None:
    env = command_env(
        tmp_path,
        {
            "TARGET_API_URL": f"http://127.0.0.1:{free_port()}",
            "HOST": "0.0.0.0",
            "GIT_REPO_PATH": str(repo.path),
            "BUILD_CACHE_DIR": "/tmp",
        },
    )
    result = subprocess.run([COMMAND, "doctor"], env=env, capture_output=True, timeout=120, check=False)
    out = result.stdout.decode()
    assert result.returncode == 1
    assert "FAIL  upstream: " in out and "not reachable" in out
    assert "FAIL  listen policy: 0.0.0.0:8787 is not loopback and PROXY_API_KEY is unset" in out
    assert "FAIL  build cache: /tmp may be written by group or others" in out
    assert out.rstrip().endswith("3 failed: build cache, listen policy, upstream")


def test_python_dash_m_is_the_same_command(tmp_path: Path) -> None:
    result = subprocess.run(  # noqa: PLW1510 (the status is asserted)
        [sys.executable, "-m", "scout_diff_cache", "--version"], capture_output=True, timeout=60, env=os.environ.copy()
    )
    assert result.returncode == 0 and result.stdout.startswith(b"scout-diff-cache ")


def test_the_console_script_is_installed() -> None:
    assert Path(COMMAND).is_file(), "pip install did not create the scout-diff-cache command"
