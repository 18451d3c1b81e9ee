"""Reliability under load: concurrency across a commit, a user's git racing us, signals, a memory soak.

Every request the upstream receives is checked by one oracle (``ContextOracle``): the snapshot's
files are exactly its base commit's tree (as ``git archive`` gives it), the base with the history
blocks applied in order is the tree of the last block's commit (append-only layout; with no blocks,
the base itself), that commit is the one the diff is against, and the result with the diff applied
(``git apply``) is a state the working tree really was in.
``test_the_oracle_rejects_inconsistent_pairings`` shows it catches a snapshot paired with the wrong
diff. The soak sends 1100 requests with a 4.5 MB snapshot (about
40 s); run with ``-s`` to see its RSS and latency figures. Everything listens on 127.0.0.1; every
process a test starts is stopped by it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from watchdog.events import FileClosedNoWriteEvent, FileOpenedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from scout_diff_cache.context.provider import ContextProvider
from scout_diff_cache.context.snapshot import APPEND_PREAMBLE, BASE_LINE_START, PREAMBLE, SnapshotLimits, build_snapshot
from scout_diff_cache.context.workdiff import DiffLimits, build_working_diff
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.git.watcher import ChangeMonitor
from support import (
    BIG_WINDOW,
    GIT_COMMIT_ENV,
    Proxy,
    Recorded,
    Repo,
    Upstream,
    generated_files,
    http_request,
    process_tree_rss,
)

CHAT = "/v1/chat/completions"
MODEL = "llama-4-scout"
Files = dict[str, bytes]


# --- the consistency oracle ------------------------------------------------------------------------

_FILE_BLOCK = re.compile(r'<file path=("(?:[^"\\]|\\.)*")>\n(.*?)</file>\n', re.DOTALL)
_SNAPSHOT_COMMIT = re.compile(r"^<snapshot_info>\ncommit: ([0-9a-f]{40,64})\n", re.MULTILINE)
_HISTORY_BLOCK = re.compile(
    r'^<commit id="([0-9a-f]{40,64})"(?: parent="[0-9a-f]+")?>\n<message>\n.*?</message>\n(.*?)</commit>\n',
    re.DOTALL | re.MULTILINE,
)
_DIFF_COMMIT = re.compile(r"against commit ([0-9a-f]{40,64})")


def snapshot_commit(snapshot: str) -> str:
    found = _SNAPSHOT_COMMIT.findall(snapshot)
    assert len(found) == 1, f"no single commit line in the snapshot footer: {snapshot[-300:]!r}"
    return str(found[0])


def diff_commit(diff: str) -> str:
    found = _DIFF_COMMIT.search(diff.partition("\n")[0])
    assert found, f"the diff names no commit: {diff[:200]!r}"
    return found.group(1)


def snapshot_files(snapshot: str) -> Files:
    """The files of a snapshot, as they would be on disk (the generated repos end every file with a newline)."""
    if snapshot.startswith(PREAMBLE):
        body = snapshot.removeprefix(PREAMBLE)
    else:  # the append layout: its first line names the base
        first_line, _, rest = snapshot.partition("\n")
        assert first_line.startswith(BASE_LINE_START) and rest.startswith(APPEND_PREAMBLE)
        body = rest.removeprefix(APPEND_PREAMBLE)
    body = body.partition("<snapshot_info>\n")[0]
    return {json.loads(path): content.encode("utf-8") for path, content in _FILE_BLOCK.findall(body)}


def history_blocks(snapshot: str) -> list[tuple[str, str]]:
    """(commit, patch) of each history block after the snapshot footer, oldest first."""
    history = snapshot.partition("</snapshot_info>\n")[2]
    blocks = _HISTORY_BLOCK.findall(history)
    assert "".join(f"{c}" for c, _ in blocks) == "".join(re.findall(r'^<commit id="([0-9a-f]+)"', history, re.M))
    for _, patch in blocks:
        assert "<left_out>" not in patch, "the test repositories have nothing to leave out of a block"
    return blocks


def diff_patch(diff: str) -> str:
    """The git patch inside the diff message ('' for a clean tree)."""
    if diff.startswith("The working tree is clean"):
        return ""
    start = diff.find("diff --git ")
    end = diff.rfind("<diff_info>\n")
    assert start >= 0 and end > start, f"no patch in the diff message: {diff[:300]!r}"
    return diff[start:end]


def read_tree(root: Path) -> Files:
    """Every file under ``root`` except ``.git``, by slash-separated relative path."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            full = Path(dirpath) / name
            files[full.relative_to(root).as_posix()] = full.read_bytes()
    return files


def apply_patch(files: Files, patch: str, scratch: Path) -> Files:
    """``files`` with ``patch`` applied by ``git apply`` in a scratch directory outside any repository."""
    if not patch:
        return dict(files)
    scratch.mkdir(parents=True)
    for name, content in files.items():
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    proc = subprocess.run(
        ["git", "apply", "--whitespace=nowarn", "-"],
        cwd=scratch,
        input=patch.encode("utf-8"),
        capture_output=True,
        env={**os.environ, "GIT_CEILING_DIRECTORIES": str(scratch.parent)},
        check=False,
    )
    assert proc.returncode == 0, f"the diff does not apply to the snapshot: {proc.stderr.decode(errors='replace')}"
    return read_tree(scratch)


@dataclass
class ContextOracle:
    """Checks (snapshot, diff) pairs against the repository; results are cached per distinct pair."""

    repo: Repo
    scratch: Path
    _trees: dict[str, Files] = field(default_factory=dict)
    _checked: dict[str, tuple[str, Files]] = field(default_factory=dict)

    def tree(self, commit: str) -> Files:
        if commit not in self._trees:
            archive = subprocess.run(
                ["git", "archive", "--format=tar", commit], cwd=self.repo.path, capture_output=True, check=True
            ).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                self._trees[commit] = {
                    m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers()
                    if m.isfile()
                }
        return self._trees[commit]

    def check(self, snapshot: str, diff: str) -> tuple[str, Files]:
        """(commit, working tree the pair describes); AssertionError if the pair is inconsistent."""
        key = hashlib.sha256(snapshot.encode() + b"\0" + diff.encode()).hexdigest()
        if key not in self._checked:
            commit = snapshot_commit(snapshot)
            files = snapshot_files(snapshot)
            assert files == self.tree(commit), f"the snapshot is not the tree of {commit[:12]}"
            for index, (commit, patch) in enumerate(history_blocks(snapshot)):
                files = apply_patch(files, patch, self.scratch / f"{key}-history{index}")
                assert files == self.tree(commit), f"base + history is not the tree of {commit[:12]}"
            against = diff_commit(diff)
            assert against == commit, f"snapshot of {commit[:12]} paired with a diff against {against[:12]}"
            self._checked[key] = (commit, apply_patch(files, diff_patch(diff), self.scratch / key))
        return self._checked[key]

    def check_record(self, record: Recorded) -> tuple[str, Files]:
        messages = record.json()["messages"]
        assert [m["role"] for m in messages[:2]] == ["system", "system"], messages[:2]
        return self.check(messages[0]["content"], messages[1]["content"])


def state_index(states: list[Files], worktree: Files) -> int:
    for index, state in enumerate(states):
        if state == worktree:
            return index
    raise AssertionError(f"snapshot + diff is no state the working tree was in: {sorted(worktree)[:10]}")


# --- helpers ------------------------------------------------------------------------------------


def chat_body(content: str = "hi") -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode()


def post_chat(proxy: Proxy, content: str = "hi") -> tuple[int, float]:
    started = time.perf_counter()
    result = http_request("POST", proxy.base_url + CHAT, chat_body(content), {"content-type": "application/json"})
    return result.status, time.perf_counter() - started


def openai_client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="client-key", max_retries=0, timeout=60)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def make_provider(repo: Repo) -> ContextProvider:
    git_repo = GitRepo(str(repo.path))
    monitor = ChangeMonitor(git_repo.toplevel, [git_repo.git_dir, git_repo.common_dir])
    monitor.start()
    path_filter = PathFilter.build((), True)
    return ContextProvider(
        git_repo, monitor, SnapshotLimits(100_000, 50_000_000, path_filter), DiffLimits(100_000, 1_000_000, path_filter)
    )


def small_repo_files(count: int = 300) -> dict[str, str | bytes]:
    files: dict[str, str | bytes] = {f"src/mod{i:03d}.py": f"# module {i}\n" + "x = 1\n" * 40 for i in range(count)}
    files["app.py"] = "VERSION = 1\n"
    return files


# --- the oracle itself ----------------------------------------------------------------------------


def test_the_oracle_rejects_inconsistent_pairings(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    repo = make_repo(small_repo_files(20))
    old = repo.head()
    repo.write({"app.py": "VERSION = 2\n", "added.py": "NEW = True\n"})
    worktree = read_tree(repo.path)
    git_repo = GitRepo(str(repo.path))
    path_filter = PathFilter.build((), True)
    snapshot_limits = SnapshotLimits(100_000, 10_000_000, path_filter)
    diff_limits = DiffLimits(100_000, 1_000_000, path_filter)
    old_snapshot = build_snapshot(git_repo, old, snapshot_limits).text
    old_diff = build_working_diff(git_repo, old, diff_limits).text
    new = repo.commit_all("second")
    new_snapshot = build_snapshot(git_repo, new, snapshot_limits).text
    new_diff = build_working_diff(git_repo, new, diff_limits).text
    assert "VERSION = 2" in old_diff and "added.py" in old_diff and "clean" in new_diff
    oracle = ContextOracle(repo, tmp_path / "oracle")

    # the two real states pass, and both describe the working tree
    assert oracle.check(old_snapshot, old_diff) == (old, worktree)
    assert oracle.check(new_snapshot, new_diff) == (new, worktree)

    def rejected(snapshot: str, diff: str) -> str:
        with pytest.raises(AssertionError) as caught:
            oracle.check(snapshot, diff)
        return str(caught.value)

    # a snapshot with a diff of the other commit
    assert "paired with a diff against" in rejected(old_snapshot, new_diff)
    assert "paired with a diff against" in rejected(new_snapshot, old_diff)
    # the same, with the diff's commit line forged to match: caught by the content
    _, described = oracle.check(old_snapshot, new_diff.replace(new, old))
    assert described == oracle.tree(old) != worktree
    with pytest.raises(AssertionError, match="no state the working tree was in"):
        state_index([worktree], described)
    assert "does not apply" in rejected(new_snapshot, old_diff.replace(old, new))
    # a snapshot whose content is not its commit's tree
    assert "is not the tree" in rejected(old_snapshot.replace("VERSION = 1", "VERSION = 2"), old_diff)
    assert "is not the tree" in rejected(new_snapshot.replace(new, old), old_diff)


# --- concurrency across a commit -------------------------------------------------------------------


def test_32_concurrent_clients_across_a_commit_get_consistent_context_and_one_build_per_commit(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """32 clients (the openai SDK) send requests in a loop; a commit lands while they run.

    Before it: snapshot = the old commit, diff = the edit and the new file. After it: snapshot =
    the new commit, diff clean. Both describe the same working tree, so every request must
    describe exactly that tree, from one of the two commits, and each commit is built once.
    """
    repo = make_repo(small_repo_files())
    old = repo.head()
    repo.write({"app.py": "VERSION = 2\n", "added.py": "NEW = True\n"})
    worktree = read_tree(repo.path)
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    clients = 32
    start = threading.Barrier(clients + 1)
    stop = threading.Event()
    failures: list[str] = []
    replies = [0] * clients

    def client_loop(index: int) -> None:
        client = openai_client(proxy)
        start.wait(timeout=30)
        while not stop.is_set():
            try:
                reply = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"client {index}"}]
                )
                assert reply.choices[0].message.content == "ok"
                replies[index] += 1
            except Exception as e:  # recorded and reported below: a thread cannot fail the test
                failures.append(f"client {index}: {type(e).__name__}: {e}")
                return

    def served_with(commit: str) -> int:
        marker = f"against commit {commit}".encode()  # the diff message names the commit in either layout
        return sum(marker in r.body for r in upstream.chat_requests())

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop, i) for i in range(clients)]
        try:
            start.wait(timeout=30)
            wait_until(lambda: served_with(old) >= clients or bool(failures), 60, "requests on the old commit")
            new = repo.commit_all("commit landing under load")
            wait_until(lambda: served_with(new) >= clients or bool(failures), 60, "requests on the new commit")
        finally:
            stop.set()
            for future in futures:
                future.result(timeout=60)

    assert not failures, failures[:5]
    records = upstream.chat_requests()
    assert len(records) == sum(replies)
    oracle = ContextOracle(repo, tmp_path / "oracle")
    served: dict[str, int] = {}
    for record in records:
        commit, described = oracle.check_record(record)
        assert described == worktree, f"a request on {commit[:12]} describes another working tree"
        served[commit] = served.get(commit, 0) + 1
    assert set(served) == {old, new}, served
    health = proxy.get("/health").json()
    assert health["head"] == new
    assert health["snapshot_builds"] == len(served) == 2, (health, served)
    print(f"\nconcurrency: {len(records)} requests from {clients} clients, per commit {served}")


async def test_provider_32_concurrent_callers_across_a_commit(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    """The same, in process: 32 tasks call ContextProvider.current() in a loop while a commit lands."""
    repo = make_repo(small_repo_files())
    old = repo.head()
    repo.write({"app.py": "VERSION = 2\n", "added.py": "NEW = True\n"})
    worktree = read_tree(repo.path)
    provider = make_provider(repo)
    results: list[tuple[str, str]] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            context = await provider.current()
            results.append((context.snapshot.text, context.diff.text))
            await asyncio.sleep(0.001)

    def served_with(commit: str) -> int:
        return sum(f"commit: {commit}\n" in snapshot for snapshot, _ in results)

    tasks = [asyncio.create_task(caller()) for _ in range(32)]

    async def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            for task in tasks:
                if task.done():
                    task.result()  # a caller failed: raise its error here
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)

    try:
        await until(lambda: served_with(old) >= 64)
        new = await asyncio.to_thread(repo.commit_all, "commit landing under load")
        await until(lambda: served_with(new) >= 64)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        provider.monitor.stop()

    oracle = ContextOracle(repo, tmp_path / "oracle")
    commits = set()
    for snapshot, diff in set(results):
        commit, described = oracle.check(snapshot, diff)
        assert described == worktree
        commits.add(commit)
    assert commits == {old, new}
    assert provider.snapshot_builds == 2


# --- a user's git racing the proxy -----------------------------------------------------------------


class GitDirEvents(FileSystemEventHandler):
    """Every inotify event under a .git directory that is not a plain read (open, close without write)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[str] = []

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, (FileOpenedEvent, FileClosedNoWriteEvent)):
            return
        with self._lock:
            self._events.append(f"{event.event_type} {os.fsdecode(event.src_path)} {os.fsdecode(event.dest_path)}")

    def take(self) -> list[str]:
        with self._lock:
            events, self._events = self._events, []
        return events


@pytest.fixture
def git_dir_events(tmp_path: Path) -> Iterator[Callable[[Path], GitDirEvents]]:
    observers = []

    def watch(git_dir: Path) -> GitDirEvents:
        handler = GitDirEvents()
        observer = Observer()
        observer.schedule(handler, str(git_dir), recursive=True)
        observer.start()
        observers.append(observer)
        return handler

    yield watch
    for observer in observers:
        observer.stop()
        observer.join(timeout=5)


def settle_events(events: GitDirEvents) -> list[str]:
    time.sleep(0.3)  # inotify delivery is asynchronous
    return events.take()


def test_a_users_index_lock_neither_blocks_us_nor_is_touched_and_we_never_write_under_git(
    make_repo: Callable[..., Repo],
    upstream: Upstream,
    start_proxy: Callable[..., Proxy],
    git_dir_events: Callable[[Path], GitDirEvents],
) -> None:
    repo = make_repo({**small_repo_files(50), "notes.txt": "start\n"})
    git_dir = repo.path / ".git"
    lock = git_dir / "index.lock"
    lock.write_bytes(b"held by the user's git commit\n")  # as if a `git commit` were waiting in an editor
    os.utime(lock, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    lock_before = (lock.read_bytes(), lock.stat().st_mtime_ns, lock.stat().st_ino)
    fingerprint = {k: v for k, v in repo.git_dir_fingerprint().items() if k != "index.lock"}
    events = git_dir_events(git_dir)

    def serve_edits(rounds: int, tag: str) -> list[float]:
        """Edit the work tree, then ask until the upstream gets a diff with the edit (a fresh git read)."""
        latencies = []
        for index in range(rounds):
            marker = f"{tag} edit {index}"
            repo.write({"notes.txt": marker + "\n", f"untracked/{tag}{index}.txt": "new\n"})
            deadline = time.monotonic() + 10
            while True:
                status, seconds = post_chat(proxy, marker)
                assert status == 200, proxy.log()[-3000:]
                latencies.append(seconds)
                diff = upstream.chat_requests()[-1].json()["messages"][1]["content"]
                if f"+{marker}" in diff and f"untracked/{tag}{index}.txt" in diff:
                    break
                assert time.monotonic() < deadline, f"the diff never showed {marker!r}"
                time.sleep(0.02)
        return latencies

    # Phase 1: the user's lock is held from before the proxy starts (startup, first build, re-reads).
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    latencies = serve_edits(20, "locked")
    assert proxy.get("/health").json()["snapshot_builds"] == 1
    assert max(latencies) < 5, f"a request took {max(latencies):.1f} s with the user's index.lock held"
    assert settle_events(events) == [], "something under .git was written while serving"
    assert (lock.read_bytes(), lock.stat().st_mtime_ns, lock.stat().st_ino) == lock_before
    assert {k: v for k, v in repo.git_dir_fingerprint().items() if k != "index.lock"} == fingerprint

    # Phase 2: the user's git is done; inotify sees any index.lock (or anything else) we would create.
    lock.unlink()
    settle_events(events)
    fingerprint = repo.git_dir_fingerprint()
    latencies = serve_edits(20, "unlocked")
    assert max(latencies) < 5
    assert settle_events(events) == [], "something under .git was written while serving"
    assert not lock.exists()
    assert repo.git_dir_fingerprint() == fingerprint
    # the user's own git works as usual after all this
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "user commit")


def test_a_users_commits_in_a_loop_while_requests_are_served(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """A user edits and commits in a loop (with real `git add` and `git commit`) while 8 clients send requests.

    Each write lands atomically (rename), so the working tree goes through a known list of states.
    Every request must describe one of them, no older than its snapshot's commit (a `git add`
    landing between our reads of the index must not tear the diff), and every git command of the
    user must succeed.
    """
    files = {**small_repo_files(100), "counter.txt": "counter 0\n", "added/keep.txt": "keep\n"}
    repo = make_repo(files)
    states: list[Files] = [read_tree(repo.path)]
    commit_state = {repo.head(): 0}
    staging = tmp_path / "staging"
    staging.mkdir()
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    stop = threading.Event()
    failures: list[str] = []
    user_errors: list[str] = []

    def atomic_write(name: str, content: str) -> None:
        temporary = staging / "next"
        temporary.write_text(content)
        os.replace(temporary, repo.path / name)
        states.append({**states[-1], name: content.encode()})

    def user_git(*args: str) -> None:
        proc = subprocess.run(
            ["git", *args], cwd=repo.path, env={**os.environ, **GIT_COMMIT_ENV}, capture_output=True, check=False
        )
        if proc.returncode != 0 or proc.stderr:
            user_errors.append(f"git {' '.join(args)}: {proc.returncode} {proc.stderr.decode(errors='replace')}")

    def user_loop() -> None:
        for index in range(1, 16):
            # One write per commit: a read of several files cannot mix two writes, as a `git add`
            # (an index update, which makes the diff re-read) lies between any two of them.
            if index % 2:
                atomic_write("counter.txt", f"counter {index}\n")
            else:
                atomic_write(f"added/file{index}.txt", f"added {index}\n")
            time.sleep(0.08)
            user_git("add", "-A")
            user_git("commit", "-q", "-m", f"commit {index}")
            commit_state[repo.head()] = len(states) - 1
            time.sleep(0.12)

    def client_loop(index: int) -> None:
        while not stop.is_set():
            status, _ = post_chat(proxy, f"client {index}")
            if status != 200:
                failures.append(f"client {index}: HTTP {status}")
                return

    with ThreadPoolExecutor(9) as pool:
        clients = [pool.submit(client_loop, i) for i in range(8)]
        try:
            pool.submit(user_loop).result(timeout=120)
        finally:
            stop.set()
            for future in clients:
                future.result(timeout=60)
    health = proxy.get("/health").json()

    assert not user_errors, user_errors
    assert not failures, failures[:5]
    assert health["head"] == repo.head()
    oracle = ContextOracle(repo, tmp_path / "oracle")
    served: dict[str, int] = {}
    for record in upstream.chat_requests():
        commit, described = oracle.check_record(record)
        assert commit in commit_state, f"{commit[:12]} is no commit of the user's"
        assert state_index(states, described) >= commit_state[commit], "a diff older than its snapshot"
        served[commit] = served.get(commit, 0) + 1
    distinct = set(served) | {health["head"]}
    assert health["snapshot_builds"] == len(distinct), (health["snapshot_builds"], len(distinct))
    assert len(served) >= 3, f"too few commits were served to test anything: {served}"
    print(f"\ncommit loop: {sum(served.values())} requests over {len(served)} of {len(commit_state)} commits")


def test_sigterm_stops_mitmdump_during_a_burst_of_reads_in_the_repository(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """An IDE indexing or a `grep -r` must not make the proxy deaf to SIGTERM (docker stop) or Ctrl-C.

    Each read in the work tree used to be an inotify event that watchdog logged and mitmproxy
    forwarded to its event loop with one wake-up byte; the wake-up pipe filled and the SIGTERM's
    byte was lost.
    """
    repo = make_repo(generated_files(300, 200))
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    assert post_chat(proxy)[0] == 200
    paths = [p for p in repo.path.rglob("*") if p.is_file()]
    stop = threading.Event()

    def read_all() -> None:
        while not stop.is_set():
            for path in paths:
                path.read_bytes()

    readers = [threading.Thread(target=read_all, name=f"reader{i}") for i in range(2)]
    for reader in readers:
        reader.start()
    try:
        time.sleep(1)
        started = time.monotonic()
        proxy.process.terminate()
        try:
            proxy.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("mitmdump ignored SIGTERM during a burst of reads in the repository")
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=10)


# --- soak: memory stays flat over 1000 requests with a multi-megabyte snapshot -----------------------

SOAK_FILES = 400
SOAK_FILE_BYTES = 11_000  # about 4.5 MB of snapshot
SOAK_WARMUP = 100
SOAK_REQUESTS = 1000
SOAK_CLIENTS = 4
SOAK_SAMPLE_EVERY = 20
MAX_RSS_RATIO = 1.25


def test_soak_1000_requests_with_a_multi_megabyte_snapshot_keep_rss_flat(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """RSS of mitmdump (and any children) over the last 100 of 1000 requests stays within 1.25x of the warm-up's.

    Each request carries the whole snapshot upstream, so anything kept per request (a flow, a body,
    a copy) shows up as hundreds of megabytes. RSS is sampled every 20 requests; both figures are
    the highest sample of their stretch (the warm-up's 100 requests, the last 100), so the garbage
    a healthy process holds between collections counts on both sides. The upstream's records are
    checked and dropped as they come, so the test process does not hold gigabytes either.
    """
    repo = make_repo(generated_files(SOAK_FILES, SOAK_FILE_BYTES))
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path), "MAX_CONTEXT_TOKENS": BIG_WINDOW})
    health = proxy.get("/health").json()
    snapshot_bytes = health["snapshot"]["bytes"]
    assert snapshot_bytes > 4_000_000 and health["snapshot"]["files"] == SOAK_FILES, health
    upstream.recorded.clear()
    body_sizes: set[int] = set()
    latencies: list[float] = []
    samples: list[int] = []

    def batch(pool: ThreadPoolExecutor, count: int) -> None:
        results = list(pool.map(lambda i: post_chat(proxy, f"request {i % 7}"), range(count)))
        assert [status for status, _ in results] == [200] * count
        latencies.extend(seconds for _, seconds in results)
        records = upstream.chat_requests()
        assert len(records) == count
        body_sizes.update(len(r.body) for r in records)  # the client content has one length
        assert len(body_sizes) == 1 and min(body_sizes) > snapshot_bytes, "every body carries the snapshot"
        upstream.recorded.clear()
        samples.append(process_tree_rss(proxy.process.pid))

    started = time.monotonic()
    with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
        for _ in range((SOAK_WARMUP + SOAK_REQUESTS) // SOAK_SAMPLE_EVERY):
            batch(pool, SOAK_SAMPLE_EVERY)
    elapsed = time.monotonic() - started
    per_100 = 100 // SOAK_SAMPLE_EVERY
    warm = max(samples[:per_100])
    final = max(samples[-per_100:])
    latencies.sort()
    report = (
        f"soak: snapshot {snapshot_bytes / 1e6:.1f} MB, {SOAK_WARMUP} + {SOAK_REQUESTS} requests in {elapsed:.1f} s; "
        f"RSS after warm-up {warm / 1e6:.0f} MB, after {SOAK_REQUESTS} more {final / 1e6:.0f} MB, "
        f"ratio {final / warm:.2f} (limit {MAX_RSS_RATIO}); RSS every 100 requests: "
        f"{[round(s / 1e6) for s in samples[per_100 - 1 :: per_100]]} MB; "
        f"latency median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
        f"p95 {latencies[int(len(latencies) * 0.95)] * 1000:.0f} ms"
    )
    print("\n" + report)
    assert proxy.get("/health").json()["snapshot_builds"] == 1
    assert final <= MAX_RSS_RATIO * warm, report
