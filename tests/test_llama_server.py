"""A real llama-server (CPU, tiny random-weight Llama, Llama 4 chat template): its prefix cache and usage reports.

The server is built once per machine by ``.ci/llama-server`` (about 6 min on 2 cores the first time).
One server (one slot) serves the whole module; every test starts its prompts with its own marker, so what an
earlier test left in the slot shares only the first few template tokens with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from llama_server import SAMPLES_DIR, LlamaServer, code_like_text, run_llama_server, sse_events, write_tiny_gguf

# Tokens the Llama 4 template adds around one message: <|header_start|> role <|header_end|> "\n\n" ... <|eot|>
HEADER_START, HEADER_END, EOT, BOS = 1, 1, 1, 1


def message_tokens(role: str, content: str) -> int:
    """Tokens of one rendered message in the tiny vocabulary (one token per ASCII byte, one per control token)."""
    return HEADER_START + len(role) + HEADER_END + 2 + len(content.encode()) + EOT


def chat_tokens(messages: Sequence[Mapping[str, str]], generation_prompt: bool = True) -> int:
    """Prompt tokens the Llama 4 template gives ``messages`` (string contents, no tools)."""
    total = BOS
    for i, m in enumerate(messages):
        content = m["content"].strip() if i == 0 and m["role"] == "system" else m["content"]
        total += message_tokens(m["role"], content)
    if generation_prompt:
        total += HEADER_START + len("assistant") + HEADER_END + 2
    return total


def apply_template(server: LlamaServer, body: dict[str, Any]) -> str:
    reply = server.post("/apply-template", body)
    assert reply.status == 200, reply.body[:2000]
    return str(reply.json()["prompt"])


def chat_body(messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, **extra}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("llama-model") / "tiny-llama4.gguf")


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    with run_llama_server(model_path, ctx_size=16384, slots=1, log_dir=tmp_path_factory.mktemp("llama-log")) as s:
        yield s


@pytest.fixture(autouse=True)
def server_log_on_failure(server: LlamaServer) -> Iterator[None]:
    """Print what the server logged during each test; pytest shows it only for a test that failed."""
    start = server.log_size()
    yield
    during = server.log_since(start)[-6000:] or f"(nothing)\n--- its last lines ---\n{server.log_tail(20)}"
    print(f"--- llama-server log during this test ({server.log_path}) ---\n{during}")


def test_server_uses_the_llama4_template(server: LlamaServer) -> None:
    messages = [
        {"role": "system", "content": "  snapshot  "},
        {"role": "system", "content": " diff "},
        {"role": "user", "content": " question "},
    ]
    prompt = apply_template(server, {"messages": messages})
    # The BOS is left out of the rendered text (the tokenizer adds it: tokenizer.ggml.add_bos_token = true);
    # the first system message is trimmed, the others are not.
    assert prompt == (
        "<|header_start|>system<|header_end|>\n\nsnapshot<|eot|>"
        "<|header_start|>system<|header_end|>\n\n diff <|eot|>"
        "<|header_start|>user<|header_end|>\n\n question <|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    props = server.get("/props").json()
    assert "<|header_start|>" in props["chat_template"]
    assert props["bos_token"] == "<|begin_of_text|>"
    assert props["eos_token"] == "<|eot|>"
    assert props["default_generation_settings"]["params"]["chat_format"] == "Content-only"


def test_server_joins_content_parts_with_newlines(server: LlamaServer) -> None:
    """llama-server flattens a list of text parts to one string joined by "\n" before the template runs
    (vLLM with Meta's template would keep only a system message's first part)."""
    parts = [{"type": "text", "text": " first "}, {"type": "text", "text": "second"}]
    prompt = apply_template(server, {"messages": [{"role": "system", "content": parts}]})
    assert prompt.startswith("<|header_start|>system<|header_end|>\n\nfirst \nsecond<|eot|>")


def test_tools_move_the_system_text_and_turn_the_next_message_into_a_user_turn(server: LlamaServer) -> None:
    tools = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "SNAPSHOT"},
        {"role": "system", "content": "DIFF"},
        {"role": "user", "content": "Q"},
    ]
    prompt = apply_template(server, {"messages": messages, "tools": tools})
    assert prompt.startswith("<|header_start|>system<|header_end|>\n\nEnvironment: ipython\nSNAPSHOT<|eot|>")
    # As in Meta's template (tools_in_user_message): the message after the first system message becomes a user
    # turn that starts with the tool definitions, whatever its role.
    second_turn = prompt.split("<|eot|>")[1]
    assert second_turn.startswith("<|header_start|>user<|header_end|>\n\n")
    assert '"name": "read"' in second_turn
    assert second_turn.endswith("DIFF")


def test_non_streamed_usage_and_timings(server: LlamaServer) -> None:
    messages = [
        {"role": "system", "content": code_like_text("non-streamed", 500)},
        {"role": "user", "content": "What does function_3 return?"},
    ]
    response = server.chat(chat_body(messages))
    assert response["object"] == "chat.completion"
    assert isinstance(response["choices"][0]["message"]["content"], str)
    assert response["choices"][0]["finish_reason"] in {"length", "stop"}
    usage = response["usage"]
    assert set(usage) == {"completion_tokens", "prompt_tokens", "total_tokens", "prompt_tokens_details"}
    assert usage["prompt_tokens"] == chat_tokens(messages)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 4
    timings = response["timings"]
    assert {"cache_n", "prompt_n", "prompt_ms", "predicted_n", "predicted_ms"} <= set(timings)
    assert usage["prompt_tokens_details"]["cached_tokens"] == timings["cache_n"]
    assert timings["cache_n"] + timings["prompt_n"] == usage["prompt_tokens"]
    assert timings["prompt_ms"] > 0


def test_shared_prefix_is_reused(server: LlamaServer) -> None:
    system = {"role": "system", "content": code_like_text("shared-prefix")}
    first = server.chat(chat_body([system, {"role": "user", "content": "Which function adds 3?"}]))
    second = server.chat(chat_body([system, {"role": "user", "content": "Name a function returning 0."}]))

    shared = chat_tokens([system], generation_prompt=False) + HEADER_START + len("user") + HEADER_END + 2
    assert shared > 2900
    # The first request shares only the template's first tokens with what the slot held before.
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < 20
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == second["timings"]["cache_n"]
    # Token-exact longest common prefix: everything up to the first differing character of the questions.
    assert cached == shared
    assert second["timings"]["prompt_n"] == second["usage"]["prompt_tokens"] - shared
    assert second["timings"]["prompt_n"] * 10 < first["timings"]["prompt_n"]
    # Ratios only: a hit costs far less prompt time than the cold request.
    assert second["timings"]["prompt_ms"] * 3 < first["timings"]["prompt_ms"]


def test_early_change_destroys_reuse(server: LlamaServer) -> None:
    text = code_like_text("early-change")
    question = {"role": "user", "content": "Which function adds 3?"}
    server.chat(chat_body([{"role": "system", "content": text}, question]))
    edited = text[:40] + "X" + text[41:]  # one character changed near the start
    assert edited != text
    response = server.chat(chat_body([{"role": "system", "content": edited}, question]))
    cached = response["usage"]["prompt_tokens_details"]["cached_tokens"]
    before_change = BOS + HEADER_START + len("system") + HEADER_END + 2 + 40
    assert cached == before_change
    assert response["timings"]["prompt_n"] == response["usage"]["prompt_tokens"] - before_change


def test_exact_repeat_evaluates_the_last_token(server: LlamaServer) -> None:
    messages = [{"role": "system", "content": code_like_text("repeat", 800)}, {"role": "user", "content": "Again?"}]
    server.chat(chat_body(messages))
    again = server.chat(chat_body(messages))
    assert again["timings"]["prompt_n"] == 1
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1


def _stream(server: LlamaServer, body: dict[str, Any]) -> tuple[str, list[Any]]:
    reply = server.post("/v1/chat/completions", {**body, "stream": True})
    assert reply.status == 200, reply.body[:2000]
    assert reply.headers["content-type"].startswith("text/event-stream")
    text = reply.body.decode()
    assert text.rstrip().endswith("data: [DONE]")
    return text, sse_events(reply.body)


def test_stream_with_include_usage(server: LlamaServer) -> None:
    messages = [{"role": "system", "content": code_like_text("stream-usage", 400)}, {"role": "user", "content": "Hi?"}]
    _, events = _stream(server, chat_body(messages, stream_options={"include_usage": True}))
    *content_chunks, finish_chunk, usage_chunk = events
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    # Usage comes in its own last chunk with an empty choices list (OpenAI's shape), timings with it.
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == chat_tokens(messages)
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] == usage_chunk["timings"]["cache_n"]
    assert usage_chunk["timings"]["cache_n"] + usage_chunk["timings"]["prompt_n"] == chat_tokens(messages)
    # The chunk before carries finish_reason and nothing else: no usage, no timings.
    assert finish_chunk["choices"][0]["finish_reason"] in {"length", "stop"}
    assert "usage" not in finish_chunk
    assert "timings" not in finish_chunk
    assert all("usage" not in e and "timings" not in e for e in content_chunks)


def test_stream_without_include_usage(server: LlamaServer) -> None:
    messages = [{"role": "system", "content": code_like_text("stream-plain", 400)}, {"role": "user", "content": "Hi?"}]
    _, events = _stream(server, chat_body(messages))
    *content_chunks, finish_chunk = events
    assert all("usage" not in e for e in events)  # no usage at all without include_usage
    # ...but timings still come, on the finish_reason chunk: cache_n + prompt_n = the prompt's tokens.
    assert finish_chunk["choices"][0]["finish_reason"] in {"length", "stop"}
    assert finish_chunk["timings"]["cache_n"] + finish_chunk["timings"]["prompt_n"] == chat_tokens(messages)
    assert all("timings" not in e for e in content_chunks)


def test_counting_the_tokens_of_a_chat_prefix(server: LlamaServer) -> None:
    prefix = [
        {"role": "system", "content": code_like_text("count", 700)},
        {"role": "system", "content": "diff --git a/x b/x\n+new line\n"},
    ]
    expected = chat_tokens(prefix, generation_prompt=False)
    # 1. One call: the chat token-count endpoint (the whole request body is accepted; add_generation_prompt off
    #    counts the prefix alone).
    counted = server.post("/v1/chat/completions/input_tokens", {"messages": prefix, "add_generation_prompt": False})
    assert counted.json() == {"input_tokens": expected, "object": "response.input_tokens"}
    # 2. Two calls: render, then tokenize with add_special (the BOS) and parse_special (the control tokens).
    prompt = apply_template(server, {"messages": prefix, "add_generation_prompt": False})
    tokens = server.post("/tokenize", {"content": prompt, "add_special": True, "parse_special": True}).json()
    assert len(tokens["tokens"]) == expected
    # add_special defaults to false: one token (the BOS) fewer.
    assert len(server.post("/tokenize", {"content": prompt}).json()["tokens"]) == expected - 1
    # vLLM's {"messages": [...]} form is not understood by /tokenize: no error, just no tokens.
    assert server.post("/tokenize", {"messages": prefix}).json() == {"tokens": []}
    # The prefix's count is what a later request finds cached, when it is the prefix of what was sent before.
    server.chat(chat_body([*prefix, {"role": "user", "content": "First question?"}]))
    later = server.chat(chat_body([*prefix, {"role": "user", "content": "Second question?"}]))
    assert later["usage"]["prompt_tokens_details"]["cached_tokens"] == expected + HEADER_START + 4 + HEADER_END + 2


def test_metrics_count_cached_prompt_tokens(server: LlamaServer) -> None:
    def counter(name: str) -> float:
        text = server.get("/metrics").body.decode()
        match = re.search(rf"^llamacpp:{name} (\S+)$", text, re.MULTILINE)
        assert match, text
        return float(match.group(1))

    system = {"role": "system", "content": code_like_text("metrics", 1000)}
    server.chat(chat_body([system, {"role": "user", "content": "One?"}]))
    before = counter("prompt_tokens_cached_total")
    second = server.chat(chat_body([system, {"role": "user", "content": "Two?"}]))
    assert counter("prompt_tokens_cached_total") - before == second["usage"]["prompt_tokens_details"]["cached_tokens"]


def _shape(value: Any) -> Any:
    """The structure of a JSON value: keys and value types, not values (a list: the set of its items' shapes)."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return sorted({repr(_shape(item)) for item in value})
    if isinstance(value, bool) or value is None:
        return repr(value) if value is None else "bool"
    return "number" if isinstance(value, int | float) else type(value).__name__


SAMPLE_NAMES = sorted(p.name.removesuffix(".request.json") for p in SAMPLES_DIR.glob("*.request.json"))


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_recorded_samples_match_this_server(server: LlamaServer, name: str) -> None:
    """Replays each recorded request: the live answer has the recorded status and structure (keys, types)."""
    request = json.loads((SAMPLES_DIR / f"{name}.request.json").read_text())
    (recorded_path,) = SAMPLES_DIR.glob(f"{name}.response.*")
    reply = server.post(request["path"], request["body"])
    recorded = recorded_path.read_bytes()
    if recorded_path.suffix == ".sse":
        live_events, recorded_events = sse_events(reply.body), sse_events(recorded)
        assert _shape(live_events) == _shape(recorded_events)
        assert _shape(live_events[-2:]) == _shape(recorded_events[-2:])  # where usage and timings go
    else:
        expected_status = 400 if "error" in json.loads(recorded) else 200
        assert reply.status == expected_status
        assert _shape(reply.json()) == _shape(json.loads(recorded))
