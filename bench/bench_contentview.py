"""How long mitmweb waits for a rewritten chat request to render: the "Scout chat" view vs the JSON view.

Builds a real snapshot of a generated repository (default: 4000 files of 10 KB, about 40 MB), a
working diff and a short conversation, splices them with the proxy's own ``assemble_body``, and
times ``contentviews.prettify_message`` (what mitmweb calls for a flow's body) with our view
registered and without it (the built-in JSON view is then chosen), and each view's ``prettify``
alone, best of a few runs each. The automatic choice runs every registered view's
``render_priority`` on the body, which costs the same with or without ours.
Usage: python bench/bench_contentview.py [--files N] [--file-kb K] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from scout_diff_cache.chat.request import assemble_body, parse_chat_request
from scout_diff_cache.context.snapshot import SnapshotLimits, build_snapshot
from scout_diff_cache.context.workdiff import DiffLimits, build_working_diff
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.mitm.contentview import VIEW_NAME, ChatContentview
from scout_diff_cache.mitm.internals import remove_contentview
from scout_diff_cache.mitm.state import METADATA_KEY
from scout_diff_cache.view.snapshot import SnapshotIndex
from support import Repo, generated_files

CLIENT_BODY = {
    "model": "llama-4-scout",
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 1024,
    "messages": [
        {"role": "user", "content": "Where is the request rewritten?"},
        {"role": "assistant", "content": "In addon.py, in _inject."},
        {"role": "user", "content": "And where are the spans recorded?"},
    ],
}


CHAT_VIEW = ChatContentview(SnapshotIndex())


def chat_flow(root: Path, files: int, file_kb: int) -> http.HTTPFlow:
    """A chat flow as the addon leaves it: the spliced body and the spans in flow.metadata."""
    repo = Repo.create(root, generated_files(files, file_kb * 1000))
    repo.write({"pkg00/module_0000.py": "changed = True\n", "NOTES.md": "work in progress\n"})
    git_repo = GitRepo(str(root))
    commit = git_repo.head_commit()
    path_filter = PathFilter.build((), True)
    snapshot = build_snapshot(git_repo, commit, SnapshotLimits(1 << 20, 1 << 30, path_filter))
    diff = build_working_diff(git_repo, commit, DiffLimits(1 << 20, 1 << 20, path_filter))
    assembled = assemble_body(
        parse_chat_request(json.dumps(CLIENT_BODY).encode()), [snapshot.message_json, diff.message_json]
    )
    request = http.Request.make(
        "POST", "http://127.0.0.1:8000/v1/chat/completions", assembled.body, {"content-type": "application/json"}
    )
    flow = tflow.tflow(req=request)
    snapshot_span, diff_span = assembled.context_spans
    flow.metadata[METADATA_KEY] = {"commit": commit, "snapshot_span": snapshot_span, "diff_span": diff_span}
    return flow


def best_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--file-kb", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="scout-bench-") as tmp:
        flow = chat_flow(Path(tmp) / "repo", args.files, args.file_kb)

    metadata = contentviews.Metadata(flow=flow, http_message=flow.request, content_type="application/json")
    data = flow.request.content or b""
    with taddons.context():
        json_auto = best_seconds(lambda: contentviews.prettify_message(flow.request, flow), args.repeat)
        json_result = contentviews.prettify_message(flow.request, flow)
        contentviews.add(CHAT_VIEW)
        try:
            ours_auto = best_seconds(lambda: contentviews.prettify_message(flow.request, flow), args.repeat)
            ours_result = contentviews.prettify_message(flow.request, flow)
        finally:
            remove_contentview(CHAT_VIEW)
    assert ours_result.view_name == VIEW_NAME, ours_result.description
    assert json_result.view_name == "JSON", json_result.description
    ours_alone = best_seconds(lambda: CHAT_VIEW.prettify(data, metadata), args.repeat)
    json_alone = best_seconds(lambda: contentviews.json_view.prettify(data, metadata), args.repeat)

    print(f"request body: {len(data) / 1e6:.1f} MB, {args.files} files; best of {args.repeat} runs each")
    print("prettify_message, view chosen automatically (what mitmweb calls; every view's render_priority runs):")
    print(comparison(ours_auto, json_auto))
    print("the view's prettify alone:")
    print(comparison(ours_alone, json_alone))
    print("text for the browser:")
    for name, result in (("Scout chat", ours_result), ("JSON", json_result)):
        lines = result.text.splitlines()
        longest = max(map(len, lines))
        print(f"  {name}: {len(result.text) / 1e6:.2f} MB, {len(lines):,} lines, longest {longest:,} characters")


def comparison(ours: float, json_view: float) -> str:
    return f"  Scout chat {ours * 1000:.0f} ms, JSON {json_view * 1000:.0f} ms, JSON/ours {json_view / ours:.1f}x"


if __name__ == "__main__":
    main()
