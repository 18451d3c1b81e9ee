"""Read-only access to the watched git repository.

Every command runs with ``GIT_OPTIONAL_LOCKS=0`` and only plumbing that never writes: no index
refresh, no ``index.lock``, nothing under ``.git`` is modified (the index is read through a
refreshed private copy, see index.py). Blobs are read from the object database (``ls-tree`` and
``cat-file --batch``, see blobs.py), never from the working tree.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import git

from . import blobs
from .errors import GitError
from .index import PrivateIndex

# Modes and kinds as git writes them in ls-tree and raw diff output.
MODE_SYMLINK = "120000"
MODE_SUBMODULE = "160000"
MODE_MISSING = "000000"  # the side of a raw diff entry where the path does not exist
MODE_FILE = "100644"
MODE_EXECUTABLE = "100755"
BLOB_MODES = (MODE_FILE, MODE_EXECUTABLE, MODE_SYMLINK)
KIND_SUBMODULE = "commit"

KEPT_TREES = 2

EMPTY_TREE_SHA1 = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
EMPTY_TREE_SHA256 = "6ef19b41225c5369f1c104d45d8d85efa9b057b53b14b4b9b939dd74decc5321"

# Output-shaping configuration pinned on the command line so a user's git config cannot change
# what we produce (prefixes, colours, external diff drivers, path quoting).
_PINNED_CONFIG = (
    "-c",
    "core.quotePath=false",
    "-c",
    "diff.noprefix=false",
    "-c",
    "diff.mnemonicPrefix=false",
    "-c",
    "diff.external=",
    "-c",
    "color.ui=never",
    # Patch bytes must not depend on the machine: these change blank context lines, hunk
    # boundaries, and (attributes) hunk headers or text/binary.
    "-c",
    "diff.suppressBlankEmpty=false",
    "-c",
    "diff.indentHeuristic=true",
    "-c",
    "core.attributesFile=/dev/null",
    # A repository's own config must not run commands through us: an fsmonitor hook would run on
    # every diff-index and ls-files (a repository's clean filters still run, as git runs them).
    "-c",
    "core.fsmonitor=false",
)

_SCRUBBED_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_COMMON_DIR",
)


@dataclass(frozen=True)
class TreeEntry:
    """One entry of ``git ls-tree -r -l``: kind is blob, commit (a submodule) or tree."""

    mode: str
    kind: str
    oid: str
    size: int | None
    path: bytes


@dataclass(frozen=True)
class RawChange:
    """One entry of ``git diff-index`` raw output (a path that may differ from the commit).

    ``new_oid`` is all zeros when git did not hash the working-tree file: the index entry's stat
    data no longer matches (an edit, or only a touch), so the content may still be unchanged.
    """

    status: str
    old_mode: str
    new_mode: str
    old_oid: str
    new_oid: str
    path: bytes


# Every patch the proxy sends is made with these: the same bytes whatever the user's git config.
PATCH_FLAGS = (
    "-p",
    "--full-index",
    "--no-renames",
    "--no-color",
    "--no-ext-diff",
    "--no-textconv",
    "--src-prefix=a/",
    "--dst-prefix=b/",
    "--no-relative",
    "-U3",
    "--inter-hunk-context=0",
    "--diff-algorithm=myers",
    "--ignore-submodules=none",
)


def parse_raw(out: bytes) -> list[RawChange]:
    """``git diff-index``/``diff-tree -r -z`` raw output as entries."""
    fields = iter(out.split(b"\0"))
    changes = []
    for meta in fields:
        if not meta.startswith(b":"):
            continue
        old_mode, new_mode, old_oid, new_oid, status = meta[1:].decode().split()
        changes.append(RawChange(status[:1], old_mode, new_mode, old_oid, new_oid, next(fields)))
    return changes


def split_raw(output: bytes) -> tuple[list[RawChange], bytes]:
    """``--patch-with-raw -z`` output (of one commit, after its id): the raw entries, then NUL and the patch."""
    position = 0
    while output.startswith(b":", position):
        meta_end = output.index(b"\0", position)
        path_end = output.index(b"\0", meta_end + 1)
        position = path_end + 1
    patch = output[position + 1 :] if output.startswith(b"\0", position) else b""
    return parse_raw(output[:position]), patch


def _parse_tree(out: bytes) -> tuple[TreeEntry, ...]:
    """``git ls-tree -r -z`` output (with or without ``-l``) as entries."""
    entries = []
    for record in out.split(b"\0"):
        if not record:
            continue
        meta, _, path = record.partition(b"\t")
        mode, kind, oid, *size = meta.decode().split()
        entries.append(TreeEntry(mode, kind, oid, None if not size or size[0] == "-" else int(size[0]), path))
    return tuple(entries)


def _git_env(toplevel: Path, index: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    env.update(
        GIT_OPTIONAL_LOCKS="0",
        LC_ALL="C",
        LANG="C",
        GIT_TERMINAL_PROMPT="0",
        GIT_PAGER="cat",
        GIT_ATTR_NOSYSTEM="1",
        # Never discover a repository above the work tree (if its .git goes away, fail instead).
        GIT_CEILING_DIRECTORIES=str(toplevel.parent),
    )
    return env


class GitRepo:
    """A git work tree, opened once; all reads go through short-lived git processes."""

    def __init__(self, path: str) -> None:
        try:
            repo = git.Repo(path, search_parent_directories=True)
        except git.NoSuchPathError:
            raise GitError(f"{path} does not exist") from None
        except git.InvalidGitRepositoryError:
            raise GitError(f"{path} is not inside a git repository") from None
        try:
            if repo.bare or repo.working_tree_dir is None:
                raise GitError(f"{path} is a bare repository; point GIT_REPO_PATH at a work tree")
            self.toplevel = Path(repo.working_tree_dir)
            self.git_dir = Path(repo.git_dir)
            self.common_dir = Path(repo.common_dir)
        finally:
            repo.close()
        self.index = PrivateIndex(self.git_dir)
        self._trees: OrderedDict[str, tuple[TreeEntry, ...]] = OrderedDict()
        self._trees_lock = threading.Lock()
        self.object_format = self.run("rev-parse", "--show-object-format").decode().strip() or "sha1"

    @property
    def empty_tree(self) -> str:
        return EMPTY_TREE_SHA256 if self.object_format == "sha256" else EMPTY_TREE_SHA1

    def run(self, *args: str, ok_codes: Sequence[int] = (0,), stdin: bytes | None = None) -> bytes:
        """Run a git command in the work tree and return stdout; failures raise GitError."""
        return self._run(list(args), ok_codes, stdin)[1]

    def start_error(self, error: OSError) -> GitError:
        """Why git could not be started: the repository moved or went away, or git is missing."""
        if isinstance(error, NotADirectoryError):
            return GitError(f"the repository path {self.toplevel} is no longer a directory")
        if not self.toplevel.is_dir():
            return GitError(f"the repository directory {self.toplevel} no longer exists")
        if isinstance(error, FileNotFoundError):
            return GitError("the git executable was not found on PATH")
        return GitError(f"git could not be started in {self.toplevel}: {error}")

    def _run(
        self, args: list[str], ok_codes: Sequence[int], stdin: bytes | None = None, index: Path | None = None
    ) -> tuple[int, bytes]:
        command = ["git", *_PINNED_CONFIG, *args]
        try:
            proc = subprocess.run(
                command,
                check=False,
                cwd=self.toplevel,
                env=_git_env(self.toplevel, index or self.index.path),
                input=stdin if stdin is not None else b"",
                capture_output=True,
            )
        except OSError as e:
            raise self.start_error(e) from None
        if proc.returncode not in ok_codes:
            detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise GitError(f"git {args[0]} failed in {self.toplevel}: {' '.join(detail[-3:]) or proc.returncode}")
        return proc.returncode, proc.stdout

    def head_commit(self) -> str | None:
        """The commit HEAD points to, or None while HEAD is unborn (no commit yet)."""
        code, out = self._run(["rev-parse", "-q", "--verify", "HEAD^{commit}"], ok_codes=(0, 1))
        if code == 0:
            return out.decode().strip()
        code, ref = self._run(["symbolic-ref", "-q", "HEAD"], ok_codes=(0, 1))
        if code == 0:
            branch = ref.decode().strip()
            code, _ = self._run(["rev-parse", "-q", "--verify", branch], ok_codes=(0, 1))
            if code == 1:
                return None
        raise GitError(f"HEAD of {self.toplevel} does not point to a commit")

    def ls_tree(self, commit: str, sizes: bool = True) -> tuple[TreeEntry, ...]:
        """Every entry of the commit's tree, recursively; blob sizes (a lookup of each blob) if ``sizes``.

        With sizes, the last two trees are kept: the base's tree is asked for by the history's rule
        and by the snapshot build at once (3 s each on 100k freshly committed files).
        """
        if not sizes:
            return _parse_tree(self.run("ls-tree", "-r", "-z", "--full-tree", commit))
        with self._trees_lock:
            if commit not in self._trees:
                self._trees[commit] = _parse_tree(self.run("ls-tree", "-r", "-z", "-l", "--full-tree", commit))
                while len(self._trees) > KEPT_TREES:
                    self._trees.popitem(last=False)
            self._trees.move_to_end(commit)
            return self._trees[commit]

    def read_blobs(self, oids: Sequence[str]) -> Generator[bytes]:
        """Contents of the given objects, in order, from ``git cat-file --batch`` (see blobs.py)."""
        return blobs.read_blobs(self, oids)

    def cat_file_command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of a ``cat-file --batch`` process (blobs.py starts them)."""
        return ["git", *_PINNED_CONFIG, "cat-file", "--batch"], _git_env(self.toplevel, self.index.path)

    def working_changes(self, commit: str, big_file_bytes: int | None) -> tuple[list[RawChange], bytes]:
        """Every path whose working-tree state differs from the commit (tracked files only) and, unless
        ``big_file_bytes`` is None, their patch, from one ``diff-index``; a file larger than it is
        given as "Binary files ... differ" (git's core.bigFileThreshold). Callers keep the paths
        they want: a pathspec makes git 2.39 spend time per index entry (24-26 s for one path on a
        100k-file index, against 0.07 s without).
        """
        if big_file_bytes is None:
            raw = self.run("diff-index", "-z", "--no-renames", "--ignore-submodules=none", commit, "--")
            return parse_raw(raw), b""
        threshold = ["-c", f"core.bigFileThreshold={big_file_bytes}"]
        return split_raw(self.run(*threshold, "diff-index", "-z", "--patch-with-raw", *PATCH_FLAGS[1:], commit, "--"))

    def patch_of(self, commit: str, paths: Sequence[bytes]) -> bytes:
        """``git diff-index -p`` limited to the given paths, in batches of 500: for a tree where the
        whole patch fails (a FIFO in place of a file git cannot read), slow on huge indexes."""
        out = []
        for start in range(0, len(paths), 500):
            chunk = [os.fsdecode(p) for p in paths[start : start + 500]]
            out.append(self.run("--literal-pathspecs", "diff-index", *PATCH_FLAGS, commit, "--", *chunk))
        return b"".join(out)

    def renew_index(self) -> None:
        """Renew the private copy of the index (index.py) if the repository's index changed: the
        commands that read the index (``working_changes``, ``untracked_paths``) read the copy."""
        self.index.renew(self._refresh_index)

    def _refresh_index(self, copy: Path) -> None:
        # Split-index off: a refreshed split index would write a new shared index into .git.
        refresh = ["-c", "core.splitIndex=false", "update-index", "-q", "--unmerged", "--ignore-submodules"]
        self._run([*refresh, "--refresh"], ok_codes=(0, 1), index=copy)

    def blob_sizes(self, oids: Sequence[str]) -> dict[str, int]:
        """Sizes of the given blobs (``git cat-file --batch-check``); missing objects are left out."""
        if not oids:
            return {}
        out = self.run("cat-file", "--batch-check", stdin=b"".join(oid.encode() + b"\n" for oid in oids))
        sizes = {}
        for line in out.decode().splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[1] == "blob":
                sizes[fields[0]] = int(fields[2])
        return sizes

    def commit_changes(self, parent: str, commit: str) -> list[RawChange]:
        """What ``commit`` changed against ``parent``, as raw entries."""
        out = self.run("diff-tree", "-r", "-z", "--no-renames", "--ignore-submodules=none", parent, commit, "--")
        return parse_raw(out)

    def untracked_paths(self) -> list[bytes]:
        """Untracked files that are not ignored (``.gitignore``, ``info/exclude``, core.excludesFile)."""
        out = self.run(
            "ls-files",
            "-z",
            "--others",
            "--exclude-standard",
            "--full-name",
            "--",
            ":/",
        )
        return [p for p in out.split(b"\0") if p]


def read_all(repo: GitRepo, oids: Sequence[str]) -> list[bytes]:
    """Every blob's content, in order, from one ``cat-file`` process, stopped even if reading fails."""
    blobs = repo.read_blobs(oids)
    try:
        return list(blobs)
    finally:
        blobs.close()
