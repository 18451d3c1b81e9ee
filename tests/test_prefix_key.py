"""x-scout-prefix-key and message 1's first bytes: what cluster routers see of the cached prefix.

Through a real mitmdump: the key on the request the upstream received and on the client's answer,
the same across requests, commits after the base and a second proxy process on a clone (a
replica), different across repositories and bases; its copies into other headers and vLLM's
``cache_salt``; and the first 16 KB of message 1 (all llm-d's prefix scorer reads) telling
repositories and bases apart even when their first files are the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from scout_diff_cache.context.snapshot import prefix_key_of
from support import Proxy, Recorded, Repo, Upstream

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "cache_salt": "client"}).encode()
JSON = {"content-type": "application/json"}
SCORER_BYTES = 16 * 1024  # about what llm-d's approximate prefix scorer hashes (FACTS.md, cluster routers)
# The same large first file in every repository here: without the base line, their first 16 KB would match.
SHARED_FIRST_FILE = {".aaa-shared-license.txt": "Licensed under the same terms everywhere.\n" * 600}
KEY = re.compile(r"[0-9a-f]{16}")


def files(name: str) -> dict[str, str | bytes]:
    return {**SHARED_FIRST_FILE, "app.py": f"print({name!r})\n", "big.md": "words " * 3000}


def ask(proxy: Proxy, upstream: Upstream) -> tuple[str, Recorded]:
    answer = proxy.post("/v1/chat/completions", CHAT, JSON)
    assert answer.status == 200, answer.body
    sent = upstream.chat_requests()[-1]
    assert sent.headers["x-scout-prefix-key"] == answer.headers["x-scout-prefix-key"]
    return answer.headers["x-scout-prefix-key"], sent


def message_1(sent: Recorded) -> bytes:
    return sent.raw_messages()[0]


def test_one_key_per_base_on_every_replica_and_a_new_one_per_repository_and_base(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    repo = make_repo(files("one"))
    other = make_repo(files("two"))
    env = {"BASE_EVERY_COMMITS": "4", "MAX_TAIL_PERCENT": "100"}
    proxy = start_proxy(upstream.url, {**env, "GIT_REPO_PATH": str(repo.path)})
    key, sent = ask(proxy, upstream)
    assert KEY.fullmatch(key)
    base = json.loads(message_1(sent))["content"]
    assert base.startswith(f"Base commit: {repo.head()}\n")
    assert ask(proxy, upstream)[0] == key  # the same request again

    repo.write({"app.py": "print('one, edited')\n"})
    repo.commit_all("a commit after the base: the history grows, the base stays")
    after_commit, sent_after = ask(proxy, upstream)
    assert after_commit == key
    assert message_1(sent_after).startswith(message_1(sent)[: -len(b'"}')])  # only appended to

    replica = start_proxy(upstream.url, {**env, "GIT_REPO_PATH": str(repo.clone(tmp_path / "replica").path)})
    assert ask(replica, upstream)[0] == key

    other_proxy = start_proxy(upstream.url, {**env, "GIT_REPO_PATH": str(other.path)})
    other_key, other_sent = ask(other_proxy, upstream)
    assert other_key != key
    assert message_1(other_sent)[:SCORER_BYTES] != message_1(sent_after)[:SCORER_BYTES]

    for i in range(4):  # past BASE_EVERY_COMMITS: the base moves
        repo.write({"app.py": f"print('one, edit {i}')\n"})
        repo.commit_all(f"commit {i}")
    moved, sent_moved = ask(proxy, upstream)
    assert moved != key
    first_line = json.loads(message_1(sent_moved))["content"].partition("\n")[0]
    assert first_line.startswith("Base commit: ") and first_line != base.partition("\n")[0]
    assert message_1(sent_moved)[:SCORER_BYTES] != message_1(sent)[:SCORER_BYTES]


def test_the_key_names_the_bases_bytes(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    repo = make_repo(files("bytes"))
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    key, sent = ask(proxy, upstream)
    assert key == prefix_key_of(message_1(sent))  # a fresh base: message 1 is the base
    changed = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "MAX_FILE_BYTES": "1000"})
    assert ask(changed, upstream)[0] != key  # other settings, other bytes, another key


def test_copies_go_into_the_routers_headers_and_vllms_cache_salt(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    repo = make_repo(files("copies"))
    env = {
        "GIT_REPO_PATH": str(repo.path),
        "PREFIX_KEY_HEADERS": "X-SMG-Routing-Key,x-session-id",
        "PREFIX_KEY_CACHE_SALT": "true",
    }
    proxy = start_proxy(upstream.url, env)
    key, sent = ask(proxy, upstream)
    assert sent.headers["x-smg-routing-key"] == key and sent.headers["x-session-id"] == key
    assert sent.json()["cache_salt"] == key  # the proxy's, not the client's "client"

    plain = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    _, sent_plain = ask(plain, upstream)
    assert "x-smg-routing-key" not in sent_plain.headers
    assert sent_plain.json()["cache_salt"] == "client"  # left as the client sent it


def test_a_header_the_proxy_owns_is_refused_as_a_copy(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    repo = make_repo(files("refused"))
    proxy = start_proxy(
        upstream.url, {"GIT_REPO_PATH": str(repo.path), "PREFIX_KEY_HEADERS": "Content-Length"}, wait=False
    )
    assert proxy.wait_exit() != 0
    assert "invalid setting prefix_key_headers" in proxy.log()
