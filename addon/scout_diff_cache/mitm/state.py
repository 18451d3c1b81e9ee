"""What the addons share: one object, created once per addon list, passed to each addon.

Per-flow chat records live here, keyed by flow id, not in ``flow.metadata``: mitmproxy deep-copies
metadata on every save and backup, and a record holds the snapshot it was sent with.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..chat.conversation import ConversationStore
from ..chat.errors import ApiError
from ..chat.usage import StreamUsageTap
from ..context.provider import ContextProvider
from ..context.retrieval import Retriever
from ..context.snapshot import Snapshot
from ..observe.metrics import ProxyMetrics
from ..observe.tokencount import TokenCounter
from ..observe.tokenizer import UpstreamTokenizer
from ..observe.verdict import CacheTracker, SendHistory
from ..observe.window import UNKNOWN, ContextWindow
from ..settings import Settings
from ..view.snapshot import SnapshotIndex

# flow.metadata[METADATA_KEY]: commit, sizes, the context messages' byte spans in the body, the verdict.
METADATA_KEY = "scout_diff_cache"
# On each rewritten request and its answer: 16 hex digits naming message 1's base bytes (Snapshot.prefix_key).
PREFIX_KEY_HEADER = "x-scout-prefix-key"


@dataclass
class ChatRecord:
    """A rewritten chat request on its way: what was sent, for the verdict on its answer."""

    snapshot: Snapshot
    diff_bytes: int
    history: SendHistory
    base_url: str
    model: str | None
    usage_added: bool
    messages_bytes: int
    started: float
    authorization: str | None = None
    tap: StreamUsageTap | None = None
    proxy_error: ApiError | None = None  # the proxy answered it itself, after the rewrite
    diff_cut: bool = False  # the working diff was cut so the request fits the window
    window_header: str = ""  # x-scout-window: how the request was fitted to the model's window
    conversation: str = ""  # how the conversation layout placed it ("continued: N changes", "fresh", ...)
    retrieval: str = ""  # x-scout-retrieval: what retrieval did ("" when message 1 left nothing out)
    retrieved: str = ""  # x-scout-retrieved: the files retrieved in full, and why


@dataclass
class ScoutState:
    settings: Settings | None = None
    provider: ContextProvider | None = None
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)
    tracker: CacheTracker = field(default_factory=CacheTracker)
    token_counter: TokenCounter = field(default_factory=TokenCounter)
    snapshot_index: SnapshotIndex = field(default_factory=SnapshotIndex)
    chats: dict[str, ChatRecord] = field(default_factory=dict)
    last_model: str | None = None  # the model clients last asked for, for prewarm requests
    spliced_bytes: int = 0  # request bytes built since the last full garbage collection
    window: ContextWindow = UNKNOWN  # the upstream's context window, as it reports it
    tokenizer: UpstreamTokenizer | None = None  # the upstream's tokenize API, when it has one
    learning: asyncio.Task[None] | None = None  # the window and tokenizer being asked for
    conversations: ConversationStore = field(default_factory=lambda: ConversationStore(0))
    retriever: Retriever | None = None  # the search index of the files message 1 left out

    def configured(self) -> tuple[Settings, ContextProvider]:
        """Settings and provider; a 503 until configure succeeded (only between a bad setting and exit)."""
        if self.settings is None or self.provider is None:
            raise ApiError(
                503, "scout-diff-cache is not configured (see the proxy's log)", "server_error", "not_configured"
            )
        return self.settings, self.provider
