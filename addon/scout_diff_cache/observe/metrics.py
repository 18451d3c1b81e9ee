"""Prometheus metrics for GET /metrics, in a registry of their own (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..chat.usage import UpstreamUsage
from ..context.provider import SnapshotLookup
from ..context.snapshot import Snapshot
from .verdict import VERDICTS

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Chat requests end as one of these: a cache verdict, or no verdict because of what happened.
OUTCOMES = (*VERDICTS, "upstream_error", "proxy_error", "client_gone", "passthrough")
BUILD_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
DIFF_BYTES_BUCKETS = (0, 1e3, 1e4, 1e5, 1e6, 1e7)


RETRIEVAL_OUTCOMES = ("retrieved", "nothing_found", "no_room", "index_building", "failed")


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.chat_requests = Counter(
            "scout_chat_requests",
            "Chat requests by outcome: the cache verdict, or why there is none.",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.chat_requests.labels(outcome)
        self.errors = Counter(
            "scout_errors",
            "Error responses sent to clients, by status and by who answered.",
            ["status", "source"],
            registry=r,
        )
        self.snapshot_builds = Counter("scout_snapshot_builds", "Snapshots built.", registry=r)
        self.snapshot_build_seconds = Histogram(
            "scout_snapshot_build_seconds", "Time to build a snapshot.", buckets=BUILD_SECONDS_BUCKETS, registry=r
        )
        self.snapshot_bytes = Gauge(
            "scout_snapshot_bytes", "Size of the snapshot built last (its JSON message).", registry=r
        )
        self.snapshot_files = Gauge("scout_snapshot_files", "Files in the snapshot built last.", registry=r)
        self.snapshot_lookups = Counter(
            "scout_snapshot_cache_lookups",
            "Snapshot lookups in the proxy: hit (built before), wait (joined a build under way), miss (built).",
            ["result"],
            registry=r,
        )
        for result in ("hit", "wait", "miss"):
            self.snapshot_lookups.labels(result)
        self.prompt_tokens = Counter("scout_upstream_prompt_tokens", "Prompt tokens the upstream reported.", registry=r)
        self.cached_tokens = Counter(
            "scout_upstream_cached_tokens", "Prompt tokens the upstream reported as served from its cache.", registry=r
        )
        self.written_tokens = Counter(
            "scout_upstream_cache_written_tokens",
            "Prompt tokens the upstream reported as written to its cache (vLLM created_cache_tokens).",
            registry=r,
        )
        self.diff_bytes = Histogram(
            "scout_diff_bytes", "Working diff size per chat request.", buckets=DIFF_BYTES_BUCKETS, registry=r
        )
        self.injected_bytes = Counter("scout_injected_bytes", "Bytes of chat request bodies sent upstream.", registry=r)
        self.prewarms = Counter(
            "scout_prewarm_requests", "Prewarm requests sent for a new base, by result.", ["result"], registry=r
        )
        for result in ("ok", "failed"):
            self.prewarms.labels(result)
        self.conversation_turns = Counter(
            "scout_conversation_turns",
            "Chat requests by conversation layout: continued (its earlier prompt re-sent, only changes added), "
            "fresh (a conversation the proxy does not know), fell_back (known, but it no longer fits the window).",
            ["layout"],
            registry=r,
        )
        for layout in ("continued", "fresh", "fell_back"):
            self.conversation_turns.labels(layout)
        self.retrievals = Counter(
            "scout_retrievals",
            "Chat requests whose message 1 left files out, by retrieval outcome: retrieved (files added in full), "
            "nothing_found, no_room (the window had none left), index_building, failed.",
            ["outcome"],
            registry=r,
        )
        for outcome in RETRIEVAL_OUTCOMES:
            self.retrievals.labels(outcome)
        self.retrieved_files = Counter("scout_retrieved_files", "Files retrieved in full for questions.", registry=r)
        self.retrieved_tokens = Counter(
            "scout_retrieved_tokens", "Tokens of the retrieved files' messages, as counted to fit them.", registry=r
        )
        self.redacted_secrets = Gauge(
            "scout_redacted_secrets",
            "Secrets replaced by [redacted KIND] in the last chat request, by part: message_1 (files and history) "
            "or diff (the working diff).",
            ["part"],
            registry=r,
        )
        for part in ("message_1", "diff"):
            self.redacted_secrets.labels(part)
        self.prewarm_seconds = Histogram(
            "scout_prewarm_seconds",
            "Time the upstream took to prefill a new base.",
            buckets=BUILD_SECONDS_BUCKETS,
            registry=r,
        )

    def snapshot_built(self, snapshot: Snapshot, seconds: float) -> None:
        self.snapshot_builds.inc()
        self.snapshot_build_seconds.observe(seconds)
        self.snapshot_bytes.set(snapshot.size)
        self.snapshot_files.set(snapshot.file_count)

    def snapshot_lookup(self, result: SnapshotLookup) -> None:
        self.snapshot_lookups.labels(result).inc()

    def injected(self, body_bytes: int, diff_bytes: int) -> None:
        self.injected_bytes.inc(body_bytes)
        self.diff_bytes.observe(diff_bytes)

    def answered(self, outcome: str, usage: UpstreamUsage | None) -> None:
        self.chat_requests.labels(outcome).inc()
        if usage is not None and usage.prompt_tokens is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
        if usage is not None and usage.cached_tokens is not None:
            self.cached_tokens.inc(usage.cached_tokens)
        if usage is not None and usage.written_tokens is not None:
            self.written_tokens.inc(usage.written_tokens)

    def conversation_turn(self, layout: str) -> None:
        self.conversation_turns.labels(layout.replace(" ", "_")).inc()

    def retrieval(self, outcome: str, files: int = 0, tokens: int = 0) -> None:
        self.retrievals.labels(outcome).inc()
        self.retrieved_files.inc(files)
        self.retrieved_tokens.inc(tokens)

    def redacted(self, message_1: int, diff: int) -> None:
        self.redacted_secrets.labels("message_1").set(message_1)
        self.redacted_secrets.labels("diff").set(diff)

    def error(self, status: int, source: str) -> None:
        self.errors.labels(str(status), source).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
