"""The first-parent chain and what each commit on it changed, read in bulk.

A history tail of N commits costs a fixed number of git processes, not a few per commit: the
chain from one ``rev-list``, the commit objects from one ``cat-file --batch``, and every commit's
raw changes and patch against its first parent from one ``diff-tree --stdin --patch-with-raw``
(each input line names the commit and the parent to compare it with, so merges are compared with
their first parent only, and a root commit with the empty tree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .patches import split_patch
from .repo import PATCH_FLAGS, GitRepo, RawChange, read_all, split_raw

# diff-tree treats a file larger than this as binary, so no patch holds megabytes of an excluded
# generated file; a kept file above it is listed as over the per-file limit (BIG_FILE_LIMIT_FACTOR
# times MAX_FILE_BYTES: a small change to a file over the limit still gives a small patch below it).
BIG_FILE_LIMIT_FACTOR = 4


@dataclass(frozen=True)
class CommitDiff:
    """A commit's message and its changes against its first parent (the empty tree for a root)."""

    commit: str
    parent: str | None
    message: bytes
    changes: tuple[RawChange, ...]
    patches: tuple[tuple[bytes, bytes], ...]  # (path, patch) as git wrote them; a type change gives two


def first_parent_depth(repo: GitRepo, commit: str) -> int:
    """Commits before ``commit`` on its first-parent chain (0 for a root; counts what a shallow clone has)."""
    return int(repo.run("rev-list", "--first-parent", "--count", commit, "--").decode()) - 1


def first_parent_line(repo: GitRepo, head: str, count: int) -> list[str]:
    """``head`` and up to ``count - 1`` of its first-parent ancestors, newest first."""
    return repo.run("rev-list", "--first-parent", f"--max-count={count}", head, "--").decode().split()


def commit_diffs(repo: GitRepo, commits: Sequence[str], max_file_bytes: int, patches: bool) -> list[CommitDiff]:
    """Each commit's first parent, message, raw changes and (if ``patches``) per-file patches."""
    if not commits:
        return []
    parsed = [_parse_commit(raw) for raw in read_all(repo, commits)]
    lines = [f"{commit} {parent}" if parent else commit for commit, (parent, _) in zip(commits, parsed, strict=True)]
    output = repo.run(
        "-c",
        f"core.bigFileThreshold={max_file_bytes * BIG_FILE_LIMIT_FACTOR}",
        "diff-tree",
        "--stdin",
        "--root",
        "--always",
        "-r",
        "-z",
        "--no-renames",
        "--ignore-submodules=none",
        *(["--patch-with-raw", *PATCH_FLAGS[1:]] if patches else ["--raw"]),
        stdin=("\n".join(lines) + "\n").encode(),
    )
    starts = _commit_starts(output, commits)
    diffs = []
    for index, (commit, (parent, message)) in enumerate(zip(commits, parsed, strict=True)):
        end = starts[index + 1] if index + 1 < len(commits) else len(output)
        changes, patch = split_raw(output[starts[index] + len(commit) + 1 : end])
        diffs.append(CommitDiff(commit, parent, message, tuple(changes), tuple(split_patch(patch))))
    return diffs


def _parse_commit(raw: bytes) -> tuple[str | None, bytes]:
    headers, _, message = raw.partition(b"\n\n")
    parents = [line.split()[1].decode() for line in headers.split(b"\n") if line.startswith(b"parent ")]
    return (parents[0] if parents else None), message


def _commit_starts(output: bytes, commits: Sequence[str]) -> list[int]:
    """Where each commit's output starts: its id, then NUL. A later commit's id cannot occur in an
    earlier commit's patch (it is a hash over that content), so the first match after the previous
    start is the one."""
    starts, position = [], 0
    for commit in commits:
        marker = commit.encode() + b"\0"
        position = output.find(marker, position)
        if position < 0:
            raise ValueError(f"git diff-tree printed nothing for commit {commit}")
        starts.append(position)
        position += len(marker)
    return starts
