"""Test helpers: real git repositories in temp dirs, a recording upstream on 127.0.0.1, a real mitmdump."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil

from scout_diff_cache.launch import launch_env_name
from scout_diff_cache.settings import LAUNCH_NAMES, SETTING_NAMES, env_name

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "addon" / "scout.py"
# Every setting's environment variable, the launch settings' and the config file's: none leaks in.
SETTING_ENV_NAMES = (
    *(env_name(name) for name in SETTING_NAMES),
    *(launch_env_name(name) for name in LAUNCH_NAMES),
    "SCOUT_CONFIG",
)
# What an in-process test clears: all but BUILD_CACHE_DIR, a directory of the test's own (conftest).
CLEARED_ENV_NAMES = tuple(name for name in SETTING_ENV_NAMES if name != "BUILD_CACHE_DIR")

# Fixed identity and dates: the same operations give the same commit ids on every machine.
GIT_COMMIT_ENV = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.invalid",
    "GIT_COMMITTER_NAME": "Test Committer",
    "GIT_COMMITTER_EMAIL": "committer@example.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}


class Repo:
    """A real git repository in a temp dir, driven through the git command line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: Path, files: Mapping[str, str | bytes] | None = None, commit: bool = True) -> Repo:
        path.mkdir(parents=True, exist_ok=True)
        repo = cls(path)
        repo.git("init", "-q", "-b", "main")
        if files:
            repo.write(files)
            if commit:
                repo.commit_all("initial")
        return repo

    def git(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            ["git", *args], cwd=self.path, env={**os.environ, **GIT_COMMIT_ENV}, capture_output=True, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode("utf-8", errors="replace")

    def write(self, files: Mapping[str, str | bytes]) -> None:
        for name, content in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                target.write_text(content, encoding="utf-8", newline="")
            else:
                target.write_bytes(content)

    def commit_all(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").strip()

    def clone(self, path: Path) -> Repo:
        """A clone of this repository at another path (same commits, same ids)."""
        subprocess.run(
            ["git", "clone", "-q", str(self.path), str(path)],
            env={**os.environ, **GIT_COMMIT_ENV},
            capture_output=True,
            check=True,
        )
        return Repo(path)

    def git_dir_fingerprint(self) -> dict[str, str]:
        """Hash of every file under .git (content and mtime): proves nothing was written there."""
        result = {}
        git_dir = self.path / ".git"
        for item in sorted(git_dir.rglob("*")):
            if item.is_file():
                stat = item.stat()
                digest = hashlib.sha256(item.read_bytes()).hexdigest()
                result[str(item.relative_to(git_dir))] = f"{digest}:{stat.st_mtime_ns}"
        return result


def listed_items(block: str, title_start: str) -> list[str]:
    """The indented lines under the listing whose title starts with title_start (in a footer or note)."""
    lines = block.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(title_start):
            items = []
            for item in lines[i + 1 :]:
                if not item.startswith("  "):
                    break
                items.append(item[2:])
            return items
    return []


# --- a recording upstream -------------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def raw_messages(self) -> list[bytes]:
        """The elements of the body's top-level ``messages`` array, each as the exact bytes sent."""
        return raw_messages(self.body)


def _skip_ws(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\n\r":
        index += 1
    return index


def wait_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    timeout: float,
    interval: float,
    failure: Callable[[], str],
) -> None:
    """Wait until ``ready()`` (bounded by ``timeout`` seconds); AssertionError with ``failure()`` if the
    process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(failure())
        time.sleep(interval)


def git_processes(trace: Path) -> list[str]:
    """The git commands started while ``GIT_TRACE`` pointed at ``trace`` (one 'built-in' line each)."""
    lines = trace.read_text(errors="replace").splitlines() if trace.exists() else []
    return [line.split("built-in: ", 1)[1] for line in lines if "trace: built-in: " in line]


def raw_messages(body: bytes) -> list[bytes]:
    """Split a JSON object's top-level ``messages`` array into its elements' raw bytes (no re-encoding)."""
    text = body.decode("utf-8")
    json.loads(text)  # the whole body must be valid JSON first
    decoder = json.JSONDecoder()
    index = _skip_ws(text, 0)
    if text[index] != "{":
        raise AssertionError("body is not a JSON object")
    index += 1
    while True:
        index = _skip_ws(text, index)
        if text[index] == "}":
            raise AssertionError("body has no 'messages'")
        key, index = decoder.raw_decode(text, index)
        index = _skip_ws(text, index)
        index = _skip_ws(text, index + 1)  # the ':'
        if key == "messages":
            if text[index] != "[":
                raise AssertionError("'messages' is not an array")
            items: list[bytes] = []
            index = _skip_ws(text, index + 1)
            while text[index] != "]":
                start = index
                _, index = decoder.raw_decode(text, index)
                items.append(text[start:index].encode("utf-8"))
                index = _skip_ws(text, index)
                if text[index] == ",":
                    index = _skip_ws(text, index + 1)
            return items
        _, index = decoder.raw_decode(text, index)
        index = _skip_ws(text, index)
        if text[index] == ",":
            index += 1


# MAX_CONTEXT_TOKENS for tests about bodies and memory, not the window: nothing is cut to fit.
BIG_WINDOW = "100000000"

CHARS_PER_TOKEN = 4
BOS = "<|begin_of_text|>"


class FakePrefixCache:
    """A prefix cache like the engines': the longest prefix shared with a remembered prompt is reused.

    The prompt is rendered like Llama 4's template (tool text before the first system message);
    a token is CHARS_PER_TOKEN characters. It remembers the last ``capacity`` prompts.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self.prompts: list[str] = []
        self.lock = threading.Lock()

    @staticmethod
    def render(payload: dict[str, Any], generation_prompt: bool = True) -> str:
        parts = [BOS]
        if payload.get("tools"):
            parts.append(
                "<|header_start|>system<|header_end|>\n\nEnvironment: ipython\n" + json.dumps(payload["tools"])
            )
        for message in payload.get("messages", []):
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            parts.append(f"<|header_start|>{message.get('role')}<|header_end|>\n\n{content or ''}<|eot|>")
        if generation_prompt:
            parts.append("<|header_start|>assistant<|header_end|>\n\n")
        return "".join(parts)

    @staticmethod
    def tokens(text: str) -> int:
        return -(-len(text) // CHARS_PER_TOKEN)

    def serve(self, prompt: str) -> tuple[int, int]:
        """(prompt tokens, cached tokens) for a prompt, which is then remembered."""
        with self.lock:
            shared = max((_shared_prefix(prompt, seen) for seen in self.prompts), default=0)
            kept = (
                [seen for seen in self.prompts if seen != prompt][-(self.capacity - 1) :] if self.capacity > 1 else []
            )
            self.prompts = [*kept, prompt] if self.capacity > 0 else []
        total = self.tokens(prompt)
        return total, min(shared // CHARS_PER_TOKEN, total - 1)

    def forget(self) -> None:
        with self.lock:
            self.prompts.clear()


def _shared_prefix(a: str, b: str) -> int:
    """Length of the common prefix, by bisection on slices (a character loop is slow on 40 MB)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def engine_usage(engine: str | None, prompt_tokens: int, cached: int) -> dict[str, Any]:
    """The completion's ``usage`` (and llama.cpp's ``timings``) as the engine would send them."""
    if engine is None:
        return {"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}
    if engine == "vllm":
        cached = cached // 16 * 16
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
    elif engine in ("llamacpp", "sglang"):
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    extra: dict[str, Any] = {"usage": usage}
    if engine == "llamacpp":
        extra["timings"] = {
            "cache_n": cached,
            "prompt_n": prompt_tokens - cached,
            "prompt_ms": 1.5,
            "predicted_n": 1,
            "predicted_ms": 0.5,
        }
    return extra


@dataclass
class UpstreamBehaviour:
    """What the fake model server does; tests change it while it runs."""

    stream_chunks: int = 3
    # When set, the server sends the first SSE chunk, then waits for this before sending the rest.
    stream_gate: threading.Event | None = None
    # When set, the server sends "data: [DONE]", then waits for this before ending the body.
    end_gate: threading.Event | None = None
    # When set, the first content event carries this many characters, sent in 64 KiB pieces.
    long_event_chars: int = 0
    piece_delay: float = 0.0  # seconds between those pieces
    reply_text: str = "ok"
    status: int = 200
    error_body: bytes | None = None
    # None: a fixed usage without cache figures. "vllm", "llamacpp", "sglang" or "tgi": a prefix cache
    # (FakePrefixCache) reported the way that engine does, and its tokenize endpoints, if it has any.
    engine: str | None = None
    cache: FakePrefixCache = field(default_factory=FakePrefixCache)
    # When set, GET /v1/models from the proxy itself reports this window (vLLM's max_model_len).
    max_model_len: int | None = None
    tokenize_status: int = 200  # another status: /tokenize and /apply-template fail with it


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UpstreamServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self) -> Recorded:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            body = self._read_chunked()
        else:
            length = int(self.headers.get("content-length", 0))
            body = self.rfile.read(length) if length else b""
        record = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        self.server.recorded.append(record)
        return record

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(body)
            body += self.rfile.read(size)
            self.rfile.readline()

    def do_GET(self) -> None:
        if self.headers.get("user-agent", "").startswith("scout-diff-cache/"):
            # The proxy asking on its own behalf (the context window): kept apart from forwarded requests.
            self.server.own_requests.append(self.path)
            window = self.server.behaviour.max_model_len
            cards = (
                [{"id": "fake", "object": "model", "max_model_len": window}] if window and "models" in self.path else []
            )
            self._send_json(200, {"object": "list", "data": cards})
            return
        self._record()
        self._send_json(200, {"upstream": True, "path": self.path})

    def do_OPTIONS(self) -> None:
        self._record()
        self.send_response(204)
        self.send_header("access-control-allow-origin", "*")
        self.send_header("access-control-allow-methods", "POST, OPTIONS")
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        record = self._record()
        behaviour = self.server.behaviour
        if behaviour.status != 200:
            self._send_raw(behaviour.status, behaviour.error_body or b"{}", "application/json")
            return
        try:
            payload = json.loads(record.body)
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        if record.path in ("/tokenize", "/apply-template"):
            self._tokenize(record.path, payload, behaviour)
            return
        prompt_tokens, cached = 1, 0
        if behaviour.engine is not None:
            prompt_tokens, cached = behaviour.cache.serve(FakePrefixCache.render(payload))
        extra = engine_usage(behaviour.engine, prompt_tokens, cached)
        if payload.get("stream"):
            self._stream(behaviour, payload, extra)
        else:
            self._send_json(200, {**_completion(behaviour.reply_text), **extra})

    def _tokenize(self, path: str, payload: dict[str, Any], behaviour: UpstreamBehaviour) -> None:
        """vLLM's /tokenize (messages -> count); llama.cpp's /apply-template and /tokenize (content -> tokens)."""
        if behaviour.tokenize_status != 200:
            self._send_json(behaviour.tokenize_status, {"error": {"message": "tokenizer broken"}})
            return
        if behaviour.engine == "vllm" and path == "/tokenize" and "messages" in payload:
            prompt = FakePrefixCache.render(payload, generation_prompt=payload.get("add_generation_prompt", True))
            self._send_json(200, {"count": FakePrefixCache.tokens(prompt), "max_model_len": 10_000_000})
        elif behaviour.engine == "vllm" and path == "/tokenize" and isinstance(payload.get("prompt"), str):
            self._send_json(200, {"count": FakePrefixCache.tokens(payload["prompt"]), "max_model_len": 10_000_000})
        elif behaviour.engine == "llamacpp" and path == "/apply-template":
            # Like llama.cpp: the prompt without the BOS text, which /tokenize adds with add_special.
            prompt = FakePrefixCache.render(payload, generation_prompt=payload.get("add_generation_prompt", True))
            self._send_json(200, {"prompt": prompt.removeprefix(BOS)})
        elif behaviour.engine == "llamacpp" and path == "/tokenize":
            content = str(payload.get("content", ""))
            if payload.get("add_special") is True:
                content = BOS + content
            self._send_json(200, {"tokens": [0] * FakePrefixCache.tokens(content)})
        else:
            self._send_json(404, {"error": {"message": f"no {path} here"}})

    def _send_json(self, status: int, payload: object) -> None:
        self._send_raw(status, json.dumps(payload).encode(), "application/json")

    def _send_raw(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, behaviour: UpstreamBehaviour, payload: dict[str, Any], extra: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        events: list[dict[str, Any]] = []
        for index in range(behaviour.stream_chunks):
            last = index == behaviour.stream_chunks - 1
            events.append(
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "test",
                    "choices": [
                        {"index": 0, "delta": {"content": f"part{index} "}, "finish_reason": "stop" if last else None}
                    ],
                }
            )
        if include_usage and behaviour.engine is not None:
            events.append(
                {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "test", "choices": []}
                | {"usage": extra["usage"]}
            )
        if "timings" in extra:  # llama.cpp puts them on the last chunk, the usage chunk when there is one
            events[-1]["timings"] = extra["timings"]
        if behaviour.long_event_chars:
            events[0]["choices"][0]["delta"]["content"] = "x" * behaviour.long_event_chars
        for index, event in enumerate(events):
            if index == 1 and behaviour.stream_gate is not None:
                behaviour.stream_gate.wait(timeout=20)
            encoded = f"data: {json.dumps(event)}\n\n".encode()
            piece = 65536 if behaviour.long_event_chars else len(encoded)
            for start in range(0, len(encoded), piece):
                self._chunk(encoded[start : start + piece])
                time.sleep(behaviour.piece_delay)
        self._chunk(b"data: [DONE]\n\n")
        if behaviour.end_gate is not None:
            behaviour.end_gate.wait(timeout=20)
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "test",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class _UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: with dozens of concurrent requests (and the
    # proxy's connect probe) the accept queue overflowed and requests failed with a 502.
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        self.recorded: list[Recorded] = []
        self.behaviour = UpstreamBehaviour()
        self.accepted = 0  # TCP connections accepted, the proxy's reachability probes included
        self.own_requests: list[str] = []  # paths the proxy asked for itself (GET, its own user agent)

    def get_request(self) -> tuple[socket.socket, Any]:
        accepted = super().get_request()
        self.accepted += 1
        return accepted


@dataclass
class Upstream:
    server: _UpstreamServer
    thread: threading.Thread = field(repr=False)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def recorded(self) -> list[Recorded]:
        return self.server.recorded

    @property
    def accepted(self) -> int:
        return self.server.accepted

    @property
    def behaviour(self) -> UpstreamBehaviour:
        return self.server.behaviour

    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.recorded if r.path.startswith("/v1/chat/completions")]


@contextlib.contextmanager
def run_upstream() -> Iterator[Upstream]:
    server = _UpstreamServer()
    thread = threading.Thread(target=server.serve_forever, name="test-upstream", daemon=True)
    thread.start()
    try:
        yield Upstream(server, thread)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- a real mitmdump running the addon ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mitmdump_executable() -> str:
    candidate = Path(sys.executable).parent / "mitmdump"
    return str(candidate) if candidate.exists() else "mitmdump"


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for mitmdump to exit on its own; its exit status."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"mitmdump still running after {timeout} s:\n{self.log()}") from None

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> HttpResult:
        return http_request(method, self.base_url + path, body, headers)

    def get(self, path: str) -> HttpResult:
        return self.request("GET", path)

    def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> HttpResult:
        return self.request("POST", path, body, {"content-type": "application/json", **(headers or {})})


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float = 60
) -> HttpResult:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpResult(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as e:
        return HttpResult(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def proxy_env(env: Mapping[str, str], work_dir: Path) -> dict[str, str]:
    """The environment for mitmdump: ours without inherited scout settings, plus the test's own."""
    config = work_dir / "empty-config.yaml"
    config.write_text("{}\n")
    base = {k: v for k, v in os.environ.items() if k not in SETTING_ENV_NAMES}
    # A proxy stopped with requests still open waits STOP_GRACE_MS: short here, unless a test says otherwise.
    # BUILD_CACHE_DIR=auto: a build cache of this proxy's own (no test reads another's entries).
    xdg_cache = str(work_dir / "xdg-cache")
    return {**base, "SCOUT_CONFIG": str(config), "STOP_GRACE_MS": "1000", "XDG_CACHE_HOME": xdg_cache, **env}


@contextlib.contextmanager
def run_proxy(
    upstream_url: str,
    work_dir: Path,
    env: Mapping[str, str],
    extra_args: tuple[str, ...] = (),
    wait: bool = True,
    *,
    program: str = "mitmdump",
    listen: tuple[str, ...] = ("--listen-host", "127.0.0.1"),
    mode_suffix: str = "",
) -> Iterator[Proxy]:
    """Start ``mitmdump -s addon/scout.py`` in reverse mode in front of ``upstream_url``; stop it after.

    ``program="mitmweb"`` starts mitmweb instead (no browser opened; its web options go in extra_args)
    and waits for its web server as well. ``listen`` are the listen-host arguments (none: mitmproxy's
    default); ``mode_suffix`` is added to the mode (``"@0.0.0.0:{port}"``, formatted with the port).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = work_dir / f"{program}-{port}.log"
    command = [
        str(Path(mitmdump_executable()).with_name(program)),
        "-s", str(SCRIPT),
        "--mode", f"reverse:{upstream_url}{mode_suffix.format(port=port)}",
        *listen,
        "-p", str(port),
        "--set", f"confdir={work_dir / 'mitmproxy-conf'}",
        *(("--set", "web_open_browser=false") if program == "mitmweb" else ()),
        *extra_args,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=proxy_env(env, work_dir), cwd=work_dir
        )
    proxy = Proxy(process, port, log_path)
    try:
        if wait:
            wait_until_listening(proxy)
        deadline = time.monotonic() + 30
        while wait and program == "mitmweb" and "Web server listening at" not in proxy.log():
            if time.monotonic() > deadline or process.poll() is not None:  # it starts after the proxy
                raise AssertionError(f"mitmweb's web server did not start:\n{proxy.log()}")
            time.sleep(0.05)
        yield proxy
    finally:
        stop_process(process)


def wait_until_listening(proxy: Proxy, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            raise AssertionError(f"mitmdump exited with {proxy.process.returncode}:\n{proxy.log()}")
        if "listening at" in proxy.log():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", proxy.port), timeout=1):
                return
        time.sleep(0.05)
    raise AssertionError(f"mitmdump did not start listening within {timeout} s:\n{proxy.log()}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    """What the peer sends until it closes (or resets) the connection, read for at most ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        received += data
    return received


def raw_request(proxy: Proxy, method: str, path: str, body: str | None, headers: Mapping[str, str]) -> Answer:
    """One request with exactly these headers (http.client adds only Host, unless given, and Content-Length)."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host="host" in headers, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        encoded = body.encode() if body is not None else None
        if encoded is not None:
            connection.putheader("content-length", str(len(encoded)))
        connection.endheaders(encoded)
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


# --- mitmweb's own API ------------------------------------------------------------------------------


class MitmwebApi:
    """mitmweb's HTTP API, authenticated with the web_password given at start (a Bearer token)."""

    def __init__(self, port: int, token: str) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.headers = {"authorization": f"Bearer {token}"}

    def get(self, path: str) -> bytes:
        result = http_request("GET", self.base_url + path, headers=self.headers)
        assert result.status == 200, (path, result.status, result.body[:300])
        return result.body

    def put_json(self, path: str, payload: object) -> HttpResult:
        """A change, as the web UI sends it: with the XSRF token in a cookie and a header (tornado's check)."""
        xsrf = "ab" * 16
        headers = {
            **self.headers,
            "content-type": "application/json",
            "cookie": f"_mitmproxy_xsrf={xsrf}",
            "x-xsrftoken": xsrf,
        }
        return http_request("PUT", self.base_url + path, json.dumps(payload).encode(), headers)

    def chat_flows(self) -> list[dict[str, Any]]:
        flows = [f for f in json.loads(self.get("/flows.json")) if f["request"]["path"] == "/v1/chat/completions"]
        return sorted(flows, key=lambda f: f["request"]["timestamp_start"])


def mitmweb_args(port: int, token: str) -> tuple[str, ...]:
    return ("--set", "web_host=127.0.0.1", "--set", f"web_port={port}", "--set", f"web_password={token}")


# --- load and soak helpers ------------------------------------------------------------------------


def generated_files(count: int, file_bytes: int, seed: int = 1) -> dict[str, str | bytes]:
    """``count`` text files of about ``file_bytes`` each (deterministic), spread over 20 packages."""
    rng = random.Random(seed)
    files: dict[str, str | bytes] = {}
    for index in range(count):
        lines = []
        size = 0
        while size < file_bytes:
            line = f"value_{index}_{len(lines)} = '{rng.randbytes(24).hex()}'"
            lines.append(line)
            size += len(line) + 1
        files[f"pkg{index % 20:02d}/module_{index:04d}.py"] = "\n".join(lines) + "\n"
    return files


def process_tree_rss(pid: int) -> int:
    """Resident memory of a process and its children, in bytes (children that exit meanwhile count 0)."""
    process = psutil.Process(pid)
    total = int(process.memory_info().rss)
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += int(child.memory_info().rss)
    return total
