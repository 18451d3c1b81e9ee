"""The build cache (BUILD_CACHE_DIR): what a restart reads back instead of reading the repository.

In-process with the proxy's own ContextProvider, git's own trace naming the processes a restart
starts; through a real mitmdump for the bytes the upstream receives after a restart; and the
directory's safety: private modes, a directory others may write refused, damaged entries rebuilt,
the size bound kept.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scout_diff_cache.context.buildcache import KINDS, BuildCache, UnsafeCacheDir
from scout_diff_cache.context.fit import WindowBudget
from scout_diff_cache.context.history import DEPTH_LOOKBACK, History, HistoryLimits
from scout_diff_cache.context.provider import ContextProvider, RepoContext
from scout_diff_cache.context.repobuilds import RepositoryBuilds
from scout_diff_cache.context.snapshot import SnapshotLimits
from scout_diff_cache.context.tokens import BYTE_BOUND
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.observe.tokenizer import TokenizerEndpoint, UpstreamTokenizer, probe_tokenizer
from scout_diff_cache.settings import ConfigError, Settings
from scout_diff_cache.wiring import build_cache_path, context_provider, open_build_cache
from support import Proxy, Repo, Upstream, git_processes

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
JSON = {"content-type": "application/json"}
COMMITS_AFTER_BASE = 5
SECRET = "ghp_" + "Zq7xW2mK9pL4vN8rT1yB6cH3jF5dS0gA2eU7"


def settings_for(repo: Repo, **values: object) -> Settings:
    return Settings.model_validate(
        {"git_repo_path": str(repo.path), "base_every_commits": 8, "max_tail_percent": 50, **values}
    )


def provider(settings: Settings, cache_dir: Path | None) -> ContextProvider:
    cache = BuildCache.open(cache_dir, 1 << 30) if cache_dir is not None else None
    return context_provider(settings, watch=False, build_cache=cache)


async def current(settings: Settings, cache_dir: Path | None, budget: WindowBudget | None = None) -> RepoContext:
    """A fresh provider's first context (a start), its cache writes finished after."""
    fresh = provider(settings, cache_dir)
    context = await fresh.current(budget)
    if fresh.builds is not None:
        fresh.builds.cache.flush()
    return context


@pytest.fixture
def history_repo(make_repo: Callable[..., Repo]) -> Repo:
    """A base at depth 8 and five commits after it (tail of 5 with BASE_EVERY_COMMITS=8)."""
    repo = make_repo(
        {"a.py": "print('a')\n", "b.md": "# b\n" * 4000, "key.py": f"TOKEN = '{SECRET}'\n", "blob.bin": b"\0\1" * 50}
    )
    for i in range(1, 8 + COMMITS_AFTER_BASE + 1):
        repo.write({"a.py": f"print({i})\n", f"m{i % 3}.py": f"value = {i}\n"})
        repo.commit_all(f"commit {i}")
    return repo


async def test_a_restart_reads_message_1_back_byte_for_byte_without_reading_the_repository(
    history_repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, cache_dir = settings_for(history_repo), tmp_path / "cache"
    first = await current(settings, cache_dir)
    assert first.snapshot.tail_commits == COMMITS_AFTER_BASE
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    again = await current(settings, cache_dir)
    monkeypatch.delenv("GIT_TRACE")
    started = git_processes(trace)
    assert again.snapshot == first.snapshot  # bytes, prefix key, regions, counts, base and tail
    assert again.snapshot.message_json == (await current(settings, None)).snapshot.message_json
    # Only HEAD, its recent chain and the working state were read: no tree, blob, patch or depth walk.
    for costly in ("ls-tree", "diff-tree", "--count", "cat-file"):
        assert not [p for p in started if costly in p], (costly, started)
    assert len(started) <= 6, started


async def test_a_changed_setting_or_repository_config_is_built_afresh_never_read_from_another(
    history_repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    first = await current(settings_for(history_repo), cache_dir)
    smaller = settings_for(history_repo, max_file_bytes=100)
    changed = await current(smaller, cache_dir)
    assert changed.snapshot.message_json == (await current(smaller, None)).snapshot.message_json
    assert changed.snapshot.message_json != first.snapshot.message_json  # b.md is over 100 bytes now

    redacting_less = settings_for(history_repo, redact_secrets=False)
    assert SECRET.encode() in (await current(redacting_less, cache_dir)).snapshot.message_json
    assert SECRET.encode() not in (await current(settings_for(history_repo), cache_dir)).snapshot.message_json

    history_repo.git("config", "branch.main.description", "not part of what is rendered")
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    await current(settings_for(history_repo), cache_dir)
    monkeypatch.delenv("GIT_TRACE")
    assert not any("cat-file" in p or "diff-tree" in p for p in git_processes(trace))  # still read back

    with (history_repo.path / ".git" / "config").open("a") as config:
        config.write('[diff "markdown"]\n\txfuncname = "^#.*$"\n')  # could change the tail's hunk headers
    trace.unlink()
    monkeypatch.setenv("GIT_TRACE", str(trace))
    after_edit = await current(settings_for(history_repo), cache_dir)
    monkeypatch.delenv("GIT_TRACE")
    assert any("diff-tree" in p for p in git_processes(trace))  # the blocks were made again
    assert any("cat-file" in p for p in git_processes(trace))  # and the base read again
    assert after_edit.snapshot.message_json == first.snapshot.message_json  # (this edit changes no patch)


async def test_a_damaged_entry_is_removed_and_built_again(
    history_repo: Repo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, cache_dir = settings_for(history_repo), tmp_path / "cache"
    first = await current(settings, cache_dir)
    (base,) = (cache_dir / "bases").iterdir()
    data = bytearray(base.read_bytes())
    data[-200] ^= 0x20  # one bit of one file's text: the length still matches, the checksum does not
    base.write_bytes(bytes(data))
    block = next((cache_dir / "blocks").iterdir())
    block.write_bytes(block.read_bytes()[:-10])  # cut short
    with caplog.at_level(logging.WARNING, logger="scout_diff_cache.context.buildcache"):
        again = await current(settings, cache_dir)
    assert again.snapshot.message_json == first.snapshot.message_json
    assert again.snapshot.prefix_key == first.snapshot.prefix_key
    assert sum("is damaged; removed, built again" in r.getMessage() for r in caplog.records) == 2
    # Both were written again whole: a third start reads them back without warnings.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scout_diff_cache.context.buildcache"):
        assert (await current(settings, cache_dir)).snapshot == first.snapshot
    assert not caplog.records


async def test_entries_are_private_and_a_directory_others_may_write_is_refused(
    history_repo: Repo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    await current(settings_for(history_repo), cache_dir)
    for folder in (cache_dir, *(cache_dir / kind for kind in KINDS)):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    entries = [path for kind in KINDS for path in (cache_dir / kind).iterdir()]
    assert entries and all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in entries)

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeCacheDir, match="may be written by group or others"):
        BuildCache.open(shared, 1 << 30)
    with pytest.raises(ConfigError, match=r"invalid setting build_cache_dir: .*chmod go-w"):
        open_build_cache(settings_for(history_repo, build_cache_dir=str(shared)))
    # The automatic directory, when unusable, is only warned about: the proxy runs without a cache.
    environ = {"XDG_CACHE_HOME": str(shared)}
    (shared / "scout-diff-cache").mkdir(mode=0o777)
    (shared / "scout-diff-cache").chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="scout_diff_cache.wiring"):
        assert open_build_cache(settings_for(history_repo), environ) is None
    assert "build cache off" in caplog.text
    assert open_build_cache(settings_for(history_repo, build_cache_dir="off")) is None


def test_after_many_commits_in_one_run_a_restart_still_finds_a_depth_and_keeps_few(
    make_repo: Callable[..., Repo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo({"n.txt": "0\n"})
    cache_dir = tmp_path / "cache"
    git_repo = GitRepo(str(repo.path))
    builds = RepositoryBuilds(BuildCache.open(cache_dir, 1 << 30), git_repo, limits_of(repo), False)
    running = History(git_repo, limits_of(repo), HistoryLimits(4, 100, False), builds)
    commits = DEPTH_LOOKBACK * 2 + 5
    for i in range(1, commits + 1):  # one process sees every commit, each from its parent's depth
        repo.write({"n.txt": f"{i}\n"})
        running.tail_for(repo.commit_all(f"commit {i}"))
    builds.cache.flush()
    assert len(list((cache_dir / "depths").iterdir())) <= commits // (DEPTH_LOOKBACK // 2) + 1
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    restarted = History(git_repo, limits_of(repo), HistoryLimits(4, 100, False), builds)
    tail = restarted.tail_for(repo.head())
    monkeypatch.delenv("GIT_TRACE")
    assert not [p for p in git_processes(trace) if "--count" in p]  # the depth came from one kept on disk
    assert tail == History(git_repo, limits_of(repo), HistoryLimits(4, 100, False)).tail_for(repo.head())


def limits_of(repo: Repo) -> SnapshotLimits:
    return context_provider(Settings.model_validate({"git_repo_path": str(repo.path)}), watch=False).snapshot_limits


def test_auto_is_under_xdg_cache_home_else_under_home() -> None:
    settings = Settings.model_validate({"git_repo_path": "."})
    assert build_cache_path(settings, {"XDG_CACHE_HOME": "/x/cache", "HOME": "/h"}) == Path("/x/cache/scout-diff-cache")
    assert build_cache_path(settings, {"HOME": "/h"}) == Path("/h/.cache/scout-diff-cache")
    named = Settings.model_validate({"git_repo_path": ".", "build_cache_dir": "~/scout"})
    assert build_cache_path(named, {}) == Path("~/scout").expanduser()


def test_past_its_size_the_least_recently_used_entries_go(tmp_path: Path) -> None:
    cache = BuildCache.open(tmp_path / "cache", 1 << 20)
    payload = b"x" * (300 << 10)
    for index in range(3):
        cache.write("blocks", f"k{index}", {}, payload)
        cache.flush()
    assert cache.read("blocks", "k0") is not None  # read: now the most recently used
    cache.write("blocks", "k3", {}, payload)
    cache.flush()
    kept = {path.name for path in (tmp_path / "cache" / "blocks").iterdir()}
    assert "k1" not in kept and {"k0", "k3"} <= kept
    assert sum(path.stat().st_size for path in (tmp_path / "cache" / "blocks").iterdir()) <= 1 << 20


async def test_a_shallow_clone_keeps_no_depth_and_a_fitted_base_is_kept_per_tokenizer(
    history_repo: Repo, upstream: Upstream, tmp_path: Path
) -> None:
    shallow_path = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "3", f"file://{history_repo.path}", str(shallow_path)], check=True)
    cache_dir = tmp_path / "cache"
    shallow = settings_for(Repo(shallow_path))
    first = await current(shallow, cache_dir)
    assert not list((cache_dir / "depths").iterdir())  # a shallow clone's depth counts what it has
    assert (await current(shallow, cache_dir)).snapshot == first.snapshot

    # The upstream's tokenizer as the proxy learns it (with its count of PROBE_TEXT): a plan made
    # with one model's tokenizer is never read back for another's.
    upstream.behaviour.engine = "vllm"  # a tokenizer of the fake vLLM's kind
    endpoint = TokenizerEndpoint(upstream.url, None, None, True)
    probe = probe_tokenizer(endpoint)
    assert probe is not None

    def exact(probe_tokens: int) -> WindowBudget:
        return WindowBudget(6000, UpstreamTokenizer(endpoint, probe.kind, probe_tokens))  # the files need more

    other_dir = tmp_path / "other"
    settings = settings_for(history_repo)
    fitted = await current(settings, other_dir, exact(probe.probe_tokens))
    fit = fitted.snapshot.fit
    assert fit is not None and fit.cut and fit.measure.startswith("exact") and fit.omitted
    for budget in (exact(probe.probe_tokens + 1), WindowBudget(6000, BYTE_BOUND)):
        await current(settings, other_dir, budget)
    assert len(list((other_dir / "bases").iterdir())) == 3
    assert (await current(settings, other_dir, exact(probe.probe_tokens))).snapshot == fitted.snapshot


def written_health(proxy: Proxy) -> dict[str, Any]:
    """/health's build_cache once the base's write (on the cache's own thread) has finished; 5 s at most."""
    deadline = time.monotonic() + 5
    while True:
        report: dict[str, Any] = proxy.get("/health").json()["build_cache"]
        if report["bases"]["written"] or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def test_a_restarted_proxy_sends_the_same_bytes_read_from_its_build_cache(
    history_repo: Repo, upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    env = {
        "GIT_REPO_PATH": str(history_repo.path),
        "BASE_EVERY_COMMITS": "8",
        "MAX_TAIL_PERCENT": "50",
        "BUILD_CACHE_DIR": str(tmp_path / "bc"),
    }
    upstream.behaviour.engine = "vllm"  # its /tokenize: message 1 is fitted by the exact count, as on vLLM
    upstream.behaviour.max_model_len = 200_000
    first = start_proxy(upstream.url, env)
    assert first.post("/v1/chat/completions", CHAT, JSON).status == 200
    before = upstream.chat_requests()[-1]
    first_health = written_health(first)
    assert first_health["dir"] == str(tmp_path / "bc")
    first.process.terminate()
    assert first.wait_exit() == 0
    assert "read from the build cache" not in first.log()
    assert first_health["bases"] == {"read": 0, "missed": 1, "written": 1}, first_health
    assert first_health["blocks"]["written"] == COMMITS_AFTER_BASE

    second = start_proxy(upstream.url, env)
    answer = second.post("/v1/chat/completions", CHAT, JSON)
    assert answer.status == 200
    after = upstream.chat_requests()[-1]
    assert after.body == before.body
    assert after.headers["x-scout-prefix-key"] == before.headers["x-scout-prefix-key"]
    assert "read from the build cache" in second.log()
    assert "token counts: exact" in second.log()
    health = second.get("/health").json()["build_cache"]
    assert health["bases"]["read"] == 1 and health["bases"]["written"] == 0, health
    assert health["blocks"] == {"read": COMMITS_AFTER_BASE, "missed": 0, "written": 0}, health
    assert os.listdir(tmp_path / "bc" / "bases")
