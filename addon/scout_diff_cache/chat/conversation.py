"""Conversations: which earlier chat request a request continues, and what the proxy injected where.

Clients resend the whole conversation on every turn and add to its end. A request continues an
earlier one when its client messages start with all of the earlier request's client messages
and add more;
that is found by hashes of the message chain (each hash covers a message and every message
before it), without any cooperation from the client. For a continuing conversation the proxy
sends message 1 and every context message it injected before exactly as before, at the same
places, and adds what changed since (``context/changes.py``) just before the new client
messages: the whole prompt is append-only, like the append layout makes message 1 for commits.

The store is bounded (LRU, ``MAX_CONVERSATIONS``) and holds hashes, positions, the injected
messages' bytes and the state they describe, plus a reference to message 1, which conversations
started at the same commit share; at most ``PINNED_SNAPSHOTS`` distinct message 1s are kept alive
by it (the oldest conversations go first).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..context.snapshot import Snapshot
from ..context.workdiff import WorkState

PINNED_SNAPSHOTS = 4


def chain_hashes(messages: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """One hash per message, each covering it and every message before it (key order ignored)."""
    hashes = []
    digest = b""
    for message in messages:
        canonical = json.dumps(message, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()
        digest = hashlib.blake2b(digest + canonical, digest_size=16).digest()
        hashes.append(digest)
    return hashes


@dataclass(frozen=True)
class Injection:
    position: int  # how many client messages come before it
    message_json: bytes
    kind: str  # "diff" (a fresh layout's working diff), "changes" (what changed since), "retrieved" (files)


@dataclass(frozen=True)
class Conversation:
    """What one request was sent with: enough to continue it byte for byte."""

    client_count: int
    snapshot: Snapshot
    injections: tuple[Injection, ...]
    state: WorkState  # the repository as message 1 plus the injections describe it
    retrieved: Mapping[bytes, str] = field(default_factory=dict)  # files retrieved in full: path -> blob id

    @property
    def injected_bytes(self) -> int:
        return sum(len(injection.message_json) for injection in self.injections)

    @property
    def changes(self) -> int:
        return sum(injection.kind == "changes" for injection in self.injections)


class ConversationStore:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def find(self, hashes: Sequence[bytes]) -> Conversation | None:
        """The stored request this one continues: the longest whose client messages are all its first ones.

        It must have fewer: the same messages again (a retry, or a new conversation that opens the
        same way) get the fresh layout, which is the same prompt when nothing changed.
        """
        for count in range(len(hashes) - 1, 0, -1):
            found = self._items.get(hashes[count - 1])
            if found is not None and found.client_count == count:
                self._items.move_to_end(hashes[count - 1])
                return found
        return None

    def remember(self, hashes: Sequence[bytes], conversation: Conversation) -> None:
        if not hashes or self.capacity == 0:
            return
        self._items[hashes[-1]] = conversation
        self._items.move_to_end(hashes[-1])
        while len(self._items) > self.capacity or self._pinned() > PINNED_SNAPSHOTS:
            self._items.popitem(last=False)

    def _pinned(self) -> int:
        return len({id(item.snapshot) for item in self._items.values()})
