"""The append-only layout (history.py): base snapshot of commit B + one block per commit after it.

The core promise is checked independently of the code under test: B's files are read with git
(ls-tree + cat-file), every block's patch is applied in order with ``git apply`` in a plain
directory (or, with full_files, every block's files are written over B's), and the result must
be HEAD's tree byte for byte (content, executable bit, symlink targets).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scout_diff_cache.context import provider as context_module
from scout_diff_cache.context.fit import WindowBudget
from scout_diff_cache.context.framing import MESSAGE_END, MESSAGE_HEAD
from scout_diff_cache.context.history import History, HistoryLimits, Tail
from scout_diff_cache.context.provider import ContextProvider
from scout_diff_cache.context.snapshot import (
    PREAMBLE,
    Snapshot,
    SnapshotLimits,
    append_preamble,
    build_snapshot,
    path_at,
    with_history,
)
from scout_diff_cache.context.workdiff import DiffLimits
from scout_diff_cache.git.commits import first_parent_depth
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.git.watcher import ChangeMonitor
from scout_diff_cache.observe.metrics import ProxyMetrics
from support import GIT_COMMIT_ENV, Repo, git_processes

NEVER_HALVE = 10**9  # a max_tail_percent no tail reaches
FILTER = PathFilter.build((), True)  # the default exclusions: .env, *.key, id_rsa, lock files, ...
EXCLUDED_TITLE = "changed files excluded by path pattern"


def limits(max_file_bytes: int = 100_000, max_snapshot_bytes: int = 10_000_000) -> SnapshotLimits:
    return SnapshotLimits(max_file_bytes, max_snapshot_bytes, FILTER)


# --- git, independently of the code under test ------------------------------------------------------


def git(path: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> bytes:
    proc = subprocess.run(
        ["git", *args],
        cwd=path,
        env={**os.environ, **GIT_COMMIT_ENV, **(env or {})},
        input=stdin,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout


def chain_of(path: Path, head: str) -> list[str]:
    """HEAD's first-parent chain, root first."""
    return git(path, "rev-list", "--first-parent", "--reverse", head, "--").decode().split()


def first_parent(path: Path, commit: str) -> str | None:
    parents = git(path, "log", "-1", "--format=%P", commit, "--").decode().split()
    return parents[0] if parents else None


Tree = dict[bytes, tuple[str, bytes]]  # path -> (git mode, content or symlink target)


def tree_files(path: Path, commit: str) -> Tree:
    """Every blob of the commit's tree (submodules left out), read with ls-tree + cat-file."""
    entries = []
    for record in git(path, "ls-tree", "-r", "-z", "--full-tree", commit).split(b"\0"):
        if record:
            meta, _, name = record.partition(b"\t")
            mode, kind, oid = meta.decode().split()
            if kind == "blob":
                entries.append((name, mode, oid))
    out = git(path, "cat-file", "--batch", stdin=b"".join(oid.encode() + b"\n" for _, _, oid in entries))
    files: Tree = {}
    position = 0
    for name, mode, _ in entries:
        end = out.index(b"\n", position)
        size = int(out[position:end].split()[2])
        files[name] = (mode, out[end + 1 : end + 1 + size])
        position = end + 1 + size + 1
    return files


def materialize(files: Tree, directory: Path) -> None:
    for name, (mode, data) in files.items():
        target = Path(os.fsdecode(os.path.join(os.fsencode(directory), name)))
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == "120000":
            os.symlink(data, target)
        else:
            target.write_bytes(data)
            target.chmod(0o755 if mode == "100755" else 0o644)


def read_directory(directory: Path) -> Tree:
    root = os.fsencode(directory)
    files: Tree = {}
    for top, dirs, names in os.walk(root):
        for name in [*names, *(d for d in dirs if os.path.islink(os.path.join(top, d)))]:
            full = os.path.join(top, name)
            relative = os.path.relpath(full, root)
            if os.path.islink(full):
                files[relative] = ("120000", os.readlink(full))
            else:
                executable = os.stat(full).st_mode & stat.S_IXUSR
                with open(full, "rb") as handle:
                    files[relative] = ("100755" if executable else "100644", handle.read())
    return files


def git_apply(directory: Path, patch: str) -> None:
    """Apply a patch in a plain directory (no repository), as ``patch -p1`` would."""
    proc = subprocess.run(
        ["git", "apply", "--whitespace=nowarn", "-"],
        cwd=directory,
        env={**os.environ, "GIT_CEILING_DIRECTORIES": str(directory.parent)},
        input=patch.encode("utf-8"),
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, f"git apply failed: {proc.stderr.decode(errors='replace')}\n{patch}"


# --- the rendered layout --------------------------------------------------------------------------


@dataclass
class Rendered:
    head: str
    tail: Tail
    base: Snapshot
    snapshot: Snapshot

    @property
    def tail_text(self) -> str:
        assert self.snapshot.text.startswith(self.base.text)
        return self.snapshot.text[len(self.base.text) :]


def render(history: History, head: str) -> Rendered:
    """Message 1 for ``head``, composed as ContextProvider._with_history does."""
    tail = history.tail_for(head)
    base = build_snapshot(history.repo, tail.base, history.snapshot_limits, append_preamble(tail.base))
    pairs = list(zip(tail.commits, tail.blocks, strict=True))
    snapshot = with_history(base, head, pairs) if pairs else base
    return Rendered(head, tail, base, snapshot)


BLOCK = re.compile(
    r'<commit id="([0-9a-f]+)"(?: parent="([0-9a-f]+)")?>\n<message>\n(.*?)</message>\n'
    r"(.*?)(?:<left_out>\n(.*?)</left_out>\n)?</commit>\n",
    re.DOTALL,
)


@dataclass
class Block:
    commit: str
    parent: str | None
    message: str
    body: str
    left_out: dict[str, list[bytes]] = field(default_factory=dict)  # title (up to " (") -> paths

    def listed(self, title: str) -> list[bytes]:
        return self.left_out.get(title, [])


def listed_path(item: str) -> bytes:
    return (json.loads(item) if item.startswith('"') else item).encode("utf-8")


def parse_blocks(text: str) -> list[Block]:
    blocks = []
    position = 0
    while position < len(text):
        match = BLOCK.match(text, position)
        assert match, f"not a commit block at {position}: {text[position : position + 300]!r}"
        left_out: dict[str, list[bytes]] = {}
        title = ""
        for line in (match.group(5) or "").splitlines():
            if line.startswith("  "):
                left_out[title].append(listed_path(line[2:]))
            else:
                title = line.rsplit(" (", 1)[0]
                left_out[title] = []
        blocks.append(Block(match.group(1), match.group(2), match.group(3), match.group(4), left_out))
        position = match.end()
    return blocks


def file_sections(body: str) -> list[str]:
    """A block's patch, split per file at its ``diff --git`` lines."""
    starts = [m.start() for m in re.finditer(r"^diff --git ", body, re.MULTILINE)]
    assert not body or starts[:1] == [0], body[:200]
    if not body:
        return []
    return [body[a:b] for a, b in zip(starts, [*starts[1:], len(body)], strict=True)]


def section_path(section: str) -> bytes:
    names = section.split("\n", 1)[0].removeprefix("diff --git ")
    first = names[: (len(names) - 1) // 2]
    assert first.startswith("a/"), names  # plain names only (tests keep binary paths plain)
    return first[2:].encode()


def full_file_items(body: str) -> list[tuple[str, bytes, object]]:
    """Parse a full_files block body: (kind, path, payload) for each item."""
    decoder = json.JSONDecoder()
    items: list[tuple[str, bytes, object]] = []
    position = 0
    while position < len(body):
        kind = re.match(r"<(file|deleted|symlink|binary|submodule) path=", body[position:])
        assert kind, f"unexpected full_files item: {body[position : position + 200]!r}"
        path_text, position = decoder.raw_decode(body, position + kind.end())
        path = path_text.encode("utf-8")
        if kind.group(1) == "file":
            assert body.startswith(">\n", position)
            end = body.index("</file>\n", position + 2)
            items.append(("file", path, body[position + 2 : end].encode("utf-8")))
            position = end + len("</file>\n")
            continue
        if kind.group(1) == "deleted":
            payload: object = None
        elif kind.group(1) == "symlink":
            assert body.startswith(" target=", position)
            target, position = decoder.raw_decode(body, position + len(" target="))
            payload = target.encode("utf-8")
        elif kind.group(1) == "binary":
            size = re.match(r" bytes=(\d+)", body[position:])
            assert size
            payload, position = int(size.group(1)), position + size.end()
        else:
            assert body.startswith(" commit=", position)
            payload, position = decoder.raw_decode(body, position + len(" commit="))
        assert body.startswith("/>\n", position), body[position : position + 50]
        items.append((kind.group(1), path, payload))
        position += 3
    return items


def text_view(files: Tree) -> dict[bytes, tuple[str, bytes]]:
    """What full_files carries: symlink targets and file text (a final newline always present)."""
    view = {}
    for name, (mode, data) in files.items():
        if mode == "120000":
            view[name] = ("link", data)
        else:
            view[name] = ("file", data if not data or data.endswith(b"\n") else data + b"\n")
    return view


def check(
    repo_path: Path,
    rendered: Rendered,
    workspace: Path,
    *,
    binary: Iterable[str] = (),
    full_files: bool = False,
) -> list[Block]:
    """Base + tail == HEAD, for one rendering; returns the parsed blocks for further assertions."""
    head, tail, snapshot = rendered.head, rendered.tail, rendered.snapshot
    chain = chain_of(repo_path, head)
    assert tail.base in chain, "the base must be on HEAD's first-parent chain"
    position = chain.index(tail.base)
    assert list(tail.commits) == chain[position + 1 :]
    assert (snapshot.commit, snapshot.base_commit, snapshot.tail_commits) == (head, tail.base, len(tail.commits))
    assert json.loads(snapshot.message_json) == {"role": "system", "content": snapshot.text}
    assert snapshot.text.startswith(append_preamble(tail.base))
    assert rendered.base.text.endswith("</snapshot_info>\n")
    assert f"\ncommit: {tail.base}\n" in rendered.base.text

    blocks = parse_blocks(rendered.tail_text)
    assert [b.commit for b in blocks] == list(tail.commits)
    assert "".join(tail.blocks) == rendered.tail_text
    for block in blocks:
        assert block.parent == first_parent(repo_path, block.commit)

    binary_paths = {p.encode() for p in binary}
    unchecked: set[bytes] = set()
    for block in blocks:
        for paths in block.left_out.values():
            unchecked.update(paths)

    base_files = tree_files(repo_path, tail.base)
    expected = tree_files(repo_path, head)
    if full_files:
        result = text_view(base_files)
        for block in blocks:
            for kind, path, payload in full_file_items(block.body):
                if kind == "file":
                    assert isinstance(payload, bytes)
                    result[path] = ("file", payload)
                elif kind == "symlink":
                    assert isinstance(payload, bytes)
                    result[path] = ("link", payload)
                elif kind == "deleted":
                    assert path in result, f"deleted {path!r}, which the reconstruction does not have"
                    del result[path]
                elif kind == "binary":
                    assert path in binary_paths, f"{path!r} rendered as binary"
                    unchecked.add(path)
                else:
                    unchecked.add(path)
        expected_view = text_view(expected)
    else:
        directory = Path(tempfile.mkdtemp(prefix="recon-", dir=workspace))
        materialize(base_files, directory)
        for block in blocks:
            kept = []
            for section in file_sections(block.body):
                if re.search(r"^Binary files .* differ$", section, re.MULTILINE):
                    path = section_path(section)
                    assert path in binary_paths, f"{path!r} rendered as binary"
                    unchecked.add(path)
                else:
                    kept.append(section)
            if kept:
                git_apply(directory, "".join(kept))
        result = read_directory(directory)
        expected_view = expected

    for path in unchecked:
        result.pop(path, None)
        expected_view.pop(path, None)
    assert sorted(result) == sorted(expected_view)
    for path, value in expected_view.items():
        assert result[path] == value, f"{path!r} differs from HEAD's"
    return blocks


def symlink(repo: Repo, name: str, target: str) -> None:
    link = repo.path / name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def remove(repo: Repo, *names: str) -> None:
    for name in names:
        path = repo.path / name
        if path.is_dir() and not path.is_symlink():
            for child in sorted(path.rglob("*"), reverse=True):
                child.unlink() if not child.is_dir() or child.is_symlink() else child.rmdir()
            path.rmdir()
        else:
            path.unlink()


def raw_commit(repo: Repo, message: bytes) -> str:
    """An empty commit on HEAD with exactly these message bytes (git commit would re-encode them)."""
    head = repo.head()
    tree = repo.git("rev-parse", "HEAD^{tree}").strip()
    identity = "Test <test@example.invalid> 1767225600 +0000"
    body = f"tree {tree}\nparent {head}\nauthor {identity}\ncommitter {identity}\n\n".encode() + message
    commit = git(repo.path, "hash-object", "-t", "commit", "-w", "--stdin", stdin=body).decode().strip()
    repo.git("update-ref", "HEAD", commit, head)
    return commit


def commit_message(repo: Repo, message: bytes, allow_empty_message: bool = False) -> str:
    """A commit with exactly these message bytes (no cleanup, no encoding check)."""
    message_file = repo.path.parent / f"{repo.path.name}-message"
    message_file.write_bytes(message)
    args = ["commit", "-q", "--allow-empty", "--cleanup=verbatim", "-F", str(message_file)]
    if allow_empty_message:
        args.insert(2, "--allow-empty-message")
    repo.git("add", "-A")
    repo.git(*args)
    return repo.head()


LONG = "".join(f"line {i:03d}: the quick brown fox\n" for i in range(120))


# --- a linear history with every kind of change, shared by several tests --------------------------


@dataclass
class Linear:
    repo: Repo
    chain: list[str]  # root first
    by_name: dict[str, str]


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> Linear:
    repo = Repo.create(
        tmp_path_factory.mktemp("linear") / "repo",
        {
            "a.txt": "one\n",
            "src/main.py": "def main():\n    x = 1\n    y = 2\n    return x + y\n",
            "docs/with space.md": "# title\n",
            'quote"d.txt': "quoted\n",
            "ünï cødé.txt": "unicode ✓\n",
            "script.sh": "#!/bin/sh\necho hi\n",
            "crlf.txt": "a\r\nb\r\nc\r\n",
            "noeol.txt": "no newline",
            "long.txt": LONG,
            "dir2/inner.txt": "inner\n",
            "tofolder": "a file, later a folder\n",
            ".env": "SECRET=initial\n",
        },
        commit=False,
    )
    symlink(repo, "link", "a.txt")
    names: dict[str, str] = {"c0": repo.commit_all("initial")}

    repo.write({"src/main.py": "def main():\n    x = 10\n    y = 2\n    return x + y\n", "new dir/ñ.txt": "ñ\n"})
    names["c1"] = repo.commit_all("edit main, add a file in a new directory")

    remove(repo, 'quote"d.txt')
    (repo.path / "script.sh").chmod(0o755)
    names["c2"] = repo.commit_all("delete a quoted name, make script executable")

    names["c3"] = repo.commit_all("an empty commit")

    repo.write({"noeol.txt": "still no newline", "crlf.txt": "a\r\nB\r\nc\r\n"})
    symlink(repo, "link", "src/main.py")
    names["c4"] = repo.commit_all("retarget link, crlf and no-eol edits")

    remove(repo, "a.txt")
    symlink(repo, "a.txt", "ünï cødé.txt")
    symlink(repo, "dangling", "nowhere")
    names["c5"] = repo.commit_all("a.txt becomes a symlink; a dangling symlink")

    remove(repo, "tofolder", "dir2")
    repo.write({"tofolder/x.txt": "now a folder\n", "dir2": "now a file\n"})
    names["c6"] = repo.commit_all("file to folder, folder to file")

    repo.write({".env": "SECRET=changed\n", "ünï cødé.txt": "unicode ✓✓\n"})
    names["c7"] = repo.commit_all("edit the excluded .env and a unicode name")

    repo.git("mv", "src/main.py", "src/app.py")
    repo.write({"src/app.py": "def main():\n    x = 10\n    y = 3\n    return x + y\n"})
    names["c8"] = repo.commit_all("rename with an edit (no rename detection)")

    repo.write({"tab\tname.txt": "tab\n", "-dash.txt": "dash\n"})
    names["c9"] = repo.commit_all("awkward names")

    lines = LONG.splitlines(keepends=True)
    lines[5] = "changed five\n"
    lines[60:62] = ["sixty\n"]
    lines.insert(100, "inserted\n")
    repo.write({"long.txt": "".join(lines)})
    names["c10"] = repo.commit_all("three hunks")

    remove(repo, "dangling")
    (repo.path / "script.sh").chmod(0o644)
    repo.write({"script.sh": "#!/bin/sh\necho bye\n"})
    names["c11"] = repo.commit_all("drop a symlink, un-executable with an edit")

    chain = [names[f"c{i}"] for i in range(12)]
    assert chain_of(repo.path, repo.head()) == chain
    return Linear(repo, chain, names)


# --- 1. correctness: base + tail == HEAD ------------------------------------------------------------


@pytest.mark.parametrize("every", [3, 5])
def test_patch_blocks_rebuild_every_head_of_a_linear_history(linear: Linear, every: int, tmp_path: Path) -> None:
    history = History(GitRepo(str(linear.repo.path)), limits(), HistoryLimits(every, NEVER_HALVE, False))
    for depth, head in enumerate(linear.chain):
        rendered = render(history, head)
        assert rendered.tail.base == linear.chain[depth - depth % every]
        check(linear.repo.path, rendered, tmp_path)


def test_patch_blocks_carry_each_kind_of_change(linear: Linear, tmp_path: Path) -> None:
    history = History(GitRepo(str(linear.repo.path)), limits(), HistoryLimits(16, NEVER_HALVE, False))
    rendered = render(history, linear.chain[-1])
    assert rendered.tail.base == linear.chain[0]
    blocks = {b.commit: b for b in check(linear.repo.path, rendered, tmp_path)}
    by = {name: blocks[commit] for name, commit in linear.by_name.items() if commit in blocks}

    assert "diff --git a/new dir/ñ.txt b/new dir/ñ.txt\nnew file mode 100644\n" in by["c1"].body
    assert 'diff --git "a/quote\\"d.txt" "b/quote\\"d.txt"\ndeleted file mode 100644\n' in by["c2"].body
    assert "diff --git a/script.sh b/script.sh\nold mode 100644\nnew mode 100755\n" in by["c2"].body
    assert by["c3"].body == "" and by["c3"].message == "an empty commit\n"
    assert "-a.txt\n\\ No newline at end of file\n+src/main.py\n\\ No newline at end of file\n" in by["c4"].body
    assert "-b\r\n+B\r\n" in by["c4"].body
    # a type change is a deletion and a creation of the same path
    assert "diff --git a/a.txt b/a.txt\ndeleted file mode 100644\n" in by["c5"].body
    assert "diff --git a/a.txt b/a.txt\nnew file mode 120000\n" in by["c5"].body
    assert by["c7"].listed(EXCLUDED_TITLE) == [b".env"]
    assert "diff --git a/src/main.py b/src/main.py\ndeleted file mode" in by["c8"].body
    assert "diff --git a/src/app.py b/src/app.py\nnew file mode 100644" in by["c8"].body
    assert 'diff --git "a/tab\\tname.txt" "b/tab\\tname.txt"\n' in by["c9"].body
    assert by["c10"].body.count("\n@@ ") == 3
    # the excluded file's content is nowhere: not in the base, not in any block
    assert "SECRET" not in rendered.snapshot.text
    assert b"SECRET" not in rendered.snapshot.message_json


def test_a_merge_block_is_the_diff_against_the_first_parent(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    repo = make_repo({"a.txt": "a0\n", "b.txt": "b0\n", "c.txt": "1\n2\n3\n4\n5\n"})
    heads = [repo.head()]
    repo.write({"a.txt": "a1\n"})
    heads.append(repo.commit_all("c1"))
    repo.git("checkout", "-q", "-b", "side")
    repo.write({"b.txt": "b-side\n"})
    repo.commit_all("s1")
    repo.write({"side.txt": "from the side\n"})
    side_tip = repo.commit_all("s2")
    repo.git("checkout", "-q", "main")
    repo.write({"c.txt": "1\n2\n3\n4\nfive\n"})
    heads.append(repo.commit_all("c2"))
    repo.git("merge", "-q", "--no-ff", "-m", "merge side", "side")
    merge = repo.head()
    heads.append(merge)

    # an evil merge: a conflict resolved by hand plus an edit no parent has
    repo.git("checkout", "-q", "-b", "side2")
    repo.write({"c.txt": "ONE\n2\n3\n4\nfive\n"})
    repo.commit_all("side2 edits line 1")
    repo.git("checkout", "-q", "main")
    repo.write({"c.txt": "uno\n2\n3\n4\nfive\n"})
    heads.append(repo.commit_all("main edits line 1"))
    repo.git("merge", "-q", "side2", check=False)
    repo.write({"c.txt": "resolved\n2\n3\n4\nfive\n", "a.txt": "evil\n"})
    evil = repo.commit_all("evil merge")
    heads.append(evil)

    # the other direction: main fast-forwards to a merge whose first parent is a feature branch
    repo.git("checkout", "-q", "-b", "feat", heads[1])
    repo.write({"feat.txt": "f1\n"})
    feat1 = repo.commit_all("f1")
    repo.write({"feat.txt": "f2\n"})
    feat2 = repo.commit_all("f2")
    repo.git("merge", "-q", "--no-ff", "-m", "merge main into feat", "main")
    feat_merge = repo.head()
    repo.git("checkout", "-q", "main")
    repo.git("merge", "-q", "--ff-only", "feat")
    assert repo.head() == feat_merge
    assert chain_of(repo.path, feat_merge) == [heads[0], heads[1], feat1, feat2, feat_merge]

    history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(8, NEVER_HALVE, False))
    rendered = render(history, merge)
    blocks = check(repo.path, rendered, tmp_path)
    assert side_tip not in rendered.tail.commits, "side commits are not on the first-parent chain"
    merge_block = blocks[-1]
    assert (merge_block.commit, merge_block.parent) == (merge, heads[2])
    assert merge_block.message == "merge side\n"
    assert "diff --git a/b.txt b/b.txt" in merge_block.body
    assert "diff --git a/side.txt b/side.txt\nnew file mode 100644" in merge_block.body
    assert "c.txt" not in merge_block.body

    rendered = render(history, evil)
    evil_block = check(repo.path, rendered, tmp_path)[-1]
    assert "-uno\n+resolved\n" in evil_block.body and "-a1\n+evil\n" in evil_block.body

    for every in (1, 2, 3, 4):
        history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(every, NEVER_HALVE, False))
        for head in [*heads, feat1, feat2, feat_merge]:
            check(repo.path, render(history, head), tmp_path)

    rendered = render(History(GitRepo(str(repo.path)), limits(), HistoryLimits(8, NEVER_HALVE, False)), feat_merge)
    last = check(repo.path, rendered, tmp_path)[-1]
    assert (last.commit, last.parent) == (feat_merge, feat2)
    assert "resolved" in last.body and "evil" in last.body  # main's side arrives as one diff


def test_force_push_rebase_and_branch_switch_follow_the_new_chain(
    make_repo: Callable[..., Repo], tmp_path: Path
) -> None:
    repo = make_repo({"n.txt": "0\n", "keep.txt": "keep\n"})
    main = [repo.head()]
    for i in range(1, 7):
        repo.write({"n.txt": f"{i}\n"})
        main.append(repo.commit_all(f"main {i}"))
    history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, False))
    before = render(history, repo.head())
    assert (before.tail.base, before.tail.commits) == (main[4], (main[5], main[6]))

    # force-push: main is reset to c2 and rewritten
    repo.git("reset", "-q", "--hard", main[2])
    rewritten = main[:3]
    for i in range(3, 7):
        repo.write({"n.txt": f"rewritten {i}\n", f"r{i}.txt": f"{i}\n"})
        rewritten.append(repo.commit_all(f"rewritten {i}"))
    after = render(history, repo.head())
    assert (after.tail.base, after.tail.commits) == (rewritten[4], (rewritten[5], rewritten[6]))
    assert not set(after.tail.commits) & set(main[3:])
    check(repo.path, after, tmp_path)

    # branch switch: an older branch point, its own commits
    repo.git("checkout", "-q", "-b", "other", main[1])
    repo.write({"other.txt": "o2\n"})
    other2 = repo.commit_all("other 2")
    repo.write({"other.txt": "o3\n"})
    other3 = repo.commit_all("other 3")
    switched = render(history, repo.head())
    assert (switched.tail.base, switched.tail.commits) == (main[0], (main[1], other2, other3))
    check(repo.path, switched, tmp_path)

    # rebase the branch onto the rewritten main: depth 7 and 8
    repo.git("rebase", "-q", "main")
    rebased = chain_of(repo.path, repo.head())
    assert rebased[:7] == rewritten and len(rebased) == 9
    top = render(history, rebased[8])
    assert (top.tail.base, top.tail.commits) == (rebased[8], ())
    assert (
        top.snapshot.message_json
        == build_snapshot(history.repo, rebased[8], limits(), append_preamble(rebased[8])).message_json
    )
    below = render(history, rebased[7])
    assert (below.tail.base, below.tail.commits) == (rewritten[4], (rewritten[5], rewritten[6], rebased[7]))
    check(repo.path, below, tmp_path)

    # back to main: the same bytes as before the switch (cached blocks are keyed by commit id)
    repo.git("checkout", "-q", "main")
    assert render(history, repo.head()).snapshot.message_json == after.snapshot.message_json


def test_a_shallow_clone_counts_its_own_depth_and_stays_correct(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    repo = make_repo({"n.txt": "0\n"})
    full = [repo.head()]
    for i in range(1, 11):
        repo.write({"n.txt": f"{i}\n", f"f{i % 3}.txt": f"{i}\n"})
        full.append(repo.commit_all(f"commit {i}"))
    shallow_path = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "3", f"file://{repo.path}", str(shallow_path))
    assert (shallow_path / ".git" / "shallow").is_file()
    shallow = GitRepo(str(shallow_path))
    assert first_parent_depth(shallow, full[10]) == 2  # what the clone has, not the full history

    history = History(shallow, limits(), HistoryLimits(4, NEVER_HALVE, False))
    rendered = render(history, full[10])
    assert (rendered.tail.base, rendered.tail.commits) == (full[8], (full[9], full[10]))
    check(shallow_path, rendered, tmp_path)
    rendered = render(history, full[9])
    assert (rendered.tail.base, rendered.tail.commits) == (full[8], (full[9],))
    check(shallow_path, rendered, tmp_path)

    # the full clone picks its own base for the same HEAD (depth 10: base at depth 8, the same here)
    full_history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, False))
    assert full_history.tail_for(full[10]).base == full[8]
    assert full_history.tail_for(full[9]).base == full[8]


def test_binary_excluded_and_oversized_changes_are_named_not_sent(
    make_repo: Callable[..., Repo], tmp_path: Path
) -> None:
    big = "".join(f"big line {i:03d}\n" for i in range(100))  # 1500 bytes
    repo = make_repo(
        {
            "a.txt": "a0\n",
            "img.bin": b"\x89PNG\x00\x01\x02",
            "big.txt": big,
            ".env": "SECRET=one\n",
            "config/prod.key": "KEYMATERIAL-0\n",
        }
    )
    c0 = repo.head()
    repo.write({"img.bin": b"\x89PNG\x00\x03", ".env": "SECRET=two\n", "a.txt": "a1\n"})
    c1 = repo.commit_all("binary and .env change")
    remove(repo, "img.bin")
    rewritten = "".join(f"other {i:03d}\n" for i in range(190))  # 1900 bytes: fits as a file, not as a patch
    huge = "h" * 2499 + "\n"
    repo.write(
        {"big.txt": rewritten, "new.bin": b"\x00\x00new", "huge.txt": huge, "config/prod.key": "KEYMATERIAL-1\n"}
    )
    c2 = repo.commit_all("oversized patches, binary add and delete, key change")
    remove(repo, ".env")
    repo.write({"a.txt": "a2\n", "id_rsa": "PRIVATE-KEY\n"})
    c3 = repo.commit_all("delete .env, add id_rsa")

    snapshot_limits = limits(max_file_bytes=2000)
    history = History(GitRepo(str(repo.path)), snapshot_limits, HistoryLimits(8, NEVER_HALVE, False))
    rendered = render(history, c3)
    assert (rendered.tail.base, rendered.tail.commits) == (c0, (c1, c2, c3))
    b1, b2, b3 = check(repo.path, rendered, tmp_path, binary=["img.bin", "new.bin"])
    over = "changed files over the per-file limit of 2000 bytes"

    assert "diff --git a/img.bin b/img.bin\nindex " in b1.body
    assert "Binary files a/img.bin and b/img.bin differ\n" in b1.body
    assert b1.listed(EXCLUDED_TITLE) == [b".env"]
    assert b1.listed(over) == []
    assert "Binary files /dev/null and b/new.bin differ\n" in b2.body
    assert "Binary files a/img.bin and /dev/null differ\n" in b2.body
    assert b2.listed(over) == [b"big.txt", b"huge.txt"]
    assert b2.listed(EXCLUDED_TITLE) == [b"config/prod.key"]
    assert "a/big.txt" not in b2.body and "a/huge.txt" not in b2.body
    assert b3.listed(EXCLUDED_TITLE) == [b".env", b"id_rsa"]
    assert "<left_out>\nchanged files excluded by path pattern (2):\n  .env\n  id_rsa\n</left_out>\n</commit>\n" in (
        rendered.tail_text
    )
    for secret in (b"SECRET", b"KEYMATERIAL", b"PRIVATE-KEY"):
        assert secret not in rendered.snapshot.message_json

    # full_files: the whole new text where it fits, the same names left out otherwise
    history = History(GitRepo(str(repo.path)), snapshot_limits, HistoryLimits(8, NEVER_HALVE, True))
    rendered = render(history, c3)
    f1, f2, f3 = check(repo.path, rendered, tmp_path, binary=["img.bin", "new.bin"], full_files=True)
    assert '<binary path="img.bin" bytes=6/>\n' in f1.body
    assert f1.listed(EXCLUDED_TITLE) == [b".env"]
    assert '<deleted path="img.bin"/>\n' in f2.body
    assert '<binary path="new.bin" bytes=5/>\n' in f2.body
    assert f'<file path="big.txt">\n{rewritten}</file>\n' in f2.body
    assert f2.listed(over) == [b"huge.txt"]
    assert f2.listed(EXCLUDED_TITLE) == [b"config/prod.key"]
    assert "<deleted" not in f3.body  # .env's deletion is an excluded change like any other
    assert f3.listed(EXCLUDED_TITLE) == [b".env", b"id_rsa"]
    for secret in (b"SECRET", b"KEYMATERIAL", b"PRIVATE-KEY"):
        assert secret not in rendered.snapshot.message_json


@pytest.mark.parametrize("direction", ["file becomes a folder", "folder becomes a file"])
def test_an_excluded_file_under_a_replaced_path_stays_out(
    make_repo: Callable[..., Repo], tmp_path: Path, direction: str
) -> None:
    """A kept path that is a folder prefix of an excluded one must not pull the excluded patch in.

    ``git diff-tree -- conf`` also matches ``conf/.env``: the pathspec of a kept change must not
    select an excluded change beneath it.
    """
    if direction == "file becomes a folder":
        repo = make_repo({"conf": "plain file\n", "a.txt": "a\n"})
        remove(repo, "conf")
        repo.write({"conf/.env": "SECRET=hunter2\n"})
    else:
        repo = make_repo({"conf/.env": "SECRET=hunter2\n", "a.txt": "a\n"})
        remove(repo, "conf")
        repo.write({"conf": "plain file\n"})
    head = repo.commit_all("replace conf")
    for full_files in (False, True):
        history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(2, NEVER_HALVE, full_files))
        rendered = render(history, head)
        (block,) = parse_blocks(rendered.tail_text)
        assert block.listed(EXCLUDED_TITLE) == [b"conf/.env"]
        assert "hunter2" not in rendered.snapshot.text, f"full_files={full_files}: the excluded secret leaked"
        assert "conf/.env" not in block.body


def test_non_monotonic_commit_dates_keep_chain_order(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    repo = make_repo({"n.txt": "0\n"})
    chain = [repo.head()]
    for i, day in enumerate([9, 3, 7, 1, 5, 2], start=1):
        date = f"2025-12-{day:02d}T00:00:00Z"
        repo.write({"n.txt": f"{i}\n"})
        repo.git("add", "-A")
        git(repo.path, "commit", "-q", "-m", f"dated {i}", env={"GIT_COMMITTER_DATE": date, "GIT_AUTHOR_DATE": date})
        chain.append(repo.head())
    history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(8, NEVER_HALVE, False))
    for depth, head in enumerate(chain):
        rendered = render(history, head)
        assert (rendered.tail.base, rendered.tail.commits) == (chain[0], tuple(chain[1 : depth + 1]))
        check(repo.path, rendered, tmp_path)


# --- 2. full_files ------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [4, 7])
def test_full_file_blocks_rebuild_every_head_of_a_linear_history(linear: Linear, every: int, tmp_path: Path) -> None:
    history = History(GitRepo(str(linear.repo.path)), limits(), HistoryLimits(every, NEVER_HALVE, True))
    for depth, head in enumerate(linear.chain):
        rendered = render(history, head)
        assert rendered.tail.base == linear.chain[depth - depth % every]
        check(linear.repo.path, rendered, tmp_path, full_files=True)


def test_full_file_blocks_hold_the_new_text_and_deletions(linear: Linear, tmp_path: Path) -> None:
    history = History(GitRepo(str(linear.repo.path)), limits(), HistoryLimits(16, NEVER_HALVE, True))
    rendered = render(history, linear.chain[-1])
    blocks = {b.commit: b for b in check(linear.repo.path, rendered, tmp_path, full_files=True)}
    by = {name: blocks[commit] for name, commit in linear.by_name.items() if commit in blocks}
    assert by["c1"].body == (
        '<file path="new dir/ñ.txt">\nñ\n</file>\n'
        '<file path="src/main.py">\ndef main():\n    x = 10\n    y = 2\n    return x + y\n</file>\n'
    )
    assert by["c2"].body == '<deleted path="quote\\"d.txt"/>\n<file path="script.sh">\n#!/bin/sh\necho hi\n</file>\n'
    assert by["c3"].body == ""
    assert '<symlink path="link" target="src/main.py"/>\n' in by["c4"].body
    assert '<file path="noeol.txt">\nstill no newline\n</file>\n' in by["c4"].body
    assert by["c5"].body == (
        '<symlink path="a.txt" target="ünï cødé.txt"/>\n<symlink path="dangling" target="nowhere"/>\n'
    )
    assert by["c6"].body == (
        '<file path="dir2">\nnow a file\n</file>\n<deleted path="dir2/inner.txt"/>\n'
        '<deleted path="tofolder"/>\n<file path="tofolder/x.txt">\nnow a folder\n</file>\n'
    )
    assert by["c7"].body == '<file path="ünï cødé.txt">\nunicode ✓✓\n</file>\n'
    assert by["c7"].listed(EXCLUDED_TITLE) == [b".env"]
    assert '<file path="tab\\tname.txt">\ntab\n</file>\n' in by["c9"].body
    assert by["c11"].body.startswith('<deleted path="dangling"/>\n')
    assert "SECRET" not in rendered.snapshot.text


def test_full_file_blocks_name_submodules(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.txt": "a\n"})
    pointed = repo.head()
    (repo.path / "sub").mkdir()
    repo.git("update-index", "--add", "--cacheinfo", f"160000,{pointed},sub")
    added = commit_message(repo, b"add a submodule\n")
    repo.git("rm", "-q", "--cached", "sub")
    removed = commit_message(repo, b"drop it\n")
    for full_files, added_body, removed_body in (
        (True, f'<submodule path="sub" commit="{pointed}"/>\n', '<deleted path="sub"/>\n'),
        (False, f"+Subproject commit {pointed}\n", f"-Subproject commit {pointed}\n"),
    ):
        history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, full_files))
        rendered = render(history, removed)
        first, second = parse_blocks(rendered.tail_text)
        assert first.commit == added and added_body in first.body
        assert second.commit == removed and removed_body in second.body


# --- 3. the base rule ---------------------------------------------------------------------------


@pytest.fixture
def eleven(make_repo: Callable[..., Repo]) -> tuple[Repo, list[str]]:
    """Commits 0..10 on a linear chain; commit 5 adds a large file (5,900 bytes)."""
    repo = make_repo({"pad.txt": "p" * 9999 + "\n", "n.txt": "0\n"})
    chain = [repo.head()]
    for i in range(1, 11):
        files = {"n.txt": f"{i}\n"}
        if i == 5:
            files["big.txt"] = "".join(f"big {j:04d} " + "b" * 49 + "\n" for j in range(100))
        repo.write(files)
        chain.append(repo.commit_all(f"commit {i}"))
    return repo, chain


def test_the_base_moves_once_every_e_commits(eleven: tuple[Repo, list[str]]) -> None:
    repo, chain = eleven
    git_repo = GitRepo(str(repo.path))
    for every in (1, 2, 3, 4, 6):
        history = History(git_repo, limits(), HistoryLimits(every, NEVER_HALVE, False))
        for depth, head in enumerate(chain):
            base = depth - depth % every
            tail = history.tail_for(head)
            assert tail.base == chain[base], (every, depth)
            assert tail.commits == tuple(chain[base + 1 : depth + 1])
            assert len(tail.blocks) == len(tail.commits)
    history = History(git_repo, limits(), HistoryLimits(4, NEVER_HALVE, False))
    expected = [0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8]
    assert [chain.index(history.tail_for(head).base) for head in chain] == expected
    history = History(git_repo, limits(), HistoryLimits(1, NEVER_HALVE, False))
    rendered = render(history, chain[7])
    assert (rendered.tail.base, rendered.tail.commits, rendered.snapshot.tail_commits) == (chain[7], (), 0)
    assert (
        rendered.snapshot.message_json
        == build_snapshot(git_repo, chain[7], limits(), append_preamble(chain[7])).message_json
    )


def tree_bytes(path: Path, commit: str) -> int:
    """The sizes of the commit's blobs (no exclusions or oversized files in these repos)."""
    total = 0
    for line in git(path, "ls-tree", "-r", "-l", commit).decode().splitlines():
        _mode, kind, _, size = line.split("\t")[0].split()
        if kind == "blob":
            total += int(size)
    return total


def documented_base(depth: int, every: int, percent: int, base_bytes: list[int], block_bytes: list[int]) -> int:
    """The module docstring's rule, written out: the depth of the base."""
    while True:
        base = depth - depth % every
        tail = sum(block_bytes[base + 1 : depth + 1])
        if every == 1 or tail * 100 <= percent * base_bytes[base]:
            return base
        every //= 2


def test_a_large_tail_halves_e_as_documented(eleven: tuple[Repo, list[str]]) -> None:
    repo, chain = eleven
    git_repo = GitRepo(str(repo.path))
    base_bytes = [tree_bytes(repo.path, c) for c in chain]
    assert base_bytes[0] == 10_002 and base_bytes[5] == 15_902
    reference = History(git_repo, limits(), HistoryLimits(4, NEVER_HALVE, False))
    block_bytes = [len(reference.block(c).encode()) if i else 0 for i, c in enumerate(chain)]
    assert block_bytes[5] > 6_000 and max(block_bytes[1:5] + block_bytes[6:]) < 500
    assert [reference.base_bytes(c) for c in chain] == base_bytes

    # percent 10: at depth 7 the tail 5..7 (with the large commit) is too big for base 4 (10 KB):
    # E=2 gives base 6 and a one-commit tail. At depth 5 even E=2 keeps the large block: base = HEAD.
    history = History(git_repo, limits(), HistoryLimits(4, 10, False))
    assert history.tail_for(chain[7]).base == chain[6]
    assert history.tail_for(chain[7]).commits == (chain[7],)
    assert history.tail_for(chain[5]).base == chain[5]
    assert history.tail_for(chain[5]).commits == ()
    assert history.tail_for(chain[6]).base == chain[6]
    assert history.tail_for(chain[9]).base == chain[8]
    assert history.tail_for(chain[2]).base == chain[0]  # two small blocks fit in 10% of 10 KB

    seen = set()
    for every in (2, 4, 6):
        for percent in (0, 3, 10, 25, 100, 1000):
            history = History(git_repo, limits(), HistoryLimits(every, percent, False))
            for depth, head in enumerate(chain):
                base = documented_base(depth, every, percent, base_bytes, block_bytes)
                tail = history.tail_for(head)
                assert tail.base == chain[base], (every, percent, depth)
                assert tail.commits == tuple(chain[base + 1 : depth + 1])
                seen.add("halved" if base != depth - depth % every else "kept")
                seen.add("head" if base == depth else "tail")
    assert seen == {"halved", "kept", "head", "tail"}


def test_the_tail_limit_is_inclusive_at_exactly_max_tail_percent(make_repo: Callable[..., Repo]) -> None:
    """tail * 100 == percent * base bytes keeps the base; one byte less of base moves it."""

    def build(pad: int) -> tuple[Repo, list[str]]:
        repo = make_repo({"pad.txt": "p" * (pad - 1) + "\n", "n.txt": "0\n"})
        chain = [repo.head()]
        for i in range(1, 8):
            repo.write({"n.txt": f"{i}\n"})
            chain.append(repo.commit_all(f"commit {i}"))
        return repo, chain

    repo, chain = build(1000)
    history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, False))
    tail_bytes = sum(len(block.encode()) for block in history.tail_for(chain[7]).blocks)
    assert history.tail_for(chain[7]).commits == tuple(chain[5:8])

    for pad, expected_base in ((2 * tail_bytes - 2, 4), (2 * tail_bytes - 3, 6)):
        repo, chain = build(pad)
        assert tree_bytes(repo.path, chain[4]) == pad + 2
        history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, 50, False))
        tail = history.tail_for(chain[7])
        assert tail.base == chain[expected_base], (pad, tail_bytes)
        if expected_base == 4:
            assert sum(len(block.encode()) for block in tail.blocks) * 100 == 50 * (pad + 2)


def test_a_fresh_history_on_another_clone_gives_identical_bytes(linear: Linear, tmp_path: Path) -> None:
    clone = linear.repo.clone(tmp_path / "elsewhere" / "clone")
    for full_files in (False, True):
        hlimits = HistoryLimits(4, NEVER_HALVE, full_files)
        first = History(GitRepo(str(linear.repo.path)), limits(), hlimits)
        for head in linear.chain:
            second = History(GitRepo(str(clone.path)), limits(), hlimits)  # fresh: no cached blocks
            assert render(first, head).snapshot.message_json == render(second, head).snapshot.message_json
    # the composition in the provider gives the same bytes as the one written out here
    provider = make_provider(clone, HistoryLimits(4, NEVER_HALVE, False))
    history = History(GitRepo(str(linear.repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, False))
    for head in linear.chain[5:8]:
        snapshot = asyncio.run(provider.snapshot(head))
        assert snapshot.message_json == render(history, head).snapshot.message_json


def test_a_new_commit_on_the_same_base_only_appends(linear: Linear) -> None:
    history = History(GitRepo(str(linear.repo.path)), limits(), HistoryLimits(5, NEVER_HALVE, False))
    previous = render(history, linear.chain[0]).snapshot
    for depth, head in enumerate(linear.chain[1:], start=1):
        current = render(history, head).snapshot
        if depth % 5:
            assert current.message_json.startswith(previous.message_json[: -len(MESSAGE_END)])
            assert previous.message_json[-len(MESSAGE_END) :] == MESSAGE_END == b'"}'
            assert len(current.message_json) > len(previous.message_json)
            assert current.regions[: len(previous.regions)] == previous.regions
        else:  # the base moved: the files part changes
            assert current.base_commit == head != previous.base_commit
            assert not current.message_json.startswith(previous.message_json[: -len(MESSAGE_END)])
        previous = current


# --- 4. ContextProvider in append mode ------------------------------------------------------------


def make_provider(repo: Repo, history_limits: HistoryLimits) -> ContextProvider:
    git_repo = GitRepo(str(repo.path))
    monitor = ChangeMonitor(git_repo.toplevel, [git_repo.git_dir, git_repo.common_dir])
    return ContextProvider(
        git_repo,
        monitor,
        limits(),
        DiffLimits(100_000, 1_000_000, FILTER),
        observer=ProxyMetrics(),
        history_limits=history_limits,
    )


async def test_the_provider_builds_each_base_once_and_appends_commits(
    make_repo: Callable[..., Repo], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo({"a.txt": "0\n", "src/x.py": "x = 1\n"})
    builds: list[tuple[str | None, bool]] = []
    real_build = build_snapshot  # the function context.py imported

    def counting_build(
        git_repo: GitRepo,
        commit: str | None,
        lim: SnapshotLimits,
        preamble: str = PREAMBLE,
        budget: WindowBudget | None = None,
    ) -> Snapshot:
        builds.append((commit, preamble == append_preamble(commit)))
        return real_build(git_repo, commit, lim, preamble, budget)

    monkeypatch.setattr(context_module, "build_snapshot", counting_build)
    provider = make_provider(repo, HistoryLimits(4, NEVER_HALVE, False))
    heads = [repo.head()]
    contexts = await asyncio.gather(*(provider.current() for _ in range(8)))
    assert len({id(c.snapshot) for c in contexts}) == 1
    first = contexts[0].snapshot
    assert (first.commit, first.base_commit, first.tail_commits) == (heads[0], heads[0], 0)
    assert first.text.startswith(append_preamble(heads[0]))

    snapshots = [first]
    for i in range(1, 7):
        repo.write({"a.txt": f"{i}\n"})
        heads.append(repo.commit_all(f"commit {i}"))
        provider.monitor.note_change()
        context = await provider.current()
        snapshot = context.snapshot
        assert (snapshot.commit, snapshot.base_commit, snapshot.tail_commits) == (heads[i], heads[i - i % 4], i % 4)
        assert context.diff.commit == heads[i]
        assert "clean" in context.diff.text  # against HEAD, not against the base
        snapshots.append(snapshot)

    assert builds == [(heads[0], True), (heads[4], True)], "one base build per base"
    assert provider.snapshot_builds == 7
    metrics = provider.observer
    assert isinstance(metrics, ProxyMetrics)
    assert metrics.registry.get_sample_value("scout_snapshot_builds_total") == 7
    assert metrics.registry.get_sample_value("scout_snapshot_bytes") == snapshots[-1].size
    for previous, current in itertools.pairwise(snapshots[:4]):  # the same base: only appends
        assert current.message_json.startswith(previous.message_json[: -len(MESSAGE_END)])

    # an uncommitted edit: same snapshot, the diff is against HEAD
    repo.write({"a.txt": "edited\n"})
    provider.monitor.note_change()
    context = await provider.current()
    assert context.snapshot is snapshots[-1]
    assert context.diff.commit == heads[6]
    assert "-6\n+edited\n" in context.diff.text
    assert len(builds) == 2 and provider.snapshot_builds == 7

    # regions: each block is labelled with its commit; path_at finds it from any offset inside
    snapshot = snapshots[3]  # base heads[0], tail heads[1..3]
    data = snapshot.message_json
    assert data.startswith(MESSAGE_HEAD) and data.endswith(MESSAGE_END)
    starts = [data.index(b'<commit id=\\"' + c.encode() + b'\\"') for c in heads[1:4]]
    for start, end, commit in zip(starts, [*starts[1:], len(data) - len(MESSAGE_END)], heads[1:4], strict=True):
        assert (start, f"commit {commit}") in snapshot.regions
        for offset in (start, start + 40, (start + end) // 2, end - 1):
            assert path_at(snapshot, offset) == f"commit {commit}"
    assert path_at(snapshot, starts[0] - 1) is None  # the base's footer
    assert path_at(snapshot, len(data) - len(MESSAGE_END)) is None
    assert path_at(snapshot, data.index(b"x = 1")) == "src/x.py"
    assert [label for _, label in snapshot.regions[-3:]] == [f"commit {c}" for c in heads[1:4]]


async def test_the_provider_follows_a_force_push(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.txt": "0\n"})
    heads = [repo.head()]
    for i in range(1, 4):
        repo.write({"a.txt": f"{i}\n"})
        heads.append(repo.commit_all(f"commit {i}"))
    provider = make_provider(repo, HistoryLimits(4, NEVER_HALVE, True))
    before = (await provider.current()).snapshot
    assert (before.base_commit, before.tail_commits) == (heads[0], 3)
    repo.git("reset", "-q", "--hard", heads[1])
    repo.write({"a.txt": "other\n"})
    other = repo.commit_all("other 2")
    provider.monitor.note_change()
    after = (await provider.current()).snapshot
    assert (after.commit, after.base_commit, after.tail_commits) == (other, heads[0], 2)
    assert '<file path="a.txt">\nother\n</file>\n' in after.text
    assert f'<commit id="{heads[2]}"' not in after.text


# --- 5. block format ------------------------------------------------------------------------------


def blob(repo: Repo, data: bytes) -> str:
    return git(repo.path, "hash-object", "--stdin", stdin=data).decode().strip()


def test_a_block_is_exactly_this(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.txt": "one\n"})
    root = repo.head()
    repo.write({"a.txt": "two\n"})
    edit = repo.commit_all("edit a\n\nwith a body")
    history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, False))
    assert history.block(edit) == (
        f'<commit id="{edit}" parent="{root}">\n'
        "<message>\nedit a\n\nwith a body\n</message>\n"
        "diff --git a/a.txt b/a.txt\n"
        f"index {blob(repo, b'one\n')}..{blob(repo, b'two\n')} 100644\n"
        "--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-one\n+two\n"
        "</commit>\n"
    )
    full = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, True))
    assert full.block(edit) == (
        f'<commit id="{edit}" parent="{root}">\n<message>\nedit a\n\nwith a body\n</message>\n'
        '<file path="a.txt">\ntwo\n</file>\n</commit>\n'
    )
    # a root commit (only ever a base in practice) has no parent attribute; its patch is from nothing
    assert history.block(root).startswith(f'<commit id="{root}">\n<message>\ninitial\n</message>\n')
    assert "new file mode 100644" in history.block(root)


def test_commit_messages_verbatim_with_u_fffd_for_invalid_utf8(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.txt": "a\n"})
    latin1 = raw_commit(repo, b"caf\xe9 au lait\n\n  indented body\xff\n")
    assert git(repo.path, "cat-file", "commit", latin1).endswith(b"\n\ncaf\xe9 au lait\n\n  indented body\xff\n")
    no_newline = commit_message(repo, b"no final newline")
    empty = commit_message(repo, b"", allow_empty_message=True)
    unicode = commit_message(repo, "naïve — ✓\n".encode())
    history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(8, NEVER_HALVE, False))
    messages = {b.commit: b.message for b in parse_blocks(render(history, repo.head()).tail_text)}
    assert messages == {
        latin1: "caf\ufffd au lait\n\n  indented body\ufffd\n",
        no_newline: "no final newline\n",
        empty: "",
        unicode: "naïve — ✓\n",
    }
    assert f'<commit id="{empty}" parent="{no_newline}">\n<message>\n</message>\n</commit>\n' in history.block(empty)


def configure(repo: Repo, settings: Sequence[tuple[str, str]]) -> None:
    for key, value in settings:
        repo.git("config", key, value)


def test_patches_do_not_depend_on_the_repositorys_diff_config(linear: Linear, tmp_path: Path) -> None:
    clone = linear.repo.clone(tmp_path / "configured")
    configure(
        clone,
        [
            ("diff.noprefix", "true"),
            ("diff.mnemonicPrefix", "true"),
            ("color.ui", "always"),
            ("color.diff", "always"),
            ("core.quotePath", "true"),
            ("diff.algorithm", "patience"),
            ("diff.context", "10"),
            ("diff.interHunkContext", "10"),
            ("diff.renames", "copies"),
            ("diff.relative", "true"),
            ("diff.external", "false"),
            ("diff.submodule", "log"),
            ("diff.orderFile", "/dev/null"),
        ],
    )
    plain = History(GitRepo(str(linear.repo.path)), limits(), HistoryLimits(16, NEVER_HALVE, False))
    configured = History(GitRepo(str(clone.path)), limits(), HistoryLimits(16, NEVER_HALVE, False))
    expected = render(plain, linear.chain[-1]).snapshot.message_json
    assert render(configured, linear.chain[-1]).snapshot.message_json == expected
    assert b"diff --git a/src/main.py b/src/main.py" in expected  # the pinned prefixes
    assert b"\x1b[" not in expected  # no colour


INDENT_BEFORE = "if (a) {\n    pass\n}\n}\n  y;\n  y;\n    pass\n}\n"
INDENT_AFTER = "if (a) {\n    pass\n}\n}\n  y;\n  y;\n  y;\n  x;\n  y;\n    pass\n}\n"


@pytest.mark.parametrize(
    ("key", "value"),
    [("diff.suppressBlankEmpty", "true"), ("diff.indentHeuristic", "false")],
)
def test_blocks_do_not_depend_on_diff_options_plumbing_reads(
    make_repo: Callable[..., Repo], tmp_path: Path, key: str, value: str
) -> None:
    """Plumbing (diff-tree) reads these from any config file; a replica that sets one differs."""
    repo = make_repo({"blank.txt": "one\n\nthree\n", "indent.c": INDENT_BEFORE})
    repo.write({"blank.txt": "one\n\n3\n", "indent.c": INDENT_AFTER})
    head = repo.commit_all("edits whose patch those options change")
    clone = repo.clone(tmp_path / "replica")
    configure(clone, [(key, value)])
    plain = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, False)).block(head)
    assert " \n-three\n" in plain and "@@ -3,6 +3,9 @@" in plain
    configured = History(GitRepo(str(clone.path)), limits(), HistoryLimits(4, NEVER_HALVE, False)).block(head)
    assert configured == plain, f"{key}={value} in the repository's config changed the block"


def test_blocks_do_not_depend_on_a_users_attributes_file(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    """core.attributesFile (the user's global attributes) is per machine: it must not change the patch.

    A repository's own .git/info/attributes still applies (git 2.39 cannot be told to skip it;
    README, Known limits).
    """
    repo = make_repo({"x.c": "int f() {\n  a;\n  b;\n  c;\n  d;\n}\n", "t.txt": "text\n"})
    repo.write({"x.c": "int f() {\n  a;\n  b;\n  c;\n  D;\n}\n", "t.txt": "changed text\n"})
    head = repo.commit_all("edit")
    clone = repo.clone(tmp_path / "replica")
    attributes = tmp_path / "global-attributes"
    attributes.write_text("*.c diff=custom\n*.txt -diff\n")
    configure(clone, [("core.attributesFile", str(attributes)), ("diff.custom.xfuncname", "^(.*)$")])
    plain = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, False)).block(head)
    assert "+changed text\n" in plain and "@@ -2,5 +2,5 @@ int f() {\n" in plain
    configured = History(GitRepo(str(clone.path)), limits(), HistoryLimits(4, NEVER_HALVE, False)).block(head)
    assert configured == plain


def test_a_long_tail_is_read_by_a_few_git_processes_not_a_few_per_commit(
    make_repo: Callable[..., Repo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo({"n.txt": "0\n", ".env": "S=0\n"})
    for i in range(1, 41):
        repo.write({"n.txt": f"{i}\n", f"m{i % 5}.py": f"value = {i}\n", ".env": f"S={i}\n"})
        repo.commit_all(f"commit {i}")
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    history = History(GitRepo(str(repo.path)), limits(), HistoryLimits(64, NEVER_HALVE, False))

    rendered = render(history, repo.head())

    assert len(rendered.tail.commits) == 40
    started = git_processes(trace)  # the base snapshot's included (ls-tree, cat-file, its tree's sizes)
    assert len(started) <= 10, started
    check(repo.path, rendered, tmp_path)


def test_each_new_commit_costs_git_work_for_itself_only_and_matches_a_fresh_reader(
    make_repo: Callable[..., Repo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo({"n.txt": "0\n"})
    long_lived = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, False))
    long_lived.tail_for(repo.head())
    trace = tmp_path / "trace"
    for i in range(1, 11):
        repo.write({"n.txt": f"{i}\n"})
        head = repo.commit_all(f"commit {i}")
        trace.unlink(missing_ok=True)
        monkeypatch.setenv("GIT_TRACE", str(trace))
        tail = long_lived.tail_for(head)
        monkeypatch.delenv("GIT_TRACE")
        started = git_processes(trace)
        assert not any("--count" in p for p in started), started  # the depth came from a known parent
        assert sum("diff-tree" in p for p in started) <= 1, started
        fresh = History(GitRepo(str(repo.path)), limits(), HistoryLimits(4, NEVER_HALVE, False)).tail_for(head)
        assert tail == fresh


def test_a_changed_file_far_over_the_limit_is_named_not_diffed_and_never_called_binary(
    make_repo: Callable[..., Repo], tmp_path: Path
) -> None:
    huge = "".join(f"generated line {i:06d}\n" for i in range(1000))  # 22 KB: over 4x the 2000-byte limit
    repo = make_repo({"gen.txt": huge, "package-lock.json": huge, "a.txt": "a\n"})
    repo.write({"gen.txt": huge + "one more\n", "package-lock.json": huge + "x\n", "a.txt": "b\n"})
    head = repo.commit_all("a small change to each")

    history = History(GitRepo(str(repo.path)), limits(max_file_bytes=2000), HistoryLimits(8, NEVER_HALVE, False))
    rendered = render(history, head)
    (block,) = check(repo.path, rendered, tmp_path)

    assert block.listed("changed files over the per-file limit of 2000 bytes") == [b"gen.txt"]
    assert block.listed(EXCLUDED_TITLE) == [b"package-lock.json"]
    assert "gen.txt" not in block.body and "Binary files" not in block.body
    assert "+b\n" in block.body
