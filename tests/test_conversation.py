"""The conversation store and layout without a server: continuation, bounds, replays (issue 13)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import contentviews
from mitmproxy.test import taddons, tflow, tutils

from inprocess import ScoutAddons
from scout_diff_cache.chat.conversation import PINNED_SNAPSHOTS, Conversation, ConversationStore, chain_hashes
from scout_diff_cache.context.snapshot import Snapshot
from scout_diff_cache.context.workdiff import WorkState
from scout_diff_cache.mitm.state import METADATA_KEY
from support import CLEARED_ENV_NAMES, Repo

CHAT = "/v1/chat/completions"


def snapshot(name: str) -> Snapshot:
    return Snapshot(name, b'{"role": "system", "content": "' + name.encode() + b'"}', 0, 0, 0)


def conversation(count: int, message_1: Snapshot) -> Conversation:
    return Conversation(count, message_1, (), WorkState(None, {}))


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def test_a_request_continues_the_longest_remembered_shorter_prefix() -> None:
    store = ConversationStore(16)
    one = chain_hashes([user("a")])
    three = chain_hashes([user("a"), {"content": "ok", "role": "assistant"}, user("b")])
    first = conversation(1, snapshot("m1"))
    store.remember(one, first)
    assert store.find(three) is first
    assert store.find(one) is None  # the same messages again: not a continuation
    reordered_keys = chain_hashes([user("a"), {"role": "assistant", "content": "ok"}, user("b")])
    assert reordered_keys == three  # a client that orders an object's keys otherwise still continues
    assert store.find(chain_hashes([user("A"), user("b")])) is None


def test_the_store_keeps_at_most_its_capacity_and_pins_few_message_1s() -> None:
    store = ConversationStore(3)
    for index in range(5):
        store.remember(chain_hashes([user(str(index))]), conversation(1, snapshot("same")))
    assert len(store) == 3
    assert store.find(chain_hashes([user("0"), user("x")])) is None  # the oldest went first
    assert store.find(chain_hashes([user("4"), user("x")])) is not None
    pinned = ConversationStore(100)
    for index in range(PINNED_SNAPSHOTS + 3):  # each at another commit
        pinned.remember(chain_hashes([user(str(index))]), conversation(1, snapshot(f"m{index}")))
    assert len(pinned) == PINNED_SNAPSHOTS


@pytest.fixture
def addon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ScoutAddons:
    for name in CLEARED_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return ScoutAddons()


async def test_a_replayed_continuing_turn_strips_every_context_message_and_continues_as_before(
    addon: ScoutAddons, make_repo: Callable[..., Repo], tmp_path: Path
) -> None:
    """mitmweb's replay strips every context message the proxy put in, the later ones among the client's too."""
    repo = make_repo({"a.py": "a = 1\n"})
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    with taddons.context(addon) as tctx:
        tctx.configure(
            addon, scout_config=str(config), scout_git_repo_path=str(repo.path), scout_upstream_connect_timeout_ms="0"
        )
        try:
            messages = [user("first")]
            first = chat_flow(messages)
            await addon.send_request(first)
            repo.write({"a.py": "a = 2\n"})
            time.sleep(0.3)
            messages = [*messages, {"role": "assistant", "content": "ok"}, user("second")]
            second = chat_flow(messages)
            await addon.send_request(second)
            sent = json.loads(second.request.content or b"")["messages"]
            assert [m["role"] for m in sent] == ["system", "system", "user", "system", "assistant", "user"]
            assert len(second.metadata[METADATA_KEY]["injected_spans"]) == 1
            shown = contentviews.prettify_message(second.request, second).text  # what mitmweb shows
            assert "6 messages: snapshot, working diff, 1 change message, 3 from the client" in shown
            assert "messages[3] (changes since the previous context message, injected by the proxy) system" in shown
            second.is_replay = "request"
            await addon.send_request(second)
            # Its client part is the client's messages again (the change message stripped, or it would be a
            # client message now and the chain another): it continues the first turn as it did, the same bytes.
            assert json.loads(second.request.content or b"")["messages"] == sent
        finally:
            addon.stop()


def chat_flow(messages: list[dict[str, Any]]) -> tflow.HTTPFlow:
    body = json.dumps({"model": "m", "messages": messages}).encode()
    return tflow.tflow(req=tutils.treq(method=b"POST", path=CHAT.encode(), content=body), resp=False)
