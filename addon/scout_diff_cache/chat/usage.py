"""What the upstream says it did with the prompt: prompt tokens, cached tokens, prefill time.

Formats read, streamed or not:
- OpenAI style (vLLM with ``--enable-prompt-tokens-details``, SGLang with ``--enable-cache-report``,
  llama.cpp): ``usage.prompt_tokens`` and ``usage.prompt_tokens_details.cached_tokens``;
- llama.cpp's ``timings``: ``cache_n`` (reused), ``prompt_n`` (evaluated), ``prompt_ms``;
- vLLM's ``prompt_tokens_details.created_cache_tokens``: tokens this request wrote to the cache
  (cache writes, shown beside the cache reads as hosted APIs show them).

A stream carries usage only when the request sets ``stream_options.include_usage``. The proxy may
set it for the client; :class:`StreamUsageTap` then removes what only that option added before the
client sees it, and passes every other event on byte for byte, as soon as it is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .sse import SseSplitter, event_data

# The stream body kept for mitmweb (answers are small; a runaway stream is cut off in the copy only).
RECORDED_STREAM_LIMIT = 4 * 1024 * 1024
# An event larger than this is content, never the small usage chunk: it is passed on as it arrives
# instead of being held back until it ends, and it is not parsed.
HELD_EVENT_LIMIT = 64 * 1024


@dataclass(frozen=True)
class UpstreamUsage:
    """Token counts as the upstream reported them; None where it said nothing."""

    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    evaluated_tokens: int | None = None  # llama.cpp timings.prompt_n: tokens actually prefilled
    prompt_ms: float | None = None  # llama.cpp timings.prompt_ms: how long that prefill took
    written_tokens: int | None = None  # vLLM created_cache_tokens: tokens this request wrote to the cache

    @property
    def reports_cache(self) -> bool:
        return self.cached_tokens is not None


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _number(value: object) -> float | None:
    return float(value) if type(value) in (int, float) else None  # type: ignore[arg-type]


def usage_from_chunk(data: object) -> UpstreamUsage | None:
    """Usage from one completion object (a whole response or one stream chunk), if it has any."""
    if not isinstance(data, Mapping):
        return None
    usage = data.get("usage")
    timings = data.get("timings")
    usage = usage if isinstance(usage, Mapping) else {}
    timings = timings if isinstance(timings, Mapping) else {}
    if not usage and not timings:
        return None
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, Mapping) else {}
    cached, written = _count(details.get("cached_tokens")), _count(details.get("created_cache_tokens"))
    cache_n, prompt_n = _count(timings.get("cache_n")), _count(timings.get("prompt_n"))
    if cached is None:
        cached = cache_n
    prompt_tokens = _count(usage.get("prompt_tokens"))
    if prompt_tokens is None and cache_n is not None and prompt_n is not None:
        prompt_tokens = cache_n + prompt_n
    if prompt_tokens is None and cached is None and prompt_n is None and written is None:
        return None
    return UpstreamUsage(prompt_tokens, cached, prompt_n, _number(timings.get("prompt_ms")), written)


def usage_from_body(body: bytes) -> UpstreamUsage | None:
    """Usage from a non-streamed chat completion body; None if it is not JSON or carries none."""
    try:
        return usage_from_chunk(json.loads(body))
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's stack
        return None


def _merge(earlier: UpstreamUsage | None, later: UpstreamUsage) -> UpstreamUsage:
    """Later chunks win field by field (llama.cpp may put timings and usage in different chunks)."""
    if earlier is None:
        return later
    return UpstreamUsage(
        later.prompt_tokens if later.prompt_tokens is not None else earlier.prompt_tokens,
        later.cached_tokens if later.cached_tokens is not None else earlier.cached_tokens,
        later.evaluated_tokens if later.evaluated_tokens is not None else earlier.evaluated_tokens,
        later.prompt_ms if later.prompt_ms is not None else earlier.prompt_ms,
        later.written_tokens if later.written_tokens is not None else earlier.written_tokens,
    )


def ask_for_stream_usage(fields: dict[str, Any]) -> bool:
    """Set ``stream_options.include_usage`` on a streamed request that lacks it; True if it was added.

    A ``stream_options`` that is not an object is left for the upstream to reject as sent.
    """
    if fields.get("stream") is not True:
        return False
    options = fields.get("stream_options")
    if options is None:
        fields["stream_options"] = {"include_usage": True}
        return True
    if isinstance(options, dict) and options.get("include_usage") is not True:
        fields["stream_options"] = {**options, "include_usage": True}
        return True
    return False


class StreamUsageTap:
    """A mitmproxy ``response.stream`` callable: reads usage from SSE chunks as they pass.

    With ``remove_usage`` (the proxy asked for usage, the client did not), the chunk that only
    carries usage (``"choices": []``) is dropped, and a non-null ``usage`` on any other chunk is
    removed (that one chunk is re-encoded as a single ``data:`` line). Everything else goes out
    byte for byte. Without it, chunks are passed on exactly as they arrive.

    At most HELD_EVENT_LIMIT bytes of an unfinished event are held (to filter or to read it): a
    longer event goes out as it arrives and is neither filtered nor read.
    """

    def __init__(self, remove_usage: bool) -> None:
        self.remove_usage = remove_usage
        self.usage: UpstreamUsage | None = None
        self.recorded = bytearray()
        self.recording_truncated = False  # the copy for mitmweb stopped at RECORDED_STREAM_LIMIT
        self._splitter = SseSplitter()
        self._passing_event = False  # the event under way is over HELD_EVENT_LIMIT: passed on as it comes

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        """Bytes to send on for ``chunk``; ``b""`` from mitmproxy means the stream has ended.

        Never an empty bytes object mid-stream: mitmproxy would send it as an empty HTTP/1 chunk,
        which is the chunked encoding's end marker, and the client's connection would be corrupted.
        """
        if not chunk:
            rest = self._splitter.flush()
            if self._passing_event or not rest.strip():
                out = rest
            elif self.remove_usage:
                out = self._filter(rest)
            else:
                self._read(rest)
                out = rest
            if not self.remove_usage:
                return b""  # its bytes went out with their chunk already
            self._record(out)
            return out
        parts = []
        for event in self._splitter.feed(chunk):
            if self._passing_event:  # the end of an event already passed on
                self._passing_event = False
                parts.append(event)
            elif self.remove_usage:
                parts.append(self._filter(event))
            else:
                self._read(event)
        if self._splitter.pending_bytes > HELD_EVENT_LIMIT:
            parts.append(self._splitter.release())
            self._passing_event = True
        out = b"".join(parts) if self.remove_usage else chunk
        self._record(out)
        return [out] if out else []

    def _read(self, event: bytes) -> dict[str, Any] | None:
        data = event_data(event)
        if data is None or data.strip() == "[DONE]":
            return None
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(parsed, dict):
            return None
        usage = usage_from_chunk(parsed)
        if usage is not None:
            self.usage = _merge(self.usage, usage)
        return parsed

    def _filter(self, event: bytes) -> bytes:
        parsed = self._read(event)
        if parsed is None or parsed.get("usage") is None:
            return event
        if parsed.get("choices") == []:
            return b""
        del parsed["usage"]
        ending = b"\r\n\r\n" if event.endswith(b"\r\n\r\n") else b"\n\n"
        return b"data: " + json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode() + ending

    def _record(self, data: bytes) -> None:
        room = RECORDED_STREAM_LIMIT - len(self.recorded)
        if len(data) > room:
            self.recording_truncated = True
        self.recorded += data[: max(room, 0)]
