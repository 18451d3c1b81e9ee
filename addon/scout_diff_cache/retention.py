"""Keep only the last N chat flows' full request bodies in memory (mitmweb stores every flow)."""

from __future__ import annotations

from mitmproxy import http


class BodyRetention:
    def __init__(self, keep: int) -> None:
        self.keep = keep

    def flow_done(self, flow: http.HTTPFlow) -> None:
        """A chat flow the addon rewrote has ended (answered, failed or cut off)."""
