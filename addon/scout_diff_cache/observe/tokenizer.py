"""The upstream's own tokenizer as a token measure: exact counts for message 1's plan and a request's fit.

Two APIs, found once per upstream by ``probe_tokenizer``:

- vLLM and SGLang: ``POST /tokenize`` ``{"model", "prompt", "add_special_tokens": false}`` -> ``count``;
  for chat messages ``{"model", "messages", "add_generation_prompt": true}`` -> ``count``;
- llama.cpp: ``POST /tokenize`` ``{"content", "add_special": false, "parse_special": false}`` ->
  ``tokens``; chat messages through ``POST /apply-template`` first.

Counts are cached per text (a BLAKE2 digest: a file block is its path and blob, so a new commit
counts only new blocks) and asked for by ``WORKERS`` threads, each over one kept-alive connection.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from ..chat.upstream import USER_AGENT
from ..memo import ContentMemo

TokenizerKind = Literal["vllm", "llama.cpp"]
WORKERS = 8
KEPT_COUNTS = 262144  # about 20 MB of digests and counts: every block of a very large repository
TIMEOUT_SECONDS = 120


class TokenizeFailed(Exception):
    """The upstream did not count (unreachable, an error, an answer without a count)."""


@dataclass(frozen=True)
class TokenizerEndpoint:
    base_url: str  # scheme://host:port
    model: str | None
    authorization: str | None
    verify_tls: bool


class _Connections(threading.local):
    connection: http.client.HTTPConnection | None = None


def _connect(endpoint: TokenizerEndpoint) -> http.client.HTTPConnection:
    url = urllib.parse.urlsplit(endpoint.base_url)
    port = url.port
    if url.scheme == "https":
        context = ssl.create_default_context()
        if not endpoint.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(url.hostname or "", port, timeout=TIMEOUT_SECONDS, context=context)
    return http.client.HTTPConnection(url.hostname or "", port, timeout=TIMEOUT_SECONDS)


def post(endpoint: TokenizerEndpoint, local: _Connections, path: str, body: dict[str, object]) -> dict[str, object]:
    """POST a JSON body over this thread's kept-alive connection; the JSON object answered, or TokenizeFailed."""
    data = json.dumps(body, ensure_ascii=False).encode("utf-8")
    headers = {"content-type": "application/json", "user-agent": USER_AGENT}
    if endpoint.authorization:
        headers["authorization"] = endpoint.authorization
    for attempt in range(2):  # a kept-alive connection the server closed meanwhile: one retry on a new one
        if local.connection is None:
            local.connection = _connect(endpoint)
        try:
            local.connection.request("POST", path, data, headers)
            response = local.connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as e:
            local.connection.close()
            local.connection = None
            if attempt:
                raise TokenizeFailed(f"POST {path}: {type(e).__name__}: {e}") from None
            continue
        if response.status != 200:
            raise TokenizeFailed(f"POST {path} answered {response.status}")
        try:
            parsed = json.loads(answer)
        except (ValueError, RecursionError):
            raise TokenizeFailed(f"POST {path} answered something that is not JSON") from None
        if not isinstance(parsed, dict):
            raise TokenizeFailed(f"POST {path} answered {type(parsed).__name__}, not an object")
        return parsed
    raise TokenizeFailed(f"POST {path}: no answer")


def _count_in(answer: dict[str, object], kind: TokenizerKind) -> int:
    count = answer.get("count")
    if kind == "vllm" and isinstance(count, int) and not isinstance(count, bool):
        return count
    tokens = answer.get("tokens")
    if kind == "llama.cpp" and isinstance(tokens, list):
        return len(tokens)
    raise TokenizeFailed("the tokenizer answered without a count")


def _model(model: str | None) -> dict[str, object]:
    """vLLM's tokenizers take an optional model: none means the one it serves."""
    return {} if model is None else {"model": model}


def text_body(kind: TokenizerKind, model: str | None, text: str) -> dict[str, object]:
    if kind == "vllm":
        return {**_model(model), "prompt": text, "add_special_tokens": False}
    return {"content": text, "add_special": False, "parse_special": False}


# Counted once per upstream: its count tells tokenizers apart (different vocabularies split code,
# accents, CJK, emoji, digits and runs of spaces differently), so a plan kept on disk across
# restarts (context/buildcache.py) is never reused with another model's tokenizer.
PROBE_TEXT = (
    "def probe(value: int) -> str:\n    return f'{value:08d} naïve café — 東京タワー 🙂🚀'  # mixed\n"
    "SELECT COUNT(*) FROM users WHERE id IN (1, 22, 333, 4444);\n\t\tindented\twith   spaces    here\n"
    "Übergrößenträger, résumé, ﬁne; 1234567890 3.14159 0xDEADBEEF camelCaseIdentifier snake_case_name\n"
)


@dataclass(frozen=True)
class TokenizerProbe:
    kind: TokenizerKind
    probe_tokens: int  # tokens of PROBE_TEXT


def probe_tokenizer(endpoint: TokenizerEndpoint) -> TokenizerProbe | None:
    """Blocking: which tokenize API the upstream offers, and its count of PROBE_TEXT; None for neither."""
    local = _Connections()
    try:
        for kind in ("vllm", "llama.cpp"):
            try:
                count = _count_in(post(endpoint, local, "/tokenize", text_body(kind, endpoint.model, PROBE_TEXT)), kind)
                return TokenizerProbe(kind, count)
            except TokenizeFailed:
                continue
        return None
    finally:
        if local.connection is not None:
            local.connection.close()


@dataclass
class UpstreamTokenizer:
    """An exact ``TokenMeasure`` (context/tokens.py) over the upstream's tokenize API."""

    endpoint: TokenizerEndpoint
    kind: TokenizerKind
    probe_tokens: int = 0  # its count of PROBE_TEXT
    _counts: ContentMemo[int] = field(default_factory=lambda: ContentMemo(KEPT_COUNTS), repr=False)
    _local: _Connections = field(default_factory=_Connections, repr=False)
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(WORKERS, thread_name_prefix="scout tokenize"), repr=False
    )

    @property
    def name(self) -> str:
        return f"exact (the upstream's tokenizer, {self.kind} POST /tokenize)"

    @property
    def identity(self) -> str:
        model = self.endpoint.model or "the served model"
        return f"{self.name} at {self.endpoint.base_url}, {model}, {self.probe_tokens} tokens in PROBE_TEXT"

    @property
    def exact(self) -> bool:
        return True

    def count(self, texts: Sequence[str]) -> list[int]:
        """Blocking; TokenizeFailed if the upstream fails to count any of them."""
        keys = [ContentMemo.key(text.encode("utf-8", "surrogatepass")) for text in texts]
        known = self._counts.known(keys)
        missing = {key: text for key, text in zip(keys, texts, strict=True) if key not in known}
        for key, count in zip(missing, self._pool.map(self._count_one, missing.values()), strict=True):
            self._counts.put(key, count)
            known[key] = count
        return [known[key] for key in keys]

    def _count_one(self, text: str) -> int:
        body = text_body(self.kind, self.endpoint.model, text)
        return _count_in(post(self.endpoint, self._local, "/tokenize", body), self.kind)

    def count_chat(self, messages: list[object], tools: object | None) -> int:
        """Blocking: the prompt tokens of a chat request's messages as the upstream's template makes them."""
        extra: dict[str, object] = {"tools": tools} if tools else {}
        if self.kind == "vllm":
            body = {**_model(self.endpoint.model), "messages": messages, "add_generation_prompt": True, **extra}
            return _count_in(post(self.endpoint, self._local, "/tokenize", body), "vllm")
        template = post(self.endpoint, self._local, "/apply-template", {"messages": messages, **extra})
        prompt = template.get("prompt")
        if not isinstance(prompt, str):
            raise TokenizeFailed("POST /apply-template answered without a prompt")
        body = {"content": prompt, "add_special": True, "parse_special": True}
        return _count_in(post(self.endpoint, self._local, "/tokenize", body), "llama.cpp")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
