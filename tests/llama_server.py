"""A real llama.cpp ``llama-server`` on CPU with a tiny random-weight Llama model, for tests and benchmarks.

- :func:`llama_server_binary` builds (once per machine, about 6 min on 2 cores) and returns the server binary,
  via ``.ci/llama-server``; ``SCOUT_LLAMA_SERVER=/path/to/llama-server`` uses a given binary instead.
- :func:`write_tiny_gguf` writes a deterministic 2-layer Llama GGUF (about 6 MB) whose vocabulary is the Llama 4
  control tokens, the 256 byte tokens and printable ASCII: one token per byte of text (one per character for
  ASCII), one per control token, so prompt token counts are predictable. Its chat template renders the Llama 4 format.
- :func:`run_llama_server` starts the server on 127.0.0.1 and a free port and always stops it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import Repo

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / ".ci" / "llama-server"

# --- the tiny model ----------------------------------------------------------------------------------

N_LAYERS = 2
N_EMBD = 256
N_HEAD = 4
N_FF = 512
N_CTX_TRAIN = 131072
LLAMA4_LAYERS = 4  # llama.cpp's Llama 4 pattern: three chunked-attention layers, then a global one
LLAMA4_EXPERTS = 2
LLAMA4_FF_EXPERT = 256
LLAMA4_MOE_STEP = 2  # every second layer is a mixture of experts
LLAMA4_CHUNK_TOKENS = 8192  # llama.cpp fixes Llama 4's attention chunk at 8192 (src/models/llama4.cpp)
SEED = 20260101

# The Llama 4 control tokens, in this order at ids 0..len-1. Text uses the 256 byte tokens (<0x00>..<0xFF>)
# and one token per printable ASCII character (space spelled "▁", as SentencePiece does).
CONTROL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)
BOS_ID = CONTROL_TOKENS.index("<|begin_of_text|>")
EOT_ID = CONTROL_TOKENS.index("<|eot|>")
EOM_ID = CONTROL_TOKENS.index("<|eom|>")
PAD_ID = CONTROL_TOKENS.index("<|finetune_right_pad|>")
BYTE_BASE = len(CONTROL_TOKENS)
ASCII_BASE = BYTE_BASE + 256
PRINTABLE_ASCII = tuple(chr(c) for c in range(0x20, 0x7F))
VOCAB_SIZE = ASCII_BASE + len(PRINTABLE_ASCII)

# The Llama 4 chat format (as Meta's Llama 4 instruct template renders it; written here from the format,
# not copied): BOS; the FIRST message, if it is a system message, as
# "<|header_start|>system<|header_end|>\n\n" + its text TRIMMED + "<|eot|>" (a list of parts: only the first
# part's text); with `tools`, "Environment: ipython\n" goes before that text and the next message becomes a
# user turn that starts with the tool definitions; every other message verbatim (not trimmed) as
# "<|header_start|>{role}<|header_end|>\n\n{content}<|eot|>" (text parts concatenated, image parts as
# <|image|>); tool results JSON-encoded (strings too) under the "ipython" role; then the generation prompt. No
# date string. Checked against Meta's template (transformers' models/llama4/processing_llama4.py `chat_template`,
# the same text as meta-llama/Llama-4-Scout-17B-16E-Instruct's chat_template.json) through this llama-server's
# /apply-template: identical output for system/user/assistant turns, content parts, tool calls and tool
# results, and no generation prompt; only the wording of the tool instructions differs. To run with Meta's
# text itself, pass it as `write_tiny_gguf(path, chat_template=...)`.
# llama-server flattens content parts to one string joined with "\n" before the template sees them (the
# template's caps probe finds no typed-content support), so on llama.cpp a system message's parts all count.
LLAMA4_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if tools is not defined %}{%- set tools = none %}{%- endif %}
{%- set rest = messages %}
{%- if messages | length > 0 and messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_text = messages[0]['content'] | trim %}
    {%- else %}
        {%- set system_text = messages[0]['content'][0]['text'] | trim %}
    {%- endif %}
    {{- '<|header_start|>system<|header_end|>\\n\\n' }}
    {%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}
    {{- system_text + '<|eot|>' }}
    {%- set rest = messages[1:] %}
{%- endif %}
{%- if tools is not none and rest | length > 0 %}
    {{- '<|header_start|>user<|header_end|>\\n\\n' }}
    {{- 'To call one of these functions, answer with JSON {"name": ..., "parameters": {...}}.\\n\\n' }}
    {%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
    {%- if rest[0]['content'] is string %}{{- rest[0]['content'] | trim }}{%- endif %}
    {{- '<|eot|>' }}
    {%- set rest = rest[1:] %}
{%- endif %}
{%- for message in rest %}
    {%- if message['role'] == 'tool' or message['role'] == 'ipython' %}
        {{- '<|header_start|>ipython<|header_end|>\\n\\n' }}
        {{- message['content'] | tojson + '<|eot|>' }}
    {%- else %}
        {{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}
        {%- if message['tool_calls'] is defined and message['tool_calls'] %}{{- '<|python_start|>' }}{%- endif %}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- elif message['content'] is not none %}
            {%- for part in message['content'] %}
                {%- if part['type'] == 'image' or part['type'] == 'image_url' %}{{- '<|image|>' }}
                {%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message['tool_calls'] is defined and message['tool_calls'] %}
            {{- '<|python_end|>' }}
            {%- for call in message['tool_calls'] %}
                {{- '{"name": "' + call['function']['name'] + '", "parameters": ' }}
                {{- call['function']['arguments'] | tojson + '}' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}
"""


def _token_list() -> tuple[list[str], list[int]]:
    import gguf  # noqa: PLC0415 - test-only dependency, imported where used

    tokens = list(CONTROL_TOKENS)
    types = [int(gguf.TokenType.CONTROL)] * len(CONTROL_TOKENS)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(gguf.TokenType.BYTE)] * 256
    tokens += ["\u2581" if c == " " else c for c in PRINTABLE_ASCII]
    types += [int(gguf.TokenType.NORMAL)] * len(PRINTABLE_ASCII)
    assert len(tokens) == VOCAB_SIZE
    return tokens, types


def write_tiny_gguf(path: Path, *, chat_template: str = LLAMA4_CHAT_TEMPLATE, architecture: str = "llama") -> Path:
    """Write the tiny random-weight model (F32, fixed seed: the same bytes every time) to ``path``.

    ``architecture="llama"``: 2 plain Llama layers. ``"llama4"``: Scout's architecture in small, as
    llama.cpp loads it (src/models/llama4.cpp): 4 layers, three with chunked local attention (the
    chunk is llama.cpp's fixed 8192 tokens) and every fourth global without RoPE, run on its iSWA
    cache; every second layer a mixture of experts (2 experts, 1 used, plus the shared expert).
    """
    import gguf  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(SEED)

    def weight(*shape: int) -> Any:
        # numpy shape (rows, cols) = (out features, in features); GGUF stores the dims reversed.
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)).astype(np.float32)

    tokens, types = _token_list()
    path.parent.mkdir(parents=True, exist_ok=True)
    llama4 = architecture == "llama4"
    n_layers = LLAMA4_LAYERS if llama4 else N_LAYERS
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"scout-diff-cache tiny random {architecture}")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layers)
    if llama4:
        writer.add_expert_count(LLAMA4_EXPERTS)
        writer.add_expert_used_count(1)
        writer.add_expert_feed_forward_length(LLAMA4_FF_EXPERT)
        writer.add_interleave_moe_layer_step(LLAMA4_MOE_STEP)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB_SIZE)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))

    writer.add_tokenizer_model("llama")  # SentencePiece-style: byte fallback, no merges in this vocabulary
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * VOCAB_SIZE)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOT_ID)
    writer.add_eot_token_id(EOT_ID)
    writer.add_eom_token_id(EOM_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_unk_token_id(PAD_ID)  # never produced: every byte has a token
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)  # else SentencePiece puts a "▁" after every control token
    writer.add_chat_template(chat_template)

    writer.add_tensor("token_embd.weight", weight(VOCAB_SIZE, N_EMBD))
    for layer in range(n_layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_k.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_v.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        if llama4 and (layer + 1) % LLAMA4_MOE_STEP == 0:  # a mixture-of-experts layer
            experts, ff = LLAMA4_EXPERTS, LLAMA4_FF_EXPERT
            writer.add_tensor(f"{prefix}.ffn_gate_inp.weight", weight(experts, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_gate_exps.weight", weight(experts, ff, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_up_exps.weight", weight(experts, ff, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_down_exps.weight", weight(experts, N_EMBD, ff))
            writer.add_tensor(f"{prefix}.ffn_gate_shexp.weight", weight(ff, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_up_shexp.weight", weight(ff, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_down_shexp.weight", weight(N_EMBD, ff))
        else:
            writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(N_FF, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_up.weight", weight(N_FF, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", weight(VOCAB_SIZE, N_EMBD))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def code_like_text(marker: str, chars: int = 3000) -> str:
    """About ``chars`` ASCII characters of code-like lines, the first one naming ``marker`` (deterministic)."""
    lines = [f"# {marker}"]
    size = len(lines[0])
    i = 0
    while size < chars:
        line = f"def function_{i}(x):  return x * {i} + {i % 7}  # line {i}"
        lines.append(line)
        size += len(line) + 1
        i += 1
    return "\n".join(lines)


# --- the server binary -------------------------------------------------------------------------------


@functools.cache
def llama_server_binary() -> Path:
    """The llama-server binary: ``$SCOUT_LLAMA_SERVER``, else ``.ci/llama-server`` (builds it if not cached)."""
    override = os.environ.get("SCOUT_LLAMA_SERVER")
    if override:
        return Path(override)
    # stderr is inherited: build progress shows up (or is captured by pytest) instead of vanishing.
    result = subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, check=False, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{BUILD_SCRIPT} failed with exit status {result.returncode}")
    binary = Path(lines[-1])
    if not binary.is_file():
        raise RuntimeError(f"{BUILD_SCRIPT} printed {binary}, which is not a file")
    return binary


# --- running it ----------------------------------------------------------------------------------------


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy from the environment


def http(method: str, url: str, body: Any = None, timeout: float = 120) -> HttpReply:
    """One HTTP request; ``body`` (if not None) is sent as JSON. HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"content-type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return HttpReply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as e:
        return HttpReply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def sse_events(body: bytes) -> list[Any]:
    """The JSON payloads of an SSE body's ``data:`` lines, in order (``[DONE]`` left out)."""
    events = []
    for line in body.decode("utf-8").splitlines():
        if line.startswith("data:"):
            payload = line[len("data:") :].strip()
            if payload != "[DONE]":
                events.append(json.loads(payload))
    return events


@dataclass
class LlamaServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    model_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def get(self, path: str) -> HttpReply:
        return http("GET", self.url + path)

    def post(self, path: str, body: Any) -> HttpReply:
        return http("POST", self.url + path, body)

    def chat(self, body: Mapping[str, Any]) -> Any:
        """POST /v1/chat/completions; the decoded JSON (non-streamed) — fails on a non-200 answer."""
        reply = self.post("/v1/chat/completions", dict(body))
        if reply.status != 200:
            raise AssertionError(f"HTTP {reply.status}: {reply.body[:2000]!r}\n{self.log_tail()}")
        return reply.json()

    def count_chat_tokens(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> int:
        """Exact prompt tokens of ``messages`` as the server renders them (BOS included)."""
        reply = self.post(
            "/v1/chat/completions/input_tokens",
            {"messages": list(messages), "add_generation_prompt": add_generation_prompt},
        )
        if reply.status != 200:
            raise AssertionError(f"HTTP {reply.status}: {reply.body[:2000]!r}")
        return int(reply.json()["input_tokens"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_ready(server: LlamaServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {server.process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            if http("GET", server.url + "/health", timeout=2).status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"llama-server not ready within {timeout} s:\n{server.log_tail()}")


@contextlib.contextmanager
def run_llama_server(
    model_path: Path,
    *,
    ctx_size: int = 32768,
    slots: int = 1,
    threads: int | None = None,
    alias: str = "tiny-llama4",
    extra_args: Sequence[str] = (),
    log_dir: Path | None = None,
    startup_timeout: float = 60,
) -> Iterator[LlamaServer]:
    """Start llama-server for ``model_path`` on 127.0.0.1 (free port, ``--metrics``, ``--jinja``), wait until
    ``/health`` says ready, yield it, and always stop it. Its log goes to a file in ``log_dir`` (a temp dir if
    None); the tail is printed when the body raises (pytest shows it with the failure).

    ``--jinja`` (this version's default, given explicitly): the GGUF's Llama 4 template is rendered as
    written. Without it llama.cpp would detect "llama4" and use its built-in C++ formatter, which trims every
    message, not only the first system message as Llama 4's own template does.
    """
    binary = llama_server_binary()
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="scout-llama-server-"))
    for attempt in range(3):
        port = _free_port()
        log_path = log_dir / f"llama-server-{port}.log"
        command = [
            str(binary),
            "--model", str(model_path),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--ctx-size", str(ctx_size),
            "--parallel", str(slots),
            "--threads", str(threads or os.cpu_count() or 2),
            "--alias", alias,
            "--metrics",
            "--jinja",
            "--no-webui",
            *extra_args,
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = LlamaServer(process, port, log_path, model_path)
        try:
            _wait_ready(server, startup_timeout)
        except RuntimeError:
            _stop(process)
            if attempt < 2 and "bind" in server.log().lower():  # the free port was taken meanwhile
                continue
            raise
        break
    try:
        yield server
    except BaseException:
        print(f"--- llama-server log tail ({server.log_path}) ---\n{server.log_tail()}")
        raise
    finally:
        _stop(server.process)


# --- a code base for the cache tests and the benchmark --------------------------------------------

EARLY_FILE = "1_early.py"  # second in path order, after the marker: an edit here changes the snapshot early


def repo_files(marker: str, modules: int = 26, module_bytes: int = 300) -> dict[str, str]:
    """A small deterministic code base: a marker file, an early file, ``modules`` modules of about module_bytes."""
    files = {"0_marker.txt": f"repository for {marker}\n"}
    files[EARLY_FILE] = "".join(f"EARLY_{i} = {i}  # an early constant\n" for i in range(12))
    for m in range(modules):
        lines = [f'"""Module {m}."""\n']
        size = len(lines[0])
        i = 0
        while size < module_bytes:
            line = f"def f_{m}_{i}(x):\n    return x * {i} + {m % 7}\n"
            lines.append(line)
            size += len(line)
            i += 1
        files[f"pkg/mod_{m:03d}.py"] = "".join(lines)
    return files


def edit_early_file(repo: Repo) -> str:
    """Commit a one-line edit in the middle of EARLY_FILE; the new HEAD."""
    text = (repo.path / EARLY_FILE).read_text()
    repo.write({EARLY_FILE: text.replace("EARLY_6 = 6 ", "EARLY_6 = 66")})
    return repo.commit_all("change an early constant")


# --- recorded samples ----------------------------------------------------------------------------------

SAMPLES_DIR = ROOT / "tests" / "data" / "llama_server"


def record_samples(out_dir: Path = SAMPLES_DIR) -> list[Path]:
    """Run the tiny server and save requests and raw response bodies (see the README there); the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(name: str, data: bytes | str) -> None:
        path = out_dir / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        written.append(path)

    def exchange(server: LlamaServer, name: str, path: str, body: Any, suffix: str = "json") -> HttpReply:
        save(f"{name}.request.json", json.dumps({"path": path, "body": body}, indent=2) + "\n")
        reply = server.post(path, body)
        save(f"{name}.response.{suffix}", reply.body)
        return reply

    snapshot = {"role": "system", "content": code_like_text("snapshot of the repository", 1500)}
    diff = {"role": "system", "content": "diff --git a/app.py b/app.py\n+print('hello')\n"}
    prefix = [snapshot, diff]

    def chat(question: str, **extra: Any) -> dict[str, Any]:
        return {
            "model": "tiny-llama4",
            "messages": [*prefix, {"role": "user", "content": question}],
            "max_tokens": 4,
            "temperature": 0,
            **extra,
        }

    with tempfile.TemporaryDirectory(prefix="scout-llama-samples-") as tmp:
        model = write_tiny_gguf(Path(tmp) / "tiny-llama4.gguf")
        with run_llama_server(model, ctx_size=4096, log_dir=Path(tmp)) as server:
            exchange(server, "chat-nonstream-cold", "/v1/chat/completions", chat("What does function_3 return?"))
            exchange(server, "chat-nonstream-cached", "/v1/chat/completions", chat("Which function adds 5?"))
            exchange(
                server,
                "chat-stream-include-usage",
                "/v1/chat/completions",
                chat("Name a function.", stream=True, stream_options={"include_usage": True}),
                suffix="sse",
            )
            exchange(server, "chat-stream-no-usage", "/v1/chat/completions", chat("Another?", stream=True), "sse")
            prompt = exchange(
                server, "apply-template", "/apply-template", {"messages": prefix, "add_generation_prompt": False}
            ).json()["prompt"]
            exchange(server, "tokenize", "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})
            exchange(
                server,
                "tokenize-with-pieces",
                "/tokenize",
                {"content": "<|header_start|>user<|header_end|>\n\nhi é", "add_special": True, "with_pieces": True},
            )
            exchange(server, "tokenize-messages", "/tokenize", {"messages": prefix})
            exchange(
                server,
                "chat-input-tokens",
                "/v1/chat/completions/input_tokens",
                {"messages": prefix, "add_generation_prompt": False},
            )
            too_long = {"model": "tiny-llama4", "messages": [{"role": "user", "content": "x" * 20000}], "max_tokens": 4}
            exchange(server, "chat-context-exceeded", "/v1/chat/completions", too_long)
            save("metrics.txt", server.get("/metrics").body)
            save("props.json", server.get("/props").body)
            version = subprocess.run(
                [str(llama_server_binary()), "--version"], capture_output=True, text=True, check=True
            )
            save("llama-server-version.txt", (version.stdout + version.stderr).strip() + "\n")
    return written


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["record"]:
        sys.exit(f"usage: {sys.argv[0]} record   (re-records {SAMPLES_DIR})")
    for written_path in record_samples():
        print(written_path)
