"""Secrets never reach the model, through a real mitmdump (issue 15).

A repository holding the planted corpus (``secret_corpus.py``) in ordinary files, a secret
committed and removed by the next commit (the history blocks), one uncommitted edit and one
untracked file (the working diff), and the bait. What is checked is what the upstream received.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow

from inprocess import ScoutAddons
from secret_corpus import BAIT, COMMITTED_THEN_REMOVED, PLANTED, UNCOMMITTED_EDIT, UNTRACKED_FILE, planted_files
from support import Proxy, Repo, Upstream

StartProxy = Callable[..., Proxy]
SECRETS = [
    *(planted.secret for planted in PLANTED),
    COMMITTED_THEN_REMOVED[1],
    UNCOMMITTED_EDIT[1],
    UNTRACKED_FILE[1],
]


def corpus_repo(make_repo: Callable[..., Repo]) -> Repo:
    repo = make_repo({**planted_files(), **BAIT})
    path, token = COMMITTED_THEN_REMOVED
    repo.write({path: f"TOKEN = '{token}'\n"})
    repo.commit_all("add the release token")
    repo.write({path: "TOKEN = os.environ['TOKEN']\n"})
    repo.commit_all("read the release token from the environment")
    path, key = UNCOMMITTED_EDIT
    repo.write({path: planted_files()[path] + f'STRIPE_KEY = "{key}"\n'})
    path, token = UNTRACKED_FILE
    repo.write({path: f"SLACK = '{token}'\n"})
    return repo


def fragments(secret: str) -> list[str]:
    """What of a secret must not appear: all of it, and each line of a multi-line one (PEM bodies)."""
    lines = [line for line in re.split(r"\n|\\n", secret) if len(line) >= 16]
    return [secret, *lines]


def ask(proxy: Proxy) -> tuple[dict[str, str], list[str]]:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Where are the keys?"}]}).encode()
    reply = proxy.post("/v1/chat/completions", body)
    assert reply.status == 200, reply.body
    return reply.headers, []


def sent_texts(upstream: Upstream, index: int = -1) -> tuple[bytes, list[str]]:
    request = upstream.chat_requests()[index]
    return request.body, [str(json.loads(raw)["content"]) for raw in request.raw_messages()]


def test_no_planted_secret_reaches_the_upstream_and_the_bait_is_intact(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = corpus_repo(make_repo)
    # A history tail of any size, so the two commits stay blocks after the base (not a new base).
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "MAX_TAIL_PERCENT": "50"})
    ask(proxy)
    body, (message_1, diff, *_) = sent_texts(upstream)
    for secret in SECRETS:
        for fragment in fragments(secret):
            assert fragment not in message_1 and fragment not in diff and fragment.encode() not in body, fragment
            assert fragment not in proxy.log()
    for path, text in BAIT.items():
        assert f'<file path="{path}">\n{text}</file>\n' in message_1  # byte for byte
    # Message 1: each file's secret in place, listed at the end of the base; the history's, in its blocks.
    base, _, history = message_1.partition("</snapshot_info>")
    assert "[redacted aws-access-key-id]" in base and "[redacted private-key-base64]" in base
    listed = re.search(r'<redacted_secrets count="(\d+)">', base)
    assert listed is not None and int(listed.group(1)) == len(PLANTED)
    assert "src/cloud.py:3 aws-access-key-id" in base
    assert history.count("[redacted github-token]") == 2  # added by one commit, removed by the next
    assert re.search(r"<redacted_secrets count=\"1\">\n.*\nsrc/feature.py:1 github-token\n", history)
    assert "-TOKEN = '[redacted github-token]'" in history
    # The working diff: the uncommitted edit and the untracked file, listed at its end.
    assert '+STRIPE_KEY = "[redacted stripe-key]"' in diff and "[redacted slack-token]" in diff
    assert diff.rstrip().endswith("</redacted_secrets>") and "scratch/try.py:1 slack-token" in diff
    assert ' DB_PASSWORD = "[redacted secret-assignment]"' in diff  # a context line of the edited file too
    health = proxy.get("/health").json()
    assert health["snapshot"]["redacted_secrets"] == len(PLANTED) + 2 and health["diff"]["redacted_secrets"] == 3
    metrics = proxy.get("/metrics").body.decode()
    assert f'scout_redacted_secrets{{part="message_1"}} {len(PLANTED) + 2}.0' in metrics
    assert 'scout_redacted_secrets{part="diff"} 3.0' in metrics


def test_redacted_message_1_keeps_its_bytes_across_requests_and_processes(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = corpus_repo(make_repo)
    env = {"GIT_REPO_PATH": str(repo.path)}
    first_proxy = start_proxy(upstream.url, env)
    ask(first_proxy)
    ask(first_proxy)
    ask(start_proxy(upstream.url, env))
    firsts = [request.raw_messages()[0] for request in upstream.chat_requests()]
    assert len(firsts) == 3 and firsts[0] == firsts[1] == firsts[2]


def test_redact_secrets_false_sends_them_as_they_are(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    """The switch works (and shows the test above can fail)."""
    repo = corpus_repo(make_repo)
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "REDACT_SECRETS": "false"})
    ask(proxy)
    body, texts = sent_texts(upstream)
    assert all(planted.secret in "".join(texts) for planted in PLANTED)
    assert b"redacted_secrets" not in body


def test_a_bad_secret_pattern_stops_the_proxy_with_the_setting_named(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: StartProxy
) -> None:
    repo = make_repo({"a.py": "a = 1\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "SECRET_PATTERNS": "(a)(b)"}, wait=False)
    assert proxy.wait_exit() != 0
    assert "invalid setting secret_patterns" in proxy.log() and "groups" in proxy.log()


async def test_mitmweb_shows_where_secrets_were_redacted(
    addon: ScoutAddons, make_repo: Callable[..., Repo], upstream: Upstream
) -> None:
    repo = corpus_repo(make_repo)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, scout_git_repo_path=str(repo.path))
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        flow = tflow.tflow(req=http.Request.make("POST", f"{upstream.url}/v1/chat/completions", body), resp=False)
        await addon.send_request(flow)
        shown: Any = contentviews.prettify_message(flow.request, flow)
        assert "[redacted stripe-key]" in shown.text and "scratch/try.py:1 slack-token" in shown.text
        assert not any(fragment in shown.text for secret in SECRETS for fragment in fragments(secret))
