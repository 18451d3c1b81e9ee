"""Cache verdicts: read usage from each rewritten chat answer and say whether the snapshot was cached.

The verdict, and why not, shows in the response headers, one log line per chat request, the flow's
mitmweb comment and metadata, and ``/metrics``. Streamed answers are read as they pass through a
``StreamUsageTap``; the exact token count of a snapshot is asked of the upstream in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, http

from ..chat.usage import RECORDED_STREAM_LIMIT, StreamUsageTap, UpstreamUsage, usage_from_body
from ..observe.tokencount import CountRequest
from ..observe.verdict import CacheVerdict, SnapshotTokens, classify, estimate_snapshot_tokens
from ..text import human_bytes, short_commit
from .deadline import TIMED_OUT_KEY
from .state import METADATA_KEY, PREFIX_KEY_HEADER, ChatRecord, ScoutState

logger = logging.getLogger(__name__)

PARSE_ON_LOOP_BYTES = 1 << 20


class CacheVerdicts:
    def __init__(self, state: ScoutState) -> None:
        self.state = state

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = self.state.chats.get(flow.id)
        if record is None or record.proxy_error is not None or flow.response is None:
            return
        add_context_headers(flow.response.headers, record)
        if "text/event-stream" in flow.response.headers.get("content-type", ""):
            identity = flow.response.headers.get("content-encoding", "identity").lower() == "identity"
            if identity:
                record.tap = StreamUsageTap(remove_usage=record.usage_added)
                flow.response.stream = record.tap

    async def response(self, flow: http.HTTPFlow) -> None:
        record = self.state.chats.pop(flow.id, None)
        if record is None:
            return
        if record.proxy_error is not None:
            self.finish(flow, record, "proxy_error", None)
        else:
            await self.answered(flow, record)

    def error(self, flow: http.HTTPFlow) -> None:
        record = self.state.chats.pop(flow.id, None)
        if record is None:
            return
        message = flow.error.msg if flow.error is not None else ""
        gone = "client disconnected" in message.lower() or flow.client_conn.timestamp_end is not None
        if gone and record.tap is not None and record.tap.usage is not None:
            # The usage event had passed: a client that stops reading at [DONE] may close before
            # the stream's last bytes, and the answer it got was whole.
            self.judge(flow, record, record.tap.usage)
            return
        self.finish(flow, record, "client_gone" if gone else "upstream_error", None, failure=message)

    async def answered(self, flow: http.HTTPFlow, record: ChatRecord) -> None:
        response = flow.response
        assert response is not None
        if response.status_code >= 400:
            timed_out = TIMED_OUT_KEY in flow.metadata  # our own 504
            self.state.metrics.error(response.status_code, "proxy" if timed_out else "upstream")
            self.finish(flow, record, "proxy_error" if timed_out else "upstream_error", None)
            return
        if record.tap is not None:
            usage = record.tap.usage
            if not ctx.options.store_streamed_bodies:
                # What the client got, for mitmweb; raw_content keeps the headers as they were sent.
                response.raw_content = bytes(record.tap.recorded)
        elif len(response.raw_content or b"") <= PARSE_ON_LOOP_BYTES:
            usage = usage_from_body(response.get_content(strict=False) or b"")
        else:  # a large answer is decoded and parsed in a thread: other connections keep being served
            usage = await asyncio.to_thread(lambda: usage_from_body(response.get_content(strict=False) or b""))
        self.judge(flow, record, usage)

    def judge(self, flow: http.HTTPFlow, record: ChatRecord, usage: UpstreamUsage | None) -> None:
        """The verdict of an answer, from its usage: header (unless streamed), log, metrics."""
        verdict = classify(usage, self.snapshot_tokens(record, usage), record.history, record.snapshot)
        self.state.tracker.after_answer(record.base_url, usage, verdict)
        if record.tap is None and flow.response is not None:
            flow.response.headers["x-scout-cache"] = verdict_header(verdict, usage)
        self.finish(flow, record, verdict.verdict, verdict, usage=usage)
        self.count_tokens(record, usage)

    def snapshot_tokens(self, record: ChatRecord, usage: UpstreamUsage | None) -> SnapshotTokens | None:
        exact = self.state.token_counter.exact(record.base_url, record.snapshot)
        if exact is not None:
            return SnapshotTokens(exact, exact=True)
        if usage is not None and usage.prompt_tokens is not None:
            return estimate_snapshot_tokens(usage.prompt_tokens, record.snapshot.size, record.messages_bytes)
        return None

    def count_tokens(self, record: ChatRecord, usage: UpstreamUsage | None) -> None:
        """Once the upstream is known to report cached tokens, ask it for the snapshot's exact count."""
        settings = self.state.settings
        reports_cache = usage is not None and (usage.reports_cache or record.history.reports_cache)
        if settings is not None and settings.count_snapshot_tokens and reports_cache:
            verify = not ctx.options.ssl_insecure
            self.state.token_counter.request(
                CountRequest(record.base_url, record.model, record.authorization, verify), record.snapshot
            )

    def finish(
        self,
        flow: http.HTTPFlow,
        record: ChatRecord,
        outcome: str,
        verdict: CacheVerdict | None,
        *,
        failure: str = "",
        usage: UpstreamUsage | None = None,
    ) -> None:
        """Count the outcome, and show it in the flow's metadata, mitmweb's comment and one log line."""
        self.state.metrics.answered(outcome, usage)
        metadata = flow.metadata.get(METADATA_KEY)
        if isinstance(metadata, dict):
            metadata["outcome"] = outcome
            if verdict is not None:
                metadata["cache"] = verdict.as_dict()
        if verdict is not None:
            result = verdict.summary()
        elif failure:
            result = f"{outcome.replace('_', ' ')}: {failure}"
        else:
            result = outcome.replace("_", " ")
        status = flow.response.status_code if flow.response is not None else "-"
        headline = verdict.headline() if verdict is not None else f"{status} {result}"
        if record.tap is not None and record.tap.recording_truncated:
            truncated = f" · stream copy for mitmweb cut at {human_bytes(RECORDED_STREAM_LIMIT)}"
            result, headline = result + truncated, headline + truncated
        if verdict is not None or status != "-":  # first: mitmweb's flow list shows the comment's start
            flow.comment = f"{headline} · {flow.comment}" if flow.comment else headline
        fit = record.snapshot.fit
        logger.info(
            "chat %s in %.2f s · snap %s · %s%s · diff %s%s%s%s%s · %s%s",
            status,
            time.perf_counter() - record.started,
            short_commit(record.snapshot.commit),
            human_bytes(record.snapshot.size),
            f" (cut to fit the window: {record.snapshot.outline_count} outlined, {len(fit.omitted)} omitted)"
            if fit is not None and fit.cut
            else "",
            human_bytes(record.diff_bytes),
            " (cut to fit the window)" if record.diff_cut else "",
            f" · {record.conversation}" if record.conversation else "",
            f" · {record.retrieval}" if record.retrieval else "",
            token_figures(verdict, usage),
            result if verdict is not None else f"no verdict ({result})",
            f" - {verdict.detail}" if verdict is not None and verdict.cause else "",
        )


def token_figures(verdict: CacheVerdict | None, usage: UpstreamUsage | None) -> str:
    """' · prompt N tok · snapshot M tok (exact) · prefill K tok in T ms · cache read R · written W tok'.

    Each part where the upstream reported it.
    """
    parts = []
    if verdict is not None and verdict.prompt_tokens is not None:
        parts.append(f"prompt {verdict.prompt_tokens} tok")
    if verdict is not None and verdict.snapshot_tokens is not None:
        kind = "exact" if verdict.snapshot_tokens.exact else "estimated"
        parts.append(f"snapshot {verdict.snapshot_tokens.count} tok ({kind})")
    if usage is not None and usage.evaluated_tokens is not None and usage.prompt_ms is not None:
        parts.append(f"prefill {usage.evaluated_tokens} tok in {usage.prompt_ms:.0f} ms")
    if usage is not None and usage.written_tokens is not None:
        read = f"read {usage.cached_tokens} · " if usage.cached_tokens is not None else ""
        parts.append(f"cache {read}written {usage.written_tokens} tok")
    return "".join(f" · {part}" for part in parts)


def add_context_headers(headers: http.Headers, record: ChatRecord) -> None:
    headers["x-scout-snapshot-commit"] = record.snapshot.commit or "unborn"
    headers["x-scout-base-commit"] = record.snapshot.base_commit or "unborn"
    headers[PREFIX_KEY_HEADER] = record.snapshot.prefix_key
    headers["x-scout-snapshot-bytes"] = str(record.snapshot.size)
    headers["x-scout-diff-bytes"] = str(record.diff_bytes)
    expected = record.history.expectation()
    if record.conversation.startswith("conversation continued") and expected == "hit":
        expected = f"hit; {record.conversation}: the previous prompt is cached"
    headers["x-scout-cache-expected"] = expected
    if record.window_header:
        headers["x-scout-window"] = record.window_header
    if record.retrieval:
        headers["x-scout-retrieval"] = record.retrieval
    if record.retrieved:
        headers["x-scout-retrieved"] = record.retrieved


def verdict_header(verdict: CacheVerdict, usage: UpstreamUsage | None = None) -> str:
    """'hit; cached_tokens=..; prompt_tokens=..; snapshot_tokens=..; snapshot_tokens_exact=..; cause=".."'."""
    parts: list[str] = [verdict.verdict]
    for name, value in (
        ("cached_tokens", verdict.cached_tokens),
        ("prompt_tokens", verdict.prompt_tokens),
        ("snapshot_tokens", verdict.snapshot_tokens.count if verdict.snapshot_tokens else None),
        ("cache_written_tokens", usage.written_tokens if usage is not None else None),
    ):
        if value is not None:
            parts.append(f"{name}={value}")
    if verdict.snapshot_tokens is not None:
        parts.append(f"snapshot_tokens_exact={str(verdict.snapshot_tokens.exact).lower()}")
    if verdict.cause:
        parts.append(f'cause="{verdict.cause}"')
    return "; ".join(parts)
