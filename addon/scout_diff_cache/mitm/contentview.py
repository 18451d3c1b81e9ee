"""mitmweb's "Scout chat" view: a rewritten 40 MB prompt, readable in milliseconds.

mitmproxy's JSON view turns a rewritten request into 40 MB of text, the snapshot one 40 MB line,
which mitmweb takes seconds to show. This view shows the request as the upstream got it (the
client's fields, the snapshot summarised, the working diff and the conversation in full) and the
answer reassembled from its stream; the text itself is made in ``view``.
"""

from __future__ import annotations

from collections.abc import Mapping

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Contentview, Metadata

from ..chat.request import is_json_media_type
from ..chat.routes import is_chat_route
from ..view.request import render_request
from ..view.response import SSE_MEDIA_TYPE, render_response
from ..view.snapshot import SnapshotIndex
from .internals import remove_contentview
from .state import METADATA_KEY, ScoutState

VIEW_NAME = "Scout chat"
CHAT_PRIORITY = 2.0  # above the JSON view's 1


class ChatContentview(Contentview):
    """Chosen by default for the requests and responses of chat completion flows, nothing else."""

    def __init__(self, snapshot_index: SnapshotIndex) -> None:
        self.snapshot_index = snapshot_index

    @property
    def name(self) -> str:
        return VIEW_NAME

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        flow = metadata.flow
        if not data or not isinstance(flow, http.HTTPFlow) or not is_chat_route(flow.request.path):
            return 0
        media_type = metadata.content_type
        if metadata.http_message is flow.request and (media_type is None or is_json_media_type(media_type)):
            return CHAT_PRIORITY
        if metadata.http_message is flow.response and (
            media_type is None or media_type == SSE_MEDIA_TYPE or is_json_media_type(media_type)
        ):
            return CHAT_PRIORITY
        return 0

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        flow = metadata.flow if isinstance(metadata.flow, http.HTTPFlow) else None
        comment = flow.comment if flow is not None else ""
        if flow is not None and flow.response is not None and metadata.http_message is flow.response:
            return render_response(data, metadata.content_type, comment)
        proxy_metadata = flow.metadata.get(METADATA_KEY) if flow is not None else None
        if not isinstance(proxy_metadata, Mapping):
            return render_request(data, None, comment)
        return render_request(data, proxy_metadata, comment, self.snapshot_index.lookup(proxy_metadata))


class ChatView:
    """Registers the view while the addon is loaded."""

    def __init__(self, state: ScoutState) -> None:
        self.state = state
        self.view = ChatContentview(state.snapshot_index)

    def load(self, loader: object) -> None:
        contentviews.add(self.view)

    def done(self) -> None:
        remove_contentview(self.view)
