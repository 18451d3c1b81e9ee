"""The exact token count of the snapshot prefix, asked of the upstream once per snapshot.

The count is of the chat prompt up to the end of the snapshot message, as the upstream's own chat
template and tokenizer make it. Two APIs are tried, in this order:

- vLLM: ``POST /tokenize`` with ``{"model", "messages", "add_generation_prompt": false}`` -> ``count``;
- llama.cpp: ``POST /apply-template`` with the messages -> ``prompt`` (without the BOS token), then
  ``POST /tokenize`` with ``{"content": prompt, "add_special": true, "parse_special": true}`` -> ``tokens``
  (BOS added, as for a chat request).

An upstream that has neither (404, 405, or an answer without a count) is remembered and not
asked again; the verdict then uses an estimate and says so. Counting runs in a daemon thread, never
on the request path: the first answers with a new snapshot use the estimate.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
from collections import OrderedDict
from dataclasses import dataclass

from ..chat.upstream import post_json
from ..context.snapshot import Snapshot
from ..text import short_commit

logger = logging.getLogger(__name__)

COUNT_TIMEOUT_SECONDS = 600  # tokenizing ten million tokens takes a while on a busy server
KEPT_COUNTS = 16
RETRY_AFTER_SECONDS = 300
NOT_OFFERED = (404, 405, 501)


class NoCountApi(Exception):
    """The upstream offers neither tokenize API."""


@dataclass(frozen=True)
class CountRequest:
    base_url: str  # scheme://host:port of the upstream
    model: str | None
    authorization: str | None
    verify_tls: bool


def _post(request: CountRequest, path: str, body: bytes) -> object:
    answer = post_json(request.base_url + path, body, request.authorization, COUNT_TIMEOUT_SECONDS, request.verify_tls)
    try:
        return json.loads(answer)
    except (ValueError, RecursionError):  # e.g. a catch-all HTML page: no such API here
        raise NoCountApi(f"POST {path} answered something that is not JSON") from None


def _messages_body(snapshot: Snapshot, extra: dict[str, object]) -> bytes:
    head = json.dumps({**extra, "add_generation_prompt": False}, separators=(",", ":")).encode()[:-1]
    return head + b',"messages":[' + snapshot.message_json + b"]}"


def count_snapshot_tokens(request: CountRequest, snapshot: Snapshot) -> int:
    """Blocking: the snapshot prefix's token count from the upstream; NoCountApi if it has no API."""
    refused: urllib.error.HTTPError | None = None  # /tokenize exists but rejected the request
    try:
        answer = _post(request, "/tokenize", _messages_body(snapshot, {"model": request.model}))
        if isinstance(answer, dict) and type(answer.get("count")) is int:
            return int(answer["count"])
    except urllib.error.HTTPError as e:
        if e.code not in NOT_OFFERED:
            refused = e
    try:
        template = _post(request, "/apply-template", _messages_body(snapshot, {}))
    except urllib.error.HTTPError as e:
        if e.code not in NOT_OFFERED:
            raise
        if refused is not None:
            raise refused from None  # vLLM rejecting this prompt (too long?): not a missing API
        raise NoCountApi(f"POST /tokenize gave no count and /apply-template answered {e.code}") from None
    if not isinstance(template, dict) or not isinstance(template.get("prompt"), str):
        raise NoCountApi("POST /apply-template answered without a prompt")
    body = json.dumps({"content": template["prompt"], "add_special": True, "parse_special": True}).encode()
    tokens = _post(request, "/tokenize", body)
    if not isinstance(tokens, dict) or not isinstance(tokens.get("tokens"), list):
        raise NoCountApi("POST /tokenize answered without tokens")
    return len(tokens["tokens"])


class TokenCounter:
    """Exact counts per (upstream, snapshot), computed in the background once each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: OrderedDict[tuple[str, str | None, int], int] = OrderedDict()
        self._pending: set[tuple[str, str | None, int]] = set()
        self._no_api: set[str] = set()
        self._failed: dict[tuple[str, str | None, int], float] = {}

    def exact(self, base_url: str, snapshot: Snapshot) -> int | None:
        with self._lock:
            return self._counts.get(self._key(base_url, snapshot))

    def request(self, count_request: CountRequest, snapshot: Snapshot) -> None:
        """Start counting unless it is known, under way, or the upstream has no API for it."""
        key = self._key(count_request.base_url, snapshot)
        with self._lock:
            if key in self._counts or key in self._pending or count_request.base_url in self._no_api:
                return
            if time.monotonic() - self._failed.get(key, -RETRY_AFTER_SECONDS) < RETRY_AFTER_SECONDS:
                return
            self._pending.add(key)
        threading.Thread(
            target=self._count, args=(count_request, snapshot, key), name="scout token count", daemon=True
        ).start()

    def _count(self, count_request: CountRequest, snapshot: Snapshot, key: tuple[str, str | None, int]) -> None:
        count: int | None = None
        try:
            count = count_snapshot_tokens(count_request, snapshot)
        except NoCountApi as e:
            logger.info("%s offers no token count API (%s): cache verdicts use an estimate", count_request.base_url, e)
            with self._lock:
                self._no_api.add(count_request.base_url)
        except Exception as e:  # a busy or failing upstream: try again later
            logger.warning(
                "token count of snapshot %s failed (next try in %d s): %s: %s",
                short_commit(key[1]),
                RETRY_AFTER_SECONDS,
                type(e).__name__,
                e,
            )
            with self._lock:
                self._failed[key] = time.monotonic()
        finally:
            with self._lock:  # stored and no longer pending in one step: no second count can start between
                self._pending.discard(key)
                if count is not None:
                    self._counts[key] = count
                    while len(self._counts) > KEPT_COUNTS:
                        self._counts.popitem(last=False)
                    self._failed.pop(key, None)
        if count is not None:
            logger.info("snapshot %s is %d tokens (upstream /tokenize)", short_commit(key[1]), count)
            planned = snapshot.planned_tokens
            if planned is not None and count > planned:  # the plan's allowances (template, slack) fell short
                logger.warning(
                    "snapshot %s is %d tokens, more than the %d its fit to the window planned: requests near the "
                    "window's edge may be refused by the model server; lower SNAPSHOT_WINDOW_PERCENT",
                    short_commit(key[1]),
                    count,
                    planned,
                )

    @staticmethod
    def _key(base_url: str, snapshot: Snapshot) -> tuple[str, str | None, int]:
        return (base_url, snapshot.commit, snapshot.size)
