"""Did the upstream reuse the snapshot? The per-request cache verdict and its likely cause.

The snapshot is the prefix that should be cached: the prompt up to the end of system message 1.
Its token count is exact when the upstream's /tokenize gave it, else estimated as the upstream's
own ``prompt_tokens`` times the snapshot's share of the message bytes. Against the cached tokens
the upstream reports:

- hit: the cache covers the snapshot (less a small tolerance: vLLM caches whole 16-token blocks);
- partial: the cache ended inside the snapshot, at about the file named;
- miss: nothing past the chat template's first tokens was reused;
- unknown: the upstream reports no cached tokens.

The cause comes from what this proxy sent to the same upstream before (:class:`CacheTracker`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from ..chat.usage import UpstreamUsage
from ..context.snapshot import Snapshot, common_prefix_length, path_at
from ..text import short_commit

Verdict = Literal["hit", "partial", "miss", "unknown"]
VERDICTS: tuple[Verdict, ...] = ("hit", "partial", "miss", "unknown")

# An exact count may exceed what is cached by the template's tokens around the message, vLLM's
# unfilled last block (up to 15 tokens) or llama.cpp's re-evaluated last token.
EXACT_TOLERANCE_TOKENS = 64
# vLLM caches whole blocks of its KV manager: 16 tokens, but on a hybrid model like Llama 4 (global
# and chunked-local attention) the groups align to more (128 on the tests' tiny llama4). A block is
# taken to be the largest power of two that divides both counts it reports, cached and written
# (their gcd can be a multiple of it); at most this.
MAX_CACHE_GRAIN_TOKENS = 8192
# An estimate is off by the snapshot's token density against the rest of the prompt.
ESTIMATE_TOLERANCE_SHARE = 0.03
# Below this many cached tokens nothing but the template's first tokens was reused.
MISS_BELOW_TOKENS = 64
RECENT_WINDOW = 100
# A miss although this share of the snapshot was an identical prefix of the last one: the engine lost it.
LOST_PREFIX_SHARE = 0.05
SLIDING_WINDOW_HINT = (
    "; llama.cpp prefilled an identical prefix again: with a sliding-window model (Llama 4 Scout's chunked "
    "attention) it keeps no cache for a difference that far back unless llama-server runs with --swa-full; "
    "LAYOUT=append keeps differences at the end"
)
# A snapshot "extends" the previous one when they share all of it but its closing framing.
APPEND_CLOSING_BYTES = 256

ENGINE_HINT = "vLLM needs --enable-prompt-tokens-details, SGLang --enable-cache-report; TGI reports no cached tokens"


def appends_to(snapshot: Snapshot, previous: Snapshot, shared_bytes: int) -> bool:
    """Whether ``snapshot`` is ``previous`` with history blocks appended (they share ``shared_bytes``).

    Both conditions: the two part inside the history (after the same base), and all of the
    previous snapshot but its closing framing is shared.
    """
    in_history = snapshot.history_start is not None and shared_bytes >= snapshot.history_start
    return in_history and shared_bytes >= len(previous.message_json) - APPEND_CLOSING_BYTES


@dataclass(frozen=True)
class SnapshotTokens:
    count: int
    exact: bool


@dataclass(frozen=True)
class SendHistory:
    """What this proxy had sent to the same upstream before this request."""

    first_request: bool  # nothing sent to this upstream since the proxy started
    snapshot_seen: bool  # this snapshot was sent before
    previous_commit: str | None  # the snapshot commit of the previous request, when it was another snapshot
    snapshot_changed: bool  # the previous request carried another snapshot
    reusable_bytes: int | None  # bytes this snapshot shares with the previous one, when it changed
    changed_at: str | None  # the first file where they differ
    tools_changed: bool  # tools differ from the previous request with this snapshot
    reports_cache: bool  # this upstream has reported cached tokens before
    appended: bool = False  # this snapshot is the previous one with blocks appended (append layout)

    def expectation(self) -> str:
        """What the proxy expects before the answer: 'hit', or 'miss; <why>' (for a response header)."""
        if self.first_request:
            return "miss; first request to this upstream"
        if not self.snapshot_seen:
            if self.appended:  # everything before the new blocks is cached; only they are prefilled
                return "hit; new commit appended to the cached snapshot"
            return "miss; new commit" if self.snapshot_changed else "miss; new snapshot"
        if self.tools_changed:
            return "miss; tools changed"
        return "hit"


@dataclass(frozen=True)
class CacheVerdict:
    verdict: Verdict
    cause: str  # a few words, for the mitmweb comment and headers
    detail: str  # one sentence, for the log
    prompt_tokens: int | None
    cached_tokens: int | None
    snapshot_tokens: SnapshotTokens | None

    @property
    def cached_share(self) -> float | None:
        """Cached tokens over prompt tokens."""
        if self.cached_tokens is None or not self.prompt_tokens:
            return None
        return min(self.cached_tokens / self.prompt_tokens, 1.0)

    def summary(self) -> str:
        """'cached 99.8% (hit)', 'cached 0.1% (miss: new commit)', 'cache unknown (...)'."""
        label = self.verdict if not self.cause else f"{self.verdict}: {self.cause}"
        share = self.cached_share
        if share is None:
            return f"cache {label}" if self.verdict == "unknown" else f"({label})"
        return f"cached {share * 100:.1f}% ({label})"

    def headline(self) -> str:
        """What a flow list shows first: 'hit 99.8%', 'miss 0.1%: new commit', 'unknown: <cause>'."""
        share = f" {self.cached_share * 100:.1f}%" if self.cached_share is not None else ""
        return f"{self.verdict}{share}" + (f": {self.cause}" if self.cause else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "cause": self.cause,
            "detail": self.detail,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "snapshot_tokens": self.snapshot_tokens.count if self.snapshot_tokens else None,
            "snapshot_tokens_exact": self.snapshot_tokens.exact if self.snapshot_tokens else None,
            "cached_share": self.cached_share,
        }


def cache_grain(usage: UpstreamUsage) -> int:
    """The engine's caching step, from one answer: the power of two in the gcd of vLLM's cached and
    written counts (0 if either is unknown or 0)."""
    cached, written = usage.cached_tokens or 0, usage.written_tokens or 0
    if cached <= 0 or written <= 0:
        return 0
    common = math.gcd(cached, written)
    return min(common & -common, MAX_CACHE_GRAIN_TOKENS)


def estimate_snapshot_tokens(prompt_tokens: int, snapshot_bytes: int, messages_bytes: int) -> SnapshotTokens:
    """The snapshot's tokens as its share of the message bytes, scaled by the upstream's own count."""
    share = snapshot_bytes / messages_bytes if messages_bytes > 0 else 1.0
    return SnapshotTokens(round(prompt_tokens * min(share, 1.0)), exact=False)


def classify(
    usage: UpstreamUsage | None,
    snapshot_tokens: SnapshotTokens | None,
    history: SendHistory,
    snapshot: Snapshot,
) -> CacheVerdict:
    if usage is None:
        return CacheVerdict("unknown", "no usage", f"the upstream sent no usage; {ENGINE_HINT}", None, None, None)
    cached = usage.cached_tokens
    if cached is None and history.reports_cache and usage.prompt_tokens is not None:
        cached = 0  # vLLM leaves prompt_tokens_details out when nothing was cached
    if cached is None:
        expected_miss = "" if history.snapshot_seen else " (vLLM also leaves the count out when nothing was cached)"
        return CacheVerdict(
            "unknown",
            "upstream reports no cached tokens",
            f"the upstream reported no cached tokens{expected_miss}; {ENGINE_HINT}",
            usage.prompt_tokens,
            None,
            snapshot_tokens,
        )
    expected = snapshot_tokens.count if snapshot_tokens else None
    appended = _appended_share(history, snapshot)
    if expected is None or expected <= 0:
        verdict: Verdict = "miss" if cached < MISS_BELOW_TOKENS else "hit"
    else:
        tolerance = (
            max(EXACT_TOLERANCE_TOKENS, cache_grain(usage))
            if snapshot_tokens and snapshot_tokens.exact
            else expected * ESTIMATE_TOLERANCE_SHARE
        )
        if cached >= expected - tolerance:
            verdict = "hit"
        elif appended is not None and cached >= expected * appended - expected * ESTIMATE_TOLERANCE_SHARE:
            # Append layout, new commit: all that could be cached was, the new history block was not.
            return CacheVerdict(
                "hit",
                "new commit",
                f"new commit: everything before its history block was reused (it changes at {history.changed_at}); "
                "only the new block was prefilled",
                usage.prompt_tokens,
                cached,
                snapshot_tokens,
            )
        elif cached < MISS_BELOW_TOKENS:
            verdict = "miss"
        else:
            verdict = "partial"
    cause, detail = _cause(verdict, cached, expected, history, snapshot)
    if (
        verdict == "miss"
        and usage.evaluated_tokens is not None
        and _shared_share(history, snapshot) >= LOST_PREFIX_SHARE
    ):
        detail += SLIDING_WINDOW_HINT  # llama.cpp (it alone reports timings) prefilled an identical prefix again
    return CacheVerdict(verdict, cause, detail, usage.prompt_tokens, cached, snapshot_tokens)


def _shared_share(history: SendHistory, snapshot: Snapshot) -> float:
    """The share of the snapshot that is an identical prefix of the previous one (0 when unknown)."""
    if history.reusable_bytes is None or not snapshot.size:
        return 0.0
    return history.reusable_bytes / snapshot.size


def _appended_share(history: SendHistory, snapshot: Snapshot) -> float | None:
    """Append layout after a new commit: the share of the snapshot before the new history blocks."""
    if not history.snapshot_changed or history.snapshot_seen or history.reusable_bytes is None or not snapshot.size:
        return None
    if snapshot.history_start is None or history.reusable_bytes < snapshot.history_start:
        return None  # the base moved, or the per-commit layout: the snapshot differs from a file on
    return history.reusable_bytes / snapshot.size


def _cause(
    verdict: Verdict, cached: int, expected: int | None, history: SendHistory, snapshot: Snapshot
) -> tuple[str, str]:
    if verdict == "hit":
        return "", "the upstream reused the whole snapshot"
    where = ""
    if verdict == "partial" and expected:
        share = min(cached / expected, 1.0)
        path = path_at(snapshot, int(share * snapshot.size))
        where = f"; the cache ended about {share * 100:.0f}% into the snapshot" + (f", near {path}" if path else "")
    if history.first_request:
        return "first request", "first request to this upstream since the proxy started: its cache was cold" + where
    if history.snapshot_changed and not history.snapshot_seen:
        reuse = ""
        if history.reusable_bytes is not None and snapshot.size:
            reuse = f"; {history.reusable_bytes / snapshot.size * 100:.0f}% of it is an identical prefix"
            if history.changed_at:
                reuse += f" (it changes at {history.changed_at})"
        change = f"{short_commit(history.previous_commit)} -> {short_commit(snapshot.commit)}"
        return "new commit", f"the snapshot is new: {change}{reuse}{where}"
    if history.tools_changed:
        return "tools", (
            "the request's tools differ from the previous one's: Llama 4's chat template puts tool text "
            "before the first system message, so the snapshot no longer starts the prompt" + where
        )
    if not history.snapshot_seen:
        return "new snapshot", "first request with this snapshot" + where
    return "evicted", (
        "this snapshot was sent before but the upstream no longer holds it: evicted by other prompts, "
        "answered by another replica or slot, or the upstream restarted" + where
    )


def tools_key(fields: dict[str, Any]) -> str | None:
    """A fingerprint of what the chat template puts before the first system message."""
    tools = fields.get("tools")
    if not tools:
        return None
    return hashlib.sha256(json.dumps(tools, sort_keys=True).encode()).hexdigest()[:16]


SnapshotIdentity = tuple[str | None, int]
REMEMBERED_SNAPSHOTS = 256


@dataclass
class _UpstreamState:
    last: Snapshot | None = None
    # Snapshots sent, oldest first, with the tools fingerprint of the last request that carried each.
    sent: OrderedDict[SnapshotIdentity, str | None] = field(default_factory=OrderedDict)
    reports_cache: bool = False
    last_change: tuple[SnapshotIdentity, SnapshotIdentity, int, str | None] | None = None


def _identity(snapshot: Snapshot) -> SnapshotIdentity:
    return (snapshot.commit, snapshot.size)


class CacheTracker:
    """Per upstream: the snapshots sent to it, the last one, its tools, whether it reports cache hits."""

    def __init__(self) -> None:
        self._upstreams: dict[str, _UpstreamState] = {}
        self.recent: deque[Verdict] = deque(maxlen=RECENT_WINDOW)

    def before_send(self, upstream: str, snapshot: Snapshot, tools: str | None) -> SendHistory:
        state = self._upstreams.setdefault(upstream, _UpstreamState())
        identity = _identity(snapshot)
        last = state.last
        changed = last is not None and _identity(last) != identity
        reusable: int | None = None
        changed_at: str | None = None
        if last is not None and changed:
            if state.last_change is None or state.last_change[:2] != (_identity(last), identity):
                shared = common_prefix_length(last.message_json, snapshot.message_json)
                state.last_change = (_identity(last), identity, shared, path_at(snapshot, shared))
            reusable, changed_at = state.last_change[2:]
        seen = identity in state.sent
        history = SendHistory(
            first_request=last is None,
            snapshot_seen=seen,
            previous_commit=last.commit if changed and last is not None else None,
            snapshot_changed=changed,
            reusable_bytes=reusable,
            changed_at=changed_at,
            tools_changed=seen and state.sent[identity] != tools,
            reports_cache=state.reports_cache,
            appended=last is not None and reusable is not None and appends_to(snapshot, last, reusable),
        )
        state.last = snapshot
        state.sent[identity] = tools
        state.sent.move_to_end(identity)
        while len(state.sent) > REMEMBERED_SNAPSHOTS:
            state.sent.popitem(last=False)
        return history

    def after_answer(self, upstream: str, usage: UpstreamUsage | None, verdict: CacheVerdict) -> None:
        if usage is not None and usage.reports_cache and upstream in self._upstreams:
            self._upstreams[upstream].reports_cache = True
        self.recent.append(verdict.verdict)

    def recent_summary(self) -> dict[str, Any]:
        """The last requests' verdicts, for /health: counts and the hit ratio of those with a verdict."""
        counts: dict[str, int] = {verdict: self.recent.count(verdict) for verdict in VERDICTS}
        known = counts["hit"] + counts["partial"] + counts["miss"]
        return {
            "requests": len(self.recent),
            **counts,
            "hit_ratio": round(counts["hit"] / known, 4) if known else None,
        }
