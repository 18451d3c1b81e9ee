from __future__ import annotations

import openai

from support import Repo, Upstream


def test_chat_request_reaches_upstream_with_snapshot_then_diff_then_client_messages(
    make_repo, upstream: Upstream, start_proxy
) -> None:
    repo: Repo = make_repo({"src/app.py": "print('hello')\n", "README.md": "# demo\n"})
    repo.write({"src/app.py": "print('hello, world')\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    client = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="client-key", max_retries=0)

    reply = client.chat.completions.create(model="llama-4-scout", messages=[{"role": "user", "content": "hi"}])

    assert reply.choices[0].message.content == "ok"
    messages = upstream.chat_requests()[-1].json()["messages"]
    assert [m["role"] for m in messages] == ["system", "system", "user"]
    assert "<file path=\"src/app.py\">\nprint('hello')\n</file>" in messages[0]["content"]
    assert "+print('hello, world')" in messages[1]["content"]
    assert messages[2] == {"role": "user", "content": "hi"}
