"""Cache-stable conversations through a real mitmdump (issue 13): a continuing conversation's prompt only grows.

A scripted agent session: each turn resends the conversation with the assistant's answer and a
new user message, and edits the repository in between. What is checked is what the upstream got.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from support import Proxy, Repo, Upstream

StartProxy = Callable[..., Proxy]
WATCH_SECONDS = 0.3  # the watcher sees an edit within this


def post(proxy: Proxy, messages: list[dict[str, Any]]) -> dict[str, str]:
    reply = proxy.post("/v1/chat/completions", json.dumps({"model": "m", "messages": messages}).encode())
    assert reply.status == 200, reply.body
    return reply.headers


def sent(upstream: Upstream, index: int = -1) -> list[bytes]:
    return upstream.chat_requests()[index].raw_messages()


def content(raw: bytes) -> str:
    text: str = json.loads(raw)["content"]
    return text


def turn(messages: list[dict[str, Any]], question: str) -> list[dict[str, Any]]:
    return [*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": question}]


def test_each_turn_resends_the_previous_prompt_byte_for_byte_and_adds_only_what_changed(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo({"src/app.py": "VERSION = 1\n", "src/util.py": "def helper():\n    return 1\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    messages = [{"role": "user", "content": "what is VERSION?"}]
    post(proxy, messages)
    first = sent(upstream)
    assert len(first) == 3  # message 1, the working diff, the question

    repo.write({"src/app.py": "VERSION = 2\n"})  # the agent edits a file
    time.sleep(WATCH_SECONDS)
    messages = turn(messages, "and now?")
    post(proxy, messages)
    second = sent(upstream)
    assert second[: len(first)] == first  # the whole previous prompt, byte for byte
    changes = content(second[len(first)])  # just before the new client messages
    assert changes.startswith("Changes to the repository since the previous context message (HEAD is still")
    assert "-VERSION = 1\n+VERSION = 2\n" in changes
    assert json.loads(second[-1])["content"] == "and now?"

    repo.commit_all("version 2")  # a commit mid-session: message 1 stays as it was
    repo.write({"src/util.py": "def helper():\n    return 2\n"})
    time.sleep(WATCH_SECONDS)
    messages = turn(messages, "what changed?")
    headers = post(proxy, messages)
    assert headers["x-scout-cache-expected"] == (
        "hit; conversation continued: 2 changes injected: the previous prompt is cached"
    )
    third = sent(upstream)
    assert third[: len(second)] == second
    changes = content(third[len(second)])
    assert "HEAD moved from" in changes and "-    return 1\n+    return 2\n" in changes
    assert "VERSION" not in changes  # committed after it was already sent: nothing new for the model
    assert "conversation continued: 2 changes injected" in proxy.log()

    messages = turn(messages, "nothing changed since?")  # no edit: no change message, just the turn
    post(proxy, messages)
    fourth = sent(upstream)
    assert fourth[: len(third)] == third and len(fourth) == len(third) + 2
    metrics = proxy.get("/metrics").body.decode()
    assert 'scout_conversation_turns_total{layout="continued"} 3.0' in metrics
    assert 'scout_conversation_turns_total{layout="fresh"} 1.0' in metrics


def test_a_conversation_the_proxy_does_not_know_gets_the_fresh_layout(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo({"a.py": "a = 1\n"})
    env = {"GIT_REPO_PATH": str(repo.path)}
    first_proxy = start_proxy(upstream.url, env)
    messages = [{"role": "user", "content": "hi"}]
    post(first_proxy, messages)
    repo.write({"a.py": "a = 2\n"})
    time.sleep(WATCH_SECONDS)
    restarted = start_proxy(upstream.url, env)  # another process: a restart, another replica
    post(restarted, turn(messages, "and now?"))
    fresh = sent(upstream)
    assert len(fresh) == 2 + 3  # message 1, the working diff, then the client's three messages
    assert "-a = 1\n+a = 2\n" in content(fresh[1])  # the current diff, in full
    assert 'scout_conversation_turns_total{layout="fresh"} 1.0' in restarted.get("/metrics").body.decode()


def test_two_interleaved_conversations_each_continue_their_own(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo({"a.py": "a = 1\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    a = [{"role": "user", "content": "conversation A"}]
    b = [{"role": "user", "content": "conversation B"}]
    post(proxy, a)
    a1 = sent(upstream)
    repo.write({"a.py": "a = 2\n"})
    time.sleep(WATCH_SECONDS)
    post(proxy, b)  # starts after the edit: its diff has it
    b1 = sent(upstream)
    post(proxy, turn(a, "A again"))
    a2 = sent(upstream)
    post(proxy, turn(b, "B again"))
    b2 = sent(upstream)
    assert a2[: len(a1)] == a1 and "+a = 2\n" in content(a2[len(a1)])  # A learns of the edit now
    assert b2[: len(b1)] == b1 and len(b2) == len(b1) + 2  # B knew it already: nothing to add


def test_an_edited_earlier_message_is_not_a_continuation_of_the_latest_turn(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo({"a.py": "a = 1\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    messages = [{"role": "user", "content": "first"}]
    post(proxy, messages)
    repo.write({"a.py": "a = 2\n"})
    time.sleep(WATCH_SECONDS)
    messages = turn(messages, "second")
    post(proxy, messages)
    edited = [{"role": "user", "content": "first, edited"}, *messages[1:]]
    post(proxy, edited)
    fresh = sent(upstream)
    assert len(fresh) == 2 + len(edited) and "+a = 2\n" in content(fresh[1])


def test_the_store_is_bounded_and_the_seed_layout_is_kept(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo({"a.py": "a = 1\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "MAX_CONVERSATIONS": "1"})
    a = [{"role": "user", "content": "conversation A"}]
    post(proxy, a)
    post(proxy, [{"role": "user", "content": "conversation B"}])  # A is evicted
    post(proxy, turn(a, "A again"))
    assert len(sent(upstream)) == 2 + 3  # fresh
    seed = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "CONVERSATION_LAYOUT": "seed"})
    post(seed, a)
    repo.write({"a.py": "a = 2\n"})
    time.sleep(WATCH_SECONDS)
    post(seed, turn(a, "A again"))
    seeded = sent(upstream)
    assert len(seeded) == 2 + 3 and "+a = 2\n" in content(seeded[1])
    assert "conversation" not in seed.log().split("chat 200")[-1]


def test_a_conversation_whose_changes_no_longer_fit_the_window_is_laid_out_afresh(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    upstream.behaviour.max_model_len = 16384  # a window the proxy learns (4 characters per token by estimate)
    repo = make_repo({"a.py": "a = 1\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "BYTES_PER_TOKEN": "4"})
    messages = [{"role": "user", "content": "first"}]
    post(proxy, messages)
    repo.write({f"big{i}.py": "".join(f"VALUE_{i}_{n} = {n}\n" for n in range(1500)) for i in range(2)})
    time.sleep(WATCH_SECONDS)
    post(proxy, turn(messages, "what did I add?"))
    fresh = sent(upstream)
    assert len(fresh) == 2 + 3  # message 1, a working diff, the client's messages: no earlier prompt
    assert "left out so the request fits the model's context window of 16384 tokens" in content(fresh[1])
    assert (
        "conversation laid out afresh: with the changes since it started (1 messages) it no longer fits" in proxy.log()
    )
    metrics = proxy.get("/metrics").body.decode()
    assert 'scout_conversation_turns_total{layout="fell_back"} 1.0' in metrics
