"""Changes between two states of a repository, for a continuing conversation (issue 13).

The invariant, proved the way tests/test_history.py proves base + blocks = HEAD: the files a
conversation started from, with every change message applied in order (by an applier written
here, not the code under test), are exactly the work tree now, across edits, new files,
deletions, commits, branch switches and resets.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from scout_diff_cache.context.changes import changes_between, file_patch
from scout_diff_cache.context.workdiff import DiffLimits, WorkState, build_working_diff
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from support import Repo

LIMITS = DiffLimits(100_000, 1_000_000, PathFilter.build([], True))
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def apply(files: dict[str, str], message: str) -> dict[str, str]:
    """Apply a change message's patches to ``files`` (path -> text)."""
    result = dict(files)
    sections = re.split(r"^diff --git a/(.+?) b/\1\n", message, flags=re.MULTILINE)
    for path, section in zip(sections[1::2], sections[2::2], strict=True):
        lines = section.split("<changes_info>")[0].splitlines(keepends=True)
        if lines and lines[0] == "deleted file\n":
            del result[path]
            continue
        old = [] if lines and lines[0] == "new file\n" else result[path].splitlines(keepends=True)
        new: list[str] = []
        position = 0
        index = next(i for i, line in enumerate(lines) if line.startswith("+++ ")) + 1
        while index < len(lines):
            match = HUNK.match(lines[index])
            assert match, lines[index]
            start = int(match.group(1)) - (0 if match.group(2) == "0" else 1)
            new.extend(old[position:start])
            position = start
            index += 1
            while index < len(lines) and not lines[index].startswith("@@"):
                line = lines[index]
                no_newline = index + 1 < len(lines) and lines[index + 1].startswith("\\ No newline")
                text = line[1:-1] if no_newline else line[1:]
                if line[0] == " ":
                    new.append(text)
                    position += 1
                elif line[0] == "-":
                    assert old[position] == text, (path, old[position], text)
                    position += 1
                elif line[0] == "+":
                    new.append(text)
                index += 2 if no_newline else 1
        new.extend(old[position:])
        result[path] = "".join(new)
    return result


def work_tree(repo: Repo) -> dict[str, str]:
    """The truth: every tracked or untracked (not ignored) file as it is on disk."""
    listed = subprocess.run(
        ["git", "-C", str(repo.path), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True
    ).stdout.split(b"\0")
    files = {}
    for raw in filter(None, listed):
        path = repo.path / raw.decode()
        if path.is_file() and not LIMITS.path_filter.excludes(raw):
            files[raw.decode()] = path.read_text(encoding="utf-8")
    return files


def state(git_repo: GitRepo) -> WorkState:
    return build_working_diff(git_repo, git_repo.head_commit(), LIMITS).state


def test_every_change_applied_in_order_is_the_work_tree_now(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.py": "a = 1\n", "b.py": "b = 1\nb2 = 2\n", "docs/x.md": "# X\n", ".env": "SECRET=1\n"})
    git_repo = GitRepo(str(repo.path))
    model = work_tree(repo)  # what message 1 and a clean working diff give
    previous = state(git_repo)
    steps: list[Callable[[], object]] = [
        lambda: repo.write({"a.py": "a = 2\n"}),  # an edit
        lambda: repo.write({"c.py": "c = 1"}),  # a new file, no newline at its end
        (repo.path / "b.py").unlink,  # a deletion
        lambda: repo.commit_all("commit the edits"),  # a commit of what was already seen
        lambda: repo.write({"a.py": "a = 3\n", "c.py": "c = 1\nc = 2\n"}),
        lambda: repo.git("checkout", "-q", "-b", "feature"),
        lambda: repo.commit_all("on feature"),
        lambda: repo.write({"d.py": "".join(f"line {i}\n" for i in range(40))}),
        lambda: repo.commit_all("add d"),
        lambda: repo.write({"d.py": "".join(f"line {i}\n" for i in range(40) if i != 20)}),
        lambda: repo.git("stash", "-q"),
        lambda: repo.git("checkout", "-q", "-"),  # a branch switch
        lambda: repo.write({".env": "SECRET=2\n", "a.py": "a = 4\n"}),  # an excluded path changes too
        lambda: repo.git("reset", "-q", "--hard", "HEAD~1"),  # a reset
    ]
    messages = 0
    for step in steps:
        step()
        now = state(git_repo)
        changes = changes_between(git_repo, previous, now, LIMITS)
        if changes is not None:
            model = apply(model, changes.text)
            messages += 1
            assert ".env" not in changes.text
        assert model == work_tree(repo), step
        previous = now
    assert messages >= 10


def test_the_same_two_states_give_the_same_bytes_and_no_change_gives_none(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.py": "a = 1\n"})
    git_repo = GitRepo(str(repo.path))
    before = state(git_repo)
    assert changes_between(git_repo, before, state(git_repo), LIMITS) is None
    repo.write({"a.py": "a = 2\n"})
    after = state(git_repo)
    first = changes_between(git_repo, before, after, LIMITS)
    second = changes_between(GitRepo(str(repo.path)), before, after, LIMITS)
    assert first is not None and second is not None and first.message_json == second.message_json
    assert first.files == 1


def test_a_file_patch_says_when_a_file_has_no_newline_at_its_end() -> None:
    patch = file_patch(b"x.txt", b"one\ntwo", b"one\nthree")
    assert patch.endswith("-two\n\\ No newline at end of file\n+three\n\\ No newline at end of file\n")
    assert apply({"x.txt": "one\ntwo"}, patch) == {"x.txt": "one\nthree"}


def test_binary_and_oversized_files_are_named_not_shown(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    repo = make_repo({"a.py": "a = 1\n"})
    git_repo = GitRepo(str(repo.path))
    before = state(git_repo)
    repo.write({"logo.bin": b"\x00\x01", "big.txt": "x" * 200_000})
    changes = changes_between(git_repo, before, state(git_repo), LIMITS)
    assert changes is not None
    assert "changed binary files, not shown (1):\n  logo.bin" in changes.text
    assert "over the per-file limit of 100000 bytes, or left out of the working diff" in changes.text
    assert "  big.txt\n" in changes.text
    assert changes.left_out == 2
