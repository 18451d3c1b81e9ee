"""Keep only the last N chat flows' full request bodies in memory (mitmweb stores every flow).

mitmweb's flow store (the View addon) holds every flow it has seen, multi-megabyte request bodies
included, and nothing ever evicts them. Once a chat flow is done and ``keep`` newer chat flows
have finished after it, its snapshot message is replaced in the stored body by a short
placeholder, and mitmproxy is told (the ``update`` hook) so the web UI shows the smaller body.

Under mitmdump no flow store exists and flows die when their connection ends: nothing is tracked
there. Flows are tracked through weak references only, so a flow the user deletes or clears in
mitmweb is freed as before.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from itertools import islice
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.addons.view import View
from mitmproxy.hooks import UpdateHook

from ..context.framing import TRIMMED_SNAPSHOT_PREFIX, holds_message, system_message_json
from ..settings import Settings
from ..text import human_bytes
from .state import METADATA_KEY, ScoutState

logger = logging.getLogger(__name__)


class BodyRetention:
    """Trims the snapshot out of stored chat flows that fall out of the last-``keep`` window."""

    def __init__(self, state: ScoutState) -> None:
        self.state = state
        self.keep = Settings.model_fields["keep_full_bodies"].default
        # Done chat flows by id, oldest first; weak values: a flow freed elsewhere drops out.
        self._done: weakref.WeakValueDictionary[str, http.HTTPFlow] = weakref.WeakValueDictionary()

    def configure(self, updated: set[str]) -> None:
        if self.state.settings is not None:
            self.keep = self.state.settings.keep_full_bodies

    def response(self, flow: http.HTTPFlow) -> None:
        self.flow_done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.flow_done(flow)

    def flow_done(self, flow: http.HTTPFlow) -> None:
        """A flow has ended (answered, failed or cut off): if the proxy rewrote it, it may trim older ones."""
        if METADATA_KEY not in flow.metadata:
            return
        store = _flow_store()
        if store is None or store.get_by_id(flow.id) is not flow:
            return  # mitmdump: no flow store, the flow is freed when its connection ends
        self._done.pop(flow.id, None)  # a replayed flow moves to the newest place
        self._done[flow.id] = flow
        excess = len(self._done) - self.keep
        if excess <= 0:
            return
        trimmed = []
        for flow_id, old in list(islice(self._done.items(), excess)):
            if old is not flow and (old.live or (old.response is None and old.error is None)):
                continue  # still sending its response or queued for a replay: tried again next time
            del self._done[flow_id]
            if store.get_by_id(flow_id) is old and _trim(old, self.keep):
                trimmed.append(old)
        if trimmed:
            ctx.master.addons.trigger(UpdateHook(trimmed))  # the web UI shows the new bodies


def _flow_store() -> View | None:
    """mitmweb's (and the console's) flow store; None under mitmdump, which keeps no flows."""
    master = getattr(ctx, "master", None)
    store = master.addons.get("view") if master is not None else None
    return store if isinstance(store, View) else None


def placeholder_text(record: dict[str, Any], keep: int) -> str:
    """What replaces the snapshot message's content in a trimmed flow."""
    commit = record.get("commit") or "none (unborn HEAD)"
    size = int(record["snapshot_bytes"])
    kept = (
        f"only the last {keep} chat flows keep their full request bodies"
        if keep
        else "no chat flow keeps its full request body"
    )
    return (
        f"{TRIMMED_SNAPSHOT_PREFIX} of commit {commit}, {human_bytes(size)} ({size} bytes), "
        f"{record['snapshot_files']} files, removed from this stored flow to save memory (the request "
        f"was built with it in full); {kept} (setting KEEP_FULL_BODIES). A replay sends the current snapshot.]"
    )


def _trim(flow: http.HTTPFlow, keep: int) -> bool:
    """Replace the snapshot message in the stored body by a placeholder; False if left alone."""
    record = flow.metadata.get(METADATA_KEY)
    if not isinstance(record, dict) or record.get("snapshot_trimmed"):
        return False
    # raw_content, not content: the addon sent the body without content-encoding, so both are the
    # same bytes, and assigning raw_content leaves the headers alone. Content-Length keeps saying
    # what was actually sent upstream; the stored body is a record, never sent as is (a replay
    # goes through the addon, which rebuilds the body and its Content-Length).
    body = flow.request.raw_content
    start, end = record["snapshot_span"]
    if (
        body is None
        or len(body) != record["body_bytes"]
        or "content-encoding" in flow.request.headers
        or not holds_message(body, start, end)
    ):
        logger.info("flow %s: request body changed since it was sent (edited?); its snapshot is kept", flow.id)
        return False
    placeholder = system_message_json(placeholder_text(record, keep))
    trimmed = body[:start] + placeholder + body[end:]
    shift = len(placeholder) - (end - start)

    def moved(span: Sequence[int]) -> tuple[int, int]:
        return (span[0] + shift, span[1] + shift) if span[0] >= end else (span[0], span[1])

    updated = {
        **record,
        "snapshot_span": (start, start + len(placeholder)),
        "diff_span": moved(record["diff_span"]),
        "injected_spans": [moved(span) for span in record.get("injected_spans", ())],
        "snapshot_trimmed": True,
        "trimmed_body_bytes": len(trimmed),
    }
    _trim_backup(flow, body, trimmed, updated)
    flow.request.raw_content = trimmed
    flow.metadata[METADATA_KEY] = updated
    logger.debug(
        "flow %s: snapshot trimmed from the stored request body (%s -> %s)",
        flow.id,
        human_bytes(len(body)),
        human_bytes(len(trimmed)),
    )
    return True


def _trim_backup(flow: http.HTTPFlow, body: bytes, trimmed: bytes, record: dict[str, Any]) -> None:
    """Trim mitmproxy's revert copy too when it holds this very body (a marked or replayed flow).

    mitmweb backs a flow up before a mark, an edit or a replay; the backup shares the body's bytes,
    so without this the full body would stay in memory. A backup holding another body is left alone.
    """
    backup = getattr(flow, "_backup", None)  # private: the state dict Flow.revert() restores
    if not isinstance(backup, dict):
        return
    request = backup.get("request")
    if isinstance(request, dict) and request.get("content") is body:
        request["content"] = trimmed
        backup["metadata"][METADATA_KEY] = dict(record)
