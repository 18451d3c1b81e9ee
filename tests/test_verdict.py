"""The cache verdict and its cause, the tracker of what was sent, and the snapshot offset helpers."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scout_diff_cache.chat.usage import UpstreamUsage
from scout_diff_cache.context import snapshot as snapshot_module
from scout_diff_cache.context.snapshot import (
    PREAMBLE,
    Snapshot,
    SnapshotContent,
    SnapshotLimits,
    build_snapshot,
    common_prefix_length,
    file_block,
    path_at,
    render_snapshot,
    symlink_block,
    with_history,
)
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.observe.verdict import (
    ENGINE_HINT,
    ESTIMATE_TOLERANCE_SHARE,
    EXACT_TOLERANCE_TOKENS,
    MISS_BELOW_TOKENS,
    RECENT_WINDOW,
    REMEMBERED_SNAPSHOTS,
    CacheTracker,
    CacheVerdict,
    SendHistory,
    SnapshotTokens,
    cache_grain,
    classify,
    estimate_snapshot_tokens,
    tools_key,
)
from support import Repo

MakeRepo = Callable[..., Repo]

LIMITS = SnapshotLimits(1 << 20, 1 << 26, PathFilter.build([], True))
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
DETAILS = "usage.prompt_tokens_details.cached_tokens"
UP = "http://127.0.0.1:8000"


def make_snapshot(
    files: Mapping[str, str], commit: str | None = COMMIT_A, symlinks: Mapping[str, str] | None = None
) -> tuple[Snapshot, list[tuple[str, str]]]:
    """A snapshot rendered by the real code, with its (path, block text) list in snapshot order."""
    entries = [(path, file_block(path.encode(), body.encode())) for path, body in files.items()]
    entries += [(path, symlink_block(path.encode(), target.encode())) for path, target in (symlinks or {}).items()]
    entries.sort(key=lambda entry: entry[0].encode())
    content = SnapshotContent()
    for path, block in entries:
        content.add_block(path.encode(), block, len(block.encode()), symlink=path in (symlinks or {}))
    return render_snapshot(commit, content, LIMITS), entries


def encoded(text: str) -> bytes:
    """``text`` as it appears inside a JSON string literal (the encoding is per character)."""
    return json.dumps(text, ensure_ascii=False)[1:-1].encode()


MESSAGE_HEAD = b'{"role": "system", "content": "'


def block_ranges(snapshot: Snapshot, entries: list[tuple[str, str]]) -> list[tuple[str, int, int]]:
    """(path, start, end) of each block's bytes in the snapshot's message_json, computed independently."""
    assert snapshot.message_json.startswith(MESSAGE_HEAD)
    position = len(MESSAGE_HEAD) + len(encoded(PREAMBLE))
    ranges = []
    for path, block in entries:
        size = len(encoded(block))
        ranges.append((path, position, position + size))
        position += size
    assert snapshot.message_json[position:].startswith(encoded("<snapshot_info>\n"))
    return ranges


def naive_common_prefix(a: bytes, b: bytes) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def history(**changes: object) -> SendHistory:
    """A history of a snapshot sent before to an upstream that reports cache hits; fields overridden."""
    base = SendHistory(
        first_request=False,
        snapshot_seen=True,
        previous_commit=None,
        snapshot_changed=False,
        reusable_bytes=None,
        changed_at=None,
        tools_changed=False,
        reports_cache=True,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def usage(prompt: int | None, cached: int | None) -> UpstreamUsage:
    return UpstreamUsage(prompt, cached)


SNAPSHOT, SNAPSHOT_ENTRIES = make_snapshot({f"f{i}.txt": f"line {i}\n" * 200 for i in range(5)})


def snap_repo(repo: Repo) -> Snapshot:
    git_repo = GitRepo(str(repo.path))
    return build_snapshot(git_repo, git_repo.head_commit(), LIMITS)


# --- classify: verdicts ---------------------------------------------------------------------------


def test_no_usage_is_unknown() -> None:
    verdict = classify(None, SnapshotTokens(1000, True), history(), SNAPSHOT)
    assert verdict == CacheVerdict(
        "unknown", "no usage", f"the upstream sent no usage; {ENGINE_HINT}", None, None, None
    )
    assert verdict.summary() == "cache unknown: no usage"


def test_no_cached_count_is_unknown() -> None:
    tokens = SnapshotTokens(1000, True)
    verdict = classify(usage(5000, None), tokens, history(reports_cache=False, snapshot_seen=False), SNAPSHOT)
    assert verdict.verdict == "unknown"
    assert verdict.cause == "upstream reports no cached tokens"
    assert verdict.detail == (
        "the upstream reported no cached tokens (vLLM also leaves the count out when nothing was cached); "
        + ENGINE_HINT
    )
    assert (verdict.prompt_tokens, verdict.cached_tokens, verdict.snapshot_tokens) == (5000, None, tokens)
    assert verdict.summary() == "cache unknown: upstream reports no cached tokens"

    seen = classify(usage(5000, None), tokens, history(reports_cache=False), SNAPSHOT)
    assert seen.detail == f"the upstream reported no cached tokens; {ENGINE_HINT}"


def test_absent_count_reads_as_zero_once_the_upstream_has_reported_cache() -> None:
    verdict = classify(usage(5000, None), SnapshotTokens(1000, True), history(reports_cache=True), SNAPSHOT)
    assert verdict.verdict == "miss"
    assert verdict.cached_tokens == 0
    assert verdict.cause == "evicted"
    assert verdict.summary() == "cached 0.0% (miss: evicted)"


def test_absent_count_and_absent_prompt_tokens_stay_unknown() -> None:
    verdict = classify(UpstreamUsage(None, None, 12, None), None, history(reports_cache=True), SNAPSHOT)
    assert verdict.verdict == "unknown"
    assert verdict.cached_tokens is None


@pytest.mark.parametrize(
    ("cached", "expected"),
    [
        (6000, "hit"),
        (5000, "hit"),
        (5000 - EXACT_TOLERANCE_TOKENS, "hit"),
        (5000 - EXACT_TOLERANCE_TOKENS - 1, "partial"),
        (MISS_BELOW_TOKENS + 1, "partial"),
        (MISS_BELOW_TOKENS, "partial"),
        (MISS_BELOW_TOKENS - 1, "miss"),
        (0, "miss"),
    ],
)
def test_verdict_against_an_exact_count(cached: int, expected: str) -> None:
    verdict = classify(usage(6000, cached), SnapshotTokens(5000, True), history(), SNAPSHOT)
    assert verdict.verdict == expected
    assert verdict.cached_tokens == cached


@pytest.mark.parametrize(
    ("snapshot_tokens", "cached", "expected"),
    [
        (10_000, 10_000, "hit"),
        (10_000, 9700, "hit"),  # 3 % of 10 000 = 300
        (10_000, 9699, "partial"),
        (5000, 4850, "hit"),
        (5000, 4849, "partial"),
        (5000, 4936, "hit"),
        (100_000, 97_000, "hit"),
        (100_000, 96_999, "partial"),  # well inside what an exact count would call a hit: 64 tokens
        (10_000, MISS_BELOW_TOKENS, "partial"),
        (10_000, MISS_BELOW_TOKENS - 1, "miss"),
    ],
)
def test_verdict_against_an_estimate(snapshot_tokens: int, cached: int, expected: str) -> None:
    assert ESTIMATE_TOLERANCE_SHARE == 0.03
    verdict = classify(usage(2 * snapshot_tokens, cached), SnapshotTokens(snapshot_tokens, False), history(), SNAPSHOT)
    assert verdict.verdict == expected


def test_a_small_exact_snapshot_uses_the_token_tolerance_not_the_share() -> None:
    # 3 % of 1000 would be 30; the exact tolerance is 64 tokens.
    assert classify(usage(2000, 937), SnapshotTokens(1000, True), history(), SNAPSHOT).verdict == "hit"
    assert classify(usage(2000, 937), SnapshotTokens(1000, False), history(), SNAPSHOT).verdict == "partial"


@pytest.mark.parametrize("tokens", [None, SnapshotTokens(0, False), SnapshotTokens(0, True)])
@pytest.mark.parametrize(("cached", "expected"), [(10_000, "hit"), (65, "hit"), (63, "miss"), (0, "miss")])
def test_verdict_without_an_expected_count(tokens: SnapshotTokens | None, cached: int, expected: str) -> None:
    verdict = classify(usage(20_000, cached), tokens, history(), SNAPSHOT)
    assert verdict.verdict == expected


def test_without_an_expected_count_the_miss_threshold_is_the_same() -> None:
    """MISS_BELOW_TOKENS: below it is a miss. With an expected count 64 cached tokens is not a miss;
    without one it must not be either."""
    with_count = classify(usage(20_000, MISS_BELOW_TOKENS), SnapshotTokens(10_000, True), history(), SNAPSHOT)
    assert with_count.verdict == "partial"
    without = classify(usage(20_000, MISS_BELOW_TOKENS), None, history(), SNAPSHOT)
    assert without.verdict == "hit"


def test_vllm_caching_in_larger_blocks_on_a_hybrid_model_is_still_a_hit() -> None:
    """Measured on vLLM's tiny llama4: a 10704-token snapshot, 10624 cached (83 blocks of 128), 896 written."""
    counted = SnapshotTokens(10_704, True)
    vllm = UpstreamUsage(11_633, 10_624, written_tokens=896)
    assert cache_grain(vllm) == 128
    assert classify(vllm, counted, history(), SNAPSHOT).verdict == "hit"
    # Without vLLM's written count the step is unknown: 80 tokens short of an exact count is partial.
    assert classify(UpstreamUsage(11_633, 10_624), counted, history(), SNAPSHOT).verdict == "partial"
    # One block short of the whole snapshot, more than the step: partial.
    short = UpstreamUsage(11_633, 10_496, written_tokens=1_152)  # 82 and 9 blocks: gcd 128, not 1152
    assert cache_grain(short) == 128
    assert classify(short, counted, history(), SNAPSHOT).verdict == "partial"
    assert cache_grain(UpstreamUsage(11_633, 10_368, written_tokens=1_152)) == 128  # gcd 1152 = 9 x 128
    assert cache_grain(UpstreamUsage(100, 0, written_tokens=64)) == 0


# --- classify: causes -----------------------------------------------------------------------------


def test_a_hit_has_no_cause() -> None:
    verdict = classify(usage(1000, 998), SnapshotTokens(990, True), history(), SNAPSHOT)
    assert (verdict.verdict, verdict.cause, verdict.detail) == ("hit", "", "the upstream reused the whole snapshot")
    assert verdict.summary() == "cached 99.8% (hit)"


def test_cause_first_request() -> None:
    verdict = classify(usage(1000, 0), SnapshotTokens(900, True), history(first_request=True), SNAPSHOT)
    assert verdict.cause == "first request"
    assert verdict.detail == "first request to this upstream since the proxy started: its cache was cold"
    assert verdict.summary() == "cached 0.0% (miss: first request)"


def test_cause_new_commit_from_a_real_pair_of_snapshots(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "alpha\n" * 300, "b.txt": "beta\n" * 300, "c.txt": "gamma\n" * 300})
    old_commit = repo.head()
    old = snap_repo(repo)
    repo.write({"b.txt": "beta\n" * 150 + "CHANGED\n" + "beta\n" * 149})
    new_commit = repo.commit_all("change b")
    new = snap_repo(repo)

    tracker = CacheTracker()
    tracker.before_send(UP, old, None)
    sent = tracker.before_send(UP, new, None)
    shared = naive_common_prefix(old.message_json, new.message_json)
    assert sent.reusable_bytes == shared
    assert sent.changed_at == "b.txt"

    verdict = classify(usage(1000, 1), SnapshotTokens(900, True), sent, new)
    assert verdict.verdict == "miss"
    assert verdict.cause == "new commit"
    share = f"{shared / new.size * 100:.0f}"
    assert 40 <= int(share) <= 70  # b.txt's middle: about half of the snapshot
    assert verdict.detail == (
        f"the snapshot is new: {old_commit[:7]} -> {new_commit[:7]}; "
        f"{share}% of it is an identical prefix (it changes at b.txt)"
    )
    assert verdict.summary() == "cached 0.1% (miss: new commit)"


def test_cause_new_commit_from_and_to_an_unborn_head() -> None:
    empty, _ = make_snapshot({}, commit=None)
    sent = history(snapshot_seen=False, snapshot_changed=True, previous_commit=None, reusable_bytes=None)
    verdict = classify(usage(500, 0), SnapshotTokens(400, True), sent, empty)
    assert verdict.detail == "the snapshot is new: unborn -> unborn"


def test_cause_tools_changed() -> None:
    verdict = classify(usage(1000, 5), SnapshotTokens(900, True), history(tools_changed=True), SNAPSHOT)
    assert verdict.cause == "tools"
    assert verdict.detail.startswith("the request's tools differ from the previous one's: Llama 4's chat template")
    assert verdict.summary() == "cached 0.5% (miss: tools)"


def test_cause_evicted() -> None:
    verdict = classify(usage(1000, 5), SnapshotTokens(900, True), history(), SNAPSHOT)
    assert verdict.cause == "evicted"
    assert verdict.detail.startswith("this snapshot was sent before but the upstream no longer holds it")


def test_cause_new_snapshot() -> None:
    sent = history(snapshot_seen=False, snapshot_changed=False)
    verdict = classify(usage(1000, 5), SnapshotTokens(900, True), sent, SNAPSHOT)
    assert (verdict.cause, verdict.detail) == ("new snapshot", "first request with this snapshot")


def test_cause_precedence() -> None:
    everything = history(first_request=True, snapshot_seen=False, snapshot_changed=True, tools_changed=True)
    assert classify(usage(1000, 0), None, everything, SNAPSHOT).cause == "first request"
    changed = replace(everything, first_request=False)
    assert classify(usage(1000, 0), None, changed, SNAPSHOT).cause == "new commit"
    # Back to a snapshot sent before (changed, but seen): not a new commit.
    back = history(snapshot_changed=True, previous_commit=COMMIT_B, tools_changed=True)
    assert classify(usage(1000, 0), None, back, SNAPSHOT).cause == "tools"
    assert classify(usage(1000, 0), None, replace(back, tools_changed=False), SNAPSHOT).cause == "evicted"


def test_partial_names_the_file_where_the_cache_ended() -> None:
    snapshot, entries = make_snapshot({f"pkg/m{i}.py": f"x_{i} = {i}\n" * 400 for i in range(8)})
    ranges = block_ranges(snapshot, entries)
    for cached, percent in [(5000, 50), (2600, 26), (8100, 81)]:
        offset = int(cached / 10_000 * snapshot.size)
        (path,) = [p for p, start, end in ranges if start + 20 <= offset < end]  # well inside one block
        verdict = classify(usage(12_000, cached), SnapshotTokens(10_000, True), history(), snapshot)
        assert verdict.verdict == "partial"
        assert verdict.detail.endswith(f"; the cache ended about {percent}% into the snapshot, near {path}")
        assert verdict.detail.startswith("this snapshot was sent before")


def test_partial_after_a_new_commit_says_both() -> None:
    snapshot, entries = make_snapshot({"a.txt": "a\n" * 2000, "b.txt": "b\n" * 2000})
    (_, b_start, b_end) = block_ranges(snapshot, entries)[1]
    reusable = b_start + 100
    sent = history(
        snapshot_seen=False,
        snapshot_changed=True,
        previous_commit=COMMIT_B,
        reusable_bytes=reusable,
        changed_at="b.txt",
    )
    verdict = classify(usage(1000, 600), SnapshotTokens(800, True), sent, replace(snapshot, commit=COMMIT_A))
    assert verdict.verdict == "partial"
    assert b_start < int(0.75 * snapshot.size) < b_end
    assert verdict.detail == (
        f"the snapshot is new: bbbbbbb -> aaaaaaa; {reusable / snapshot.size * 100:.0f}% of it is an identical "
        "prefix (it changes at b.txt); the cache ended about 75% into the snapshot, near b.txt"
    )


# --- CacheVerdict ---------------------------------------------------------------------------------


def test_summary_and_share() -> None:
    assert classify(usage(1000, 1000), None, history(), SNAPSHOT).summary() == "cached 100.0% (hit)"
    more = classify(usage(1000, 1500), None, history(), SNAPSHOT)
    assert more.cached_share == 1.0
    assert more.summary() == "cached 100.0% (hit)"
    assert classify(usage(3, 1), None, history(), SNAPSHOT).cached_share == pytest.approx(1 / 3)


def test_summary_without_prompt_tokens() -> None:
    hit = classify(usage(None, 5000), None, history(), SNAPSHOT)
    assert hit.cached_share is None
    assert hit.summary() == "(hit)"
    miss = classify(usage(0, 0), None, history(first_request=True), SNAPSHOT)
    assert miss.cached_share is None
    assert miss.summary() == "(miss: first request)"


def test_as_dict() -> None:
    verdict = classify(usage(1000, 950), SnapshotTokens(980, True), history(), SNAPSHOT)
    assert verdict.as_dict() == {
        "verdict": "hit",
        "cause": "",
        "detail": "the upstream reused the whole snapshot",
        "prompt_tokens": 1000,
        "cached_tokens": 950,
        "snapshot_tokens": 980,
        "snapshot_tokens_exact": True,
        "cached_share": 0.95,
    }
    assert json.loads(json.dumps(verdict.as_dict())) == verdict.as_dict()
    unknown = classify(None, None, history(), SNAPSHOT).as_dict()
    assert unknown["snapshot_tokens"] is None
    assert unknown["snapshot_tokens_exact"] is None
    assert unknown["cached_share"] is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1000, 250, 1000), 250),
        ((1000, 1, 3), 333),
        ((1000, 2, 3), 667),
        ((1000, 5, 0), 1000),  # no message bytes: all of it
        ((1000, 5000, 1000), 1000),  # never more than the prompt
        ((0, 10, 100), 0),
    ],
)
def test_estimate_snapshot_tokens(args: tuple[int, int, int], expected: int) -> None:
    assert estimate_snapshot_tokens(*args) == SnapshotTokens(expected, exact=False)


# --- SendHistory.expectation and tools_key --------------------------------------------------------


def test_expectation() -> None:
    assert history(first_request=True, snapshot_seen=False).expectation() == "miss; first request to this upstream"
    assert history(snapshot_seen=False, snapshot_changed=True).expectation() == "miss; new commit"
    assert history(snapshot_seen=False).expectation() == "miss; new snapshot"
    assert history(tools_changed=True).expectation() == "miss; tools changed"
    assert history().expectation() == "hit"
    assert history(snapshot_changed=True, reports_cache=False).expectation() == "hit"


def test_tools_key() -> None:
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    clock = {"type": "function", "function": {"name": "clock"}}
    assert tools_key({}) is None
    assert tools_key({"tools": []}) is None
    assert tools_key({"tools": None}) is None
    key = tools_key({"tools": [weather, clock]})
    assert key is not None
    assert len(key) == 16
    int(key, 16)
    reordered_keys = {"function": {"parameters": {"type": "object"}, "name": "weather"}, "type": "function"}
    assert tools_key({"tools": [reordered_keys, clock], "model": "other"}) == key
    assert tools_key({"tools": [clock, weather]}) != key
    assert tools_key({"tools": [weather]}) != key


# --- CacheTracker ---------------------------------------------------------------------------------


def test_first_then_same_snapshot() -> None:
    tracker = CacheTracker()
    first = tracker.before_send(UP, SNAPSHOT, None)
    assert first == SendHistory(
        first_request=True,
        snapshot_seen=False,
        previous_commit=None,
        snapshot_changed=False,
        reusable_bytes=None,
        changed_at=None,
        tools_changed=False,
        reports_cache=False,
    )
    assert first.expectation() == "miss; first request to this upstream"
    again = tracker.before_send(UP, SNAPSHOT, None)
    assert again == replace(first, first_request=False, snapshot_seen=True)
    assert again.expectation() == "hit"


def test_new_commit_then_back_to_the_old_one(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "one\n" * 50, "b.txt": "two\n" * 50, "c/d.txt": "three\n" * 50})
    first_commit = repo.head()
    first = snap_repo(repo)
    repo.write({"c/d.txt": "three\n" * 49 + "four\n"})
    second_commit = repo.commit_all("edit d")
    second = snap_repo(repo)
    tracker = CacheTracker()

    tracker.before_send(UP, first, None)
    changed = tracker.before_send(UP, second, None)
    shared = naive_common_prefix(first.message_json, second.message_json)
    assert changed == SendHistory(
        first_request=False,
        snapshot_seen=False,
        previous_commit=first_commit,
        snapshot_changed=True,
        reusable_bytes=shared,
        changed_at="c/d.txt",
        tools_changed=False,
        reports_cache=False,
    )
    assert changed.expectation() == "miss; new commit"
    assert second.message_json[:shared].endswith(encoded("three\n" * 49))

    back = tracker.before_send(UP, first, None)
    assert back.snapshot_changed is True
    assert back.snapshot_seen is True
    assert back.previous_commit == second_commit
    assert back.reusable_bytes == shared
    assert back.changed_at == "c/d.txt"
    assert back.expectation() == "hit"

    same = tracker.before_send(UP, first, None)
    assert (same.snapshot_changed, same.previous_commit, same.reusable_bytes, same.changed_at) == (
        False,
        None,
        None,
        None,
    )


def test_changed_at_is_the_first_differing_file(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n", "m.txt": "m\n", "z.txt": "z\n"})
    base = snap_repo(repo)
    cases = [
        ({"m.txt": "M\n"}, "m.txt"),  # content changed at its first byte
        ({"b.txt": "new\n"}, "b.txt"),  # a file added in the middle
        ({"a.txt": "a\nmore\n"}, "a.txt"),  # grown at the end
    ]
    for files, expected in cases:
        other = make_repo({"a.txt": "a\n", "m.txt": "m\n", "z.txt": "z\n"} | files)
        tracker = CacheTracker()
        tracker.before_send(UP, base, None)
        sent = tracker.before_send(UP, snap_repo(other), None)
        assert sent.changed_at == expected, files


def test_changed_at_names_a_file_added_after_the_last_one(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n", "m.txt": "m\n"})
    old = snap_repo(repo)
    repo.write({"z.txt": "z\n"})
    repo.commit_all("add z")
    new = snap_repo(repo)
    tracker = CacheTracker()
    tracker.before_send(UP, old, None)
    sent = tracker.before_send(UP, new, None)
    assert sent.reusable_bytes == naive_common_prefix(old.message_json, new.message_json)
    assert sent.changed_at == "z.txt"


def test_changed_at_is_none_when_only_the_footer_differs(make_repo: MakeRepo) -> None:
    """Only a binary file changed: every file block is identical; the change is in the footer."""
    repo = make_repo({"a.txt": "a\n", "m.txt": "m\n", "logo.png": b"\x89PNG\0one"})
    old = snap_repo(repo)
    repo.write({"logo.png": b"\x89PNG\0two!"})
    repo.commit_all("new logo")
    new = snap_repo(repo)
    tracker = CacheTracker()
    tracker.before_send(UP, old, None)
    sent = tracker.before_send(UP, new, None)
    shared = naive_common_prefix(old.message_json, new.message_json)
    assert sent.reusable_bytes == shared
    assert shared > new.message_json.index(encoded("</file>\n<snapshot_info>\ncommit: "))
    assert sent.changed_at is None


def test_tools_changes_are_tracked_per_snapshot() -> None:
    other, _ = make_snapshot({"x.txt": "x\n"}, commit=COMMIT_B)
    tracker = CacheTracker()
    assert tracker.before_send(UP, SNAPSHOT, "k1").tools_changed is False
    assert tracker.before_send(UP, SNAPSHOT, "k1").tools_changed is False
    changed = tracker.before_send(UP, SNAPSHOT, "k2")
    assert changed.tools_changed is True
    assert changed.expectation() == "miss; tools changed"
    assert tracker.before_send(UP, SNAPSHOT, "k2").tools_changed is False
    assert tracker.before_send(UP, SNAPSHOT, None).tools_changed is True
    # A new snapshot is a miss for its own reason, whatever its tools.
    assert tracker.before_send(UP, other, "k3").tools_changed is False
    # Back to the first: compared with the tools last sent with it (None), not with other's.
    assert tracker.before_send(UP, SNAPSHOT, None).tools_changed is False
    assert tracker.before_send(UP, other, "k3").tools_changed is False


def test_upstreams_are_tracked_separately() -> None:
    other, _ = make_snapshot({"x.txt": "x\n"}, commit=COMMIT_B)
    tracker = CacheTracker()
    tracker.before_send("http://one", SNAPSHOT, None)
    tracker.before_send("http://one", SNAPSHOT, None)
    two = tracker.before_send("http://two", SNAPSHOT, None)
    assert two.first_request is True
    assert two.snapshot_seen is False
    tracker.before_send("http://two", other, "k")
    one = tracker.before_send("http://one", SNAPSHOT, None)
    assert (one.snapshot_changed, one.snapshot_seen, one.tools_changed) == (False, True, False)
    tracker.after_answer("http://two", usage(10, 0), classify(usage(10, 0), None, two, SNAPSHOT))
    assert tracker.before_send("http://one", SNAPSHOT, None).reports_cache is False
    assert tracker.before_send("http://two", other, "k").reports_cache is True


def test_after_answer_learns_that_the_upstream_reports_cache() -> None:
    tracker = CacheTracker()
    sent = tracker.before_send(UP, SNAPSHOT, None)
    without = usage(100, None)
    tracker.after_answer(UP, without, classify(without, None, sent, SNAPSHOT))
    assert tracker.before_send(UP, SNAPSHOT, None).reports_cache is False
    tracker.after_answer(UP, None, classify(None, None, sent, SNAPSHOT))
    assert tracker.before_send(UP, SNAPSHOT, None).reports_cache is False
    zero = usage(100, 0)
    tracker.after_answer(UP, zero, classify(zero, None, sent, SNAPSHOT))
    assert tracker.before_send(UP, SNAPSHOT, None).reports_cache is True
    tracker.after_answer(UP, without, classify(without, None, sent, SNAPSHOT))
    assert tracker.before_send(UP, SNAPSHOT, None).reports_cache is True  # learned once, kept


def test_after_answer_for_an_unknown_upstream_only_counts_the_verdict() -> None:
    tracker = CacheTracker()
    verdict = classify(usage(100, 90), None, history(), SNAPSHOT)
    tracker.after_answer("http://never-sent", usage(100, 90), verdict)
    assert tracker.recent_summary()["requests"] == 1
    assert tracker.before_send("http://never-sent", SNAPSHOT, None).reports_cache is False


def _verdict(kind: str) -> CacheVerdict:
    return CacheVerdict(kind, "", "", None, None, None)  # type: ignore[arg-type]


def test_recent_summary() -> None:
    tracker = CacheTracker()
    assert tracker.recent_summary() == {
        "requests": 0,
        "hit": 0,
        "partial": 0,
        "miss": 0,
        "unknown": 0,
        "hit_ratio": None,
    }
    for kind in ["unknown", "unknown"]:
        tracker.after_answer(UP, None, _verdict(kind))
    assert tracker.recent_summary()["hit_ratio"] is None
    for kind in ["hit", "hit", "miss", "partial", "hit", "hit", "hit"]:
        tracker.after_answer(UP, None, _verdict(kind))
    assert tracker.recent_summary() == {
        "requests": 9,
        "hit": 5,
        "partial": 1,
        "miss": 1,
        "unknown": 2,
        "hit_ratio": round(5 / 7, 4),
    }
    assert tracker.recent_summary()["hit_ratio"] == 0.7143


def test_recent_summary_keeps_only_the_last_window() -> None:
    assert RECENT_WINDOW == 100
    tracker = CacheTracker()
    for _ in range(30):
        tracker.after_answer(UP, None, _verdict("miss"))
    for _ in range(RECENT_WINDOW):
        tracker.after_answer(UP, None, _verdict("hit"))
    assert tracker.recent_summary() == {
        "requests": RECENT_WINDOW,
        "hit": RECENT_WINDOW,
        "partial": 0,
        "miss": 0,
        "unknown": 0,
        "hit_ratio": 1.0,
    }
    for _ in range(25):
        tracker.after_answer(UP, None, _verdict("miss"))
    summary = tracker.recent_summary()
    assert (summary["requests"], summary["hit"], summary["miss"], summary["hit_ratio"]) == (100, 75, 25, 0.75)


def test_old_snapshots_are_forgotten_after_the_limit() -> None:
    tracker = CacheTracker()
    snapshots = [make_snapshot({"f.txt": f"{i}\n"}, commit=f"{i:040x}")[0] for i in range(REMEMBERED_SNAPSHOTS + 1)]
    for snapshot in snapshots:
        tracker.before_send(UP, snapshot, None)
    assert tracker.before_send(UP, snapshots[1], None).snapshot_seen is True
    assert tracker.before_send(UP, snapshots[0], None).snapshot_seen is False


# --- path_at --------------------------------------------------------------------------------------

FILE_MARK_LENGTH = len(b'<file path=\\"')
ODD_FILES = {
    "README.md": "# Title\nsee <b>this</b> & that\n",
    "src/ünï/código.py": 'print("ünï")\n',
    'we"ird.txt': 'a "quoted" line\n',
    "new\nline.txt": "x\n",
    "back\\slash.txt": "\\n is not a newline\n",
    "tab\there.txt": "\ttabbed\n",
    "\x01ctl": "control\n",
    "emoji 🎉.txt": "🎉\n",
}
ODD_LINKS = {"link": "README.md", 'odd "link"\n': 'tar"get\\'}


def test_path_at_every_offset_inside_every_block() -> None:
    snapshot, entries = make_snapshot(ODD_FILES, symlinks=ODD_LINKS)
    ranges = block_ranges(snapshot, entries)
    assert {path for path, _, _ in ranges} == set(ODD_FILES) | set(ODD_LINKS)
    for path, start, end in ranges:
        for offset in range(start + FILE_MARK_LENGTH + 3, end):
            assert path_at(snapshot, offset) == path, (path, offset)


def test_path_at_the_first_bytes_of_a_block() -> None:
    """The block header's own bytes belong to the block, the '<' included."""
    snapshot, entries = make_snapshot({"a.txt": "a\n", "b.txt": "b\n"}, symlinks={"l": "a.txt"})
    for path, start, _ in block_ranges(snapshot, entries):
        found = [path_at(snapshot, offset) for offset in range(start, start + FILE_MARK_LENGTH + 3)]
        assert found == [path] * len(found), path


def test_path_at_in_the_preamble_is_none() -> None:
    snapshot, entries = make_snapshot({"a.txt": "a\n"})
    first_start = block_ranges(snapshot, entries)[0][1]
    assert first_start == len(MESSAGE_HEAD) + len(encoded(PREAMBLE))
    found = {path_at(snapshot, offset) for offset in range(first_start)}
    assert found == {None}


def test_path_at_in_the_footer_is_none() -> None:
    snapshot, entries = make_snapshot({"a.txt": "a\n", "z.txt": "z\n"})
    footer_start = block_ranges(snapshot, entries)[-1][2]
    found = {path_at(snapshot, offset) for offset in range(footer_start, snapshot.size)}
    assert found == {None}


def test_path_at_outside_the_message() -> None:
    snapshot, _ = make_snapshot({"a.txt": "a\n"})
    assert path_at(snapshot, -1) is None
    assert path_at(snapshot, snapshot.size) is None


def test_path_at_is_not_fooled_by_a_header_inside_a_file() -> None:
    """This very project's files contain '<file path="...">' lines (the preamble, the tests)."""
    body = 'PREAMBLE = """\n<file path="PATH">\nCONTENT\n</file>\n"""\n' + "more = 1\n" * 20
    snapshot, entries = make_snapshot({"docs.py": body, "zz.txt": "z\n"})
    (_, start, end), _ = block_ranges(snapshot, entries)
    inside = snapshot.message_json.index(encoded("more = 1"), start)
    assert inside < end
    assert path_at(snapshot, inside) == "docs.py"


def test_path_at_with_angle_brackets_in_the_path() -> None:
    snapshot, entries = make_snapshot({"x>y<z&.txt": "content\n"}, symlinks={"a>b": "c>d"})
    for path, start, end in block_ranges(snapshot, entries):
        assert path_at(snapshot, end - 3) == path
        assert path_at(snapshot, start + FILE_MARK_LENGTH + 5) == path


def test_path_at_with_a_symlink_target_that_looks_like_an_attribute() -> None:
    snapshot, entries = make_snapshot({}, symlinks={"link": "a target=b"})
    ((path, _, end),) = block_ranges(snapshot, entries)
    assert path == "link"
    assert path_at(snapshot, end - 3) == path


def test_path_at_in_a_real_snapshot_with_odd_names(make_repo: MakeRepo) -> None:
    repo = make_repo(ODD_FILES)
    os.symlink('tar"get\\', repo.path / 'odd "link"\n')
    repo.commit_all("link")
    snapshot = snap_repo(repo)
    for path in [*ODD_FILES, 'odd "link"\n']:
        header = encoded(f"<file path={json.dumps(path, ensure_ascii=False)}>\n")
        if path not in ODD_FILES:
            header = encoded(f"<symlink path={json.dumps(path, ensure_ascii=False)} target=")
        offset = snapshot.message_json.index(header) + len(header) + 1
        assert path_at(snapshot, offset) == path


# --- common_prefix_length -------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 2, 3, 8, 1 << 20])
def test_common_prefix_length_matches_a_naive_count(block: int) -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=64), st.binary(max_size=40), st.binary(max_size=40))
    def check(shared: bytes, tail_a: bytes, tail_b: bytes) -> None:
        a, b = shared + tail_a, shared + tail_b
        assert common_prefix_length(a, b) == naive_common_prefix(a, b)
        assert common_prefix_length(b, a) == naive_common_prefix(a, b)
        assert common_prefix_length(a, a) == len(a)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snapshot_module, "_COMPARE_BLOCK", block)
        check()


BLOCK = 1 << 20
BIG = random.Random(3).randbytes(3 * BLOCK + 17)


@pytest.mark.parametrize(
    "position", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 1, len(BIG) - 1]
)
def test_common_prefix_length_on_megabytes(position: int) -> None:
    changed = bytearray(BIG)
    changed[position] ^= 0x5A
    assert common_prefix_length(BIG, bytes(changed)) == position
    assert common_prefix_length(bytes(changed), BIG) == position
    # Also a difference after the first one: still the first counts.
    if position + 10 < len(BIG):
        changed[position + 10] ^= 0x01
        assert common_prefix_length(BIG, bytes(changed)) == position
    assert common_prefix_length(BIG, BIG[:position]) == position
    assert common_prefix_length(BIG[:position], BIG) == position


def test_common_prefix_length_of_equal_and_extended_inputs() -> None:
    assert common_prefix_length(BIG, bytes(BIG)) == len(BIG)
    assert common_prefix_length(BIG, BIG + b"more") == len(BIG)
    assert common_prefix_length(BIG[:BLOCK], BIG[:BLOCK]) == BLOCK
    assert common_prefix_length(b"", BIG) == 0
    assert common_prefix_length(b"", b"") == 0


# --- the append layout after a new commit ------------------------------------------------------------


def appended_pair() -> tuple[Snapshot, Snapshot]:
    base, _ = make_snapshot({"a.txt": "a\n" * 400, "b.txt": "b\n" * 400})
    old = with_history(
        base, COMMIT_A, [(COMMIT_A, f'<commit id="{COMMIT_A}">\n<message>\none\n</message>\n</commit>\n')]
    )
    block = f'<commit id="{COMMIT_B}">\n<message>\ntwo\n</message>\n' + "+x\n" * 40 + "</commit>\n"
    new = with_history(old, COMMIT_B, [(COMMIT_B, block)])
    return old, replace(new, base_commit=base.commit, tail_commits=2)


def test_append_layout_a_cache_that_reaches_the_new_history_block_is_a_hit() -> None:
    old, new = appended_pair()
    tracker = CacheTracker()
    tracker.before_send(UP, old, None)
    history = tracker.before_send(UP, new, None)
    assert history.snapshot_changed and history.changed_at == f"commit {COMMIT_B}"
    assert history.reusable_bytes == len(old.message_json) - 2
    tokens = SnapshotTokens(len(new.message_json) // 4, exact=True)
    reusable = (len(old.message_json) - 2) // 4
    share = len(old.message_json) / len(new.message_json)
    assert share < 0.95  # the new block is more than the exact tolerance and the estimate's 3%
    hit = classify(usage(tokens.count + 20, reusable - 1), tokens, history, new)
    assert (hit.verdict, hit.cause) == ("hit", "new commit")
    assert "only the new block was prefilled" in hit.detail
    assert hit.summary().endswith("(hit: new commit)")
    short = classify(usage(tokens.count + 20, reusable // 2), tokens, history, new)
    assert (short.verdict, short.cause) == ("partial", "new commit")


def test_a_llama_cpp_miss_over_an_identical_prefix_names_the_sliding_window_flag() -> None:
    old, _ = appended_pair()
    moved, _ = make_snapshot({"a.txt": "A\n" * 400, "b.txt": "b\n" * 400}, commit=COMMIT_B)
    tracker = CacheTracker()
    tracker.before_send(UP, old, None)
    history = tracker.before_send(UP, moved, None)
    assert (history.reusable_bytes or 0) / moved.size >= 0.05
    tokens = SnapshotTokens(len(moved.message_json) // 4, exact=True)
    llama_cpp = UpstreamUsage(tokens.count + 20, 0, tokens.count + 20, 900.0)  # timings: llama.cpp
    assert "--swa-full" in classify(llama_cpp, tokens, history, moved).detail
    vllm = UpstreamUsage(tokens.count + 20, 0)
    assert "--swa-full" not in classify(vllm, tokens, history, moved).detail  # vLLM has no such flag


def test_the_expectation_after_an_appended_commit_is_a_hit_and_after_a_moved_base_a_miss() -> None:
    old, new = appended_pair()
    tracker = CacheTracker()
    tracker.before_send(UP, old, None)
    appended = tracker.before_send(UP, new, None)
    assert appended.appended
    assert appended.expectation() == "hit; new commit appended to the cached snapshot"
    moved, _ = make_snapshot({"a.txt": "A\n" * 400, "b.txt": "b\n" * 400}, commit=COMMIT_B)
    elsewhere = tracker.before_send(UP, moved, None)
    assert not elsewhere.appended
    assert elsewhere.expectation() == "miss; new commit"


def test_a_moved_base_is_not_read_as_an_appended_block() -> None:
    old, _ = appended_pair()
    moved, _ = make_snapshot({"a.txt": "A\n" * 400, "b.txt": "b\n" * 400}, commit=COMMIT_B)
    tracker = CacheTracker()
    tracker.before_send(UP, old, None)
    history = tracker.before_send(UP, moved, None)
    tokens = SnapshotTokens(len(moved.message_json) // 4, exact=True)
    result = classify(usage(tokens.count, (history.reusable_bytes or 0) // 4), tokens, history, moved)
    assert result.verdict in ("partial", "miss") and result.cause == "new commit"
