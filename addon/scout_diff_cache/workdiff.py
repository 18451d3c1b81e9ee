"""The working diff (system message 2): uncommitted changes against the snapshot's commit.

Tracked changes come from ``git diff-index -p <commit>`` (which, unlike ``git diff HEAD``,
never rewrites the index); untracked, non-ignored files are rendered here as new-file patches,
byte-identical to ``git diff --no-index --full-index /dev/null <file>``. Both go through the
snapshot's exclusions and per-file limit (a file's size in the commit and in the working tree, not
its patch's); past ``max_diff_bytes`` files are left out in path order and named in a note.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from .exclusions import PathFilter
from .gitrepo import GitRepo, RawChange
from .snapshot import system_message_json
from .text import decode_text, display, is_binary

# A listing of left-out files longer than this names the first ones and counts the rest.
MAX_LISTED_PATHS = 1000

_C_ESCAPES = {
    7: "a",
    8: "b",
    9: "t",
    10: "n",
    11: "v",
    12: "f",
    13: "r",
    34: '"',
    92: "\\",
}
_C_UNESCAPES = {v: k for k, v in _C_ESCAPES.items()}


@dataclass(frozen=True)
class DiffLimits:
    max_file_bytes: int
    max_diff_bytes: int
    path_filter: PathFilter


@dataclass(frozen=True)
class WorkingDiff:
    commit: str | None
    text: str
    message_json: bytes
    included_files: int
    left_out_files: int

    @property
    def size(self) -> int:
        return len(self.message_json)


@dataclass
class DiffParts:
    """The per-file patches that made it in, and the files left out with their reason."""

    patches: list[str] = field(default_factory=list)
    patch_bytes: int = 0
    excluded: list[bytes] = field(default_factory=list)
    too_large: list[bytes] = field(default_factory=list)
    over_total: list[bytes] = field(default_factory=list)
    nested_repos: list[bytes] = field(default_factory=list)


def git_quote(name: bytes) -> str:
    """git's quote_c_style with core.quotePath=false: quoted only if it holds '"', '\\' or controls."""
    if not any(b < 0x20 or b == 0x7F or b in (34, 92) for b in name):
        return decode_text(name)
    out = bytearray(b'"')
    for b in name:
        if b in _C_ESCAPES:
            out += b"\\" + _C_ESCAPES[b].encode()
        elif b < 0x20 or b == 0x7F:
            out += b"\\%03o" % b
        else:
            out.append(b)
    out += b'"'
    return decode_text(bytes(out))


def git_unquote(text: bytes) -> bytes:
    """Inverse of git_quote for one quoted name (without the surrounding quotes)."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == 92 and i + 1 < len(text):
            nxt = chr(text[i + 1])
            if nxt in _C_UNESCAPES:
                out.append(_C_UNESCAPES[nxt])
                i += 2
                continue
            out.append(int(text[i + 1 : i + 4], 8))
            i += 4
            continue
        out.append(text[i])
        i += 1
    return bytes(out)


def blob_id(data: bytes, object_format: str) -> str:
    """The object id git gives a blob with this content."""
    return hashlib.new(object_format, b"blob %d\0" % len(data) + data).hexdigest()


def new_file_patch(path: bytes, data: bytes, mode: str, object_format: str) -> str:
    """A new-file patch for an untracked file, as ``git diff --no-index --full-index`` writes it."""
    name_a, name_b = git_quote(b"a/" + path), git_quote(b"b/" + path)
    zeros = "0" * (64 if object_format == "sha256" else 40)
    head = f"diff --git {name_a} {name_b}\nnew file mode {mode}\nindex {zeros}..{blob_id(data, object_format)}\n"
    if not data:
        return head
    if is_binary(data):
        return head + f"Binary files /dev/null and {name_b} differ\n"
    tab = "\t" if b" " in path else ""
    text = decode_text(data)
    lines = text.split("\n")
    missing_newline = lines[-1] != ""
    if not missing_newline:
        lines.pop()
    count = "" if len(lines) == 1 else f",{len(lines)}"
    body = "".join(f"+{line}\n" for line in lines)
    tail = "\\ No newline at end of file\n" if missing_newline else ""
    return f"{head}--- /dev/null\n+++ {name_b}{tab}\n@@ -0,0 +1{count} @@\n{body}{tail}"


def patch_path(header_line: bytes) -> bytes:
    """The path of a ``diff --git a/P b/P`` header.

    Renames are off, so both names are the same path and, quoted or not, the same length: the
    first name is the first half. (Looking for the closing quote instead is wrong for names that
    hold an escaped quote followed by a space.)
    """
    names = header_line.removeprefix(b"diff --git ")
    first = names[: (len(names) - 1) // 2]
    if first.startswith(b'"') and first.endswith(b'"') and len(first) > 1:
        first = git_unquote(first[1:-1])
    return first.removeprefix(b"a/")


def split_patch(patch: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Split multi-file patch output into (path, per-file patch); a file's patch starts at 'diff --git '."""
    if not patch:
        return
    starts = [0] if patch.startswith(b"diff --git ") else []
    position = patch.find(b"\ndiff --git ")
    while position >= 0:
        starts.append(position + 1)
        position = patch.find(b"\ndiff --git ", position + 1)
    for begin, end in zip(starts, [*starts[1:], len(patch)], strict=True):
        chunk = patch[begin:end]
        yield (
            patch_path(chunk[: chunk.index(b"\n")] if b"\n" in chunk else chunk),
            chunk,
        )


def _file_mode(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "120000"
    return "100755" if st.st_mode & stat.S_IXUSR else "100644"


@dataclass(frozen=True)
class Candidate:
    """A changed path that passed exclusions; an untracked file (no patch yet) is read only when reached."""

    path: bytes
    tracked_patch: bytes | None = None


def collect_changes(repo: GitRepo, commit: str, limits: DiffLimits, parts: DiffParts) -> list[Candidate]:
    """Every changed path that passes exclusions and the per-file limit, in bytewise path order.

    Tracked patches come from one git call up front; untracked files are read later, lazily, so
    files past the total limit are never read.
    """
    tracked: list[bytes] = []
    changes = repo.changed_paths(commit)
    old_sizes = repo.blob_sizes(sorted({c.old_oid for c in changes if c.old_mode in _BLOB_MODES}))
    for change in changes:
        old_size = old_sizes.get(change.old_oid, 0) if change.old_mode in _BLOB_MODES else 0
        new_size = _size_on_disk(repo, change.path) if change.status != "D" else 0
        excluded = limits.path_filter.excludes(change.path)
        too_large = max(old_size, new_size) > limits.max_file_bytes
        if (excluded or too_large) and _unchanged(repo, change, old_size, new_size):
            continue  # only its stat data changed (a touch): no patch, and nothing to report
        if excluded:
            parts.excluded.append(change.path)
        elif too_large:
            parts.too_large.append(change.path)
        else:
            tracked.append(change.path)
    # A pathspec matches a folder's contents too (a file replaced by a folder): keep only the paths asked for.
    wanted = set(tracked)
    candidates = [Candidate(path, chunk) for path, chunk in split_patch(repo.patch(commit, tracked)) if path in wanted]
    for path in repo.untracked_paths():
        if path.endswith(b"/"):
            parts.nested_repos.append(path.rstrip(b"/"))
        elif limits.path_filter.excludes(path):
            parts.excluded.append(path)
        else:
            candidates.append(Candidate(path))
    return sorted(candidates, key=lambda c: c.path)


_BLOB_MODES = ("100644", "100755", "120000")


def _unchanged(repo: GitRepo, change: RawChange, old_size: int, new_size: int) -> bool:
    """True when a path git reports as modified only has new stat data, its content and mode as committed.

    ``git diff-index -p`` leaves such a path out of the patch by itself; this check is for paths
    that are reported without a patch (excluded, or over the per-file limit). Content that only a
    clean filter (autocrlf, LFS) would make equal counts as changed.
    """
    if change.status != "M" or change.old_mode != change.new_mode or change.old_mode not in _BLOB_MODES:
        return False
    if change.new_oid.strip("0") or old_size != new_size:
        return False
    try:
        data = _read_entry(_work_tree_path(repo, change.path), is_link=change.new_mode == "120000")
    except OSError:
        return False
    return data is not None and blob_id(data, repo.object_format) == change.old_oid


def _size_on_disk(repo: GitRepo, path: bytes) -> int:
    try:
        return os.lstat(_work_tree_path(repo, path)).st_size
    except OSError:
        return 0


def _untracked_patch(repo: GitRepo, path: bytes, limits: DiffLimits) -> bytes | None:
    """The new-file patch of an untracked file; None if it vanished; b"" if over the per-file limit."""
    full = _work_tree_path(repo, path)
    try:
        st = os.lstat(full)
        if st.st_size > limits.max_file_bytes:
            return b""
        data = _read_entry(full, is_link=stat.S_ISLNK(st.st_mode))
    except OSError:
        return None
    if data is None:
        return None
    return new_file_patch(path, data, _file_mode(st), repo.object_format).encode("utf-8")


def _work_tree_path(repo: GitRepo, path: bytes) -> bytes:
    return os.path.join(os.fsencode(repo.toplevel), path)


def _read_entry(full: bytes, is_link: bool) -> bytes | None:
    """What git would hash for this path: a link's target, or a regular file's content."""
    return os.readlink(full) if is_link else _read_file(full)


def _read_file(path: bytes) -> bytes | None:
    """A regular file's content; None for anything else (a FIFO would block, a symlink is not followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read()


def select_patches(repo: GitRepo, candidates: list[Candidate], limits: DiffLimits, parts: DiffParts) -> None:
    """Take patches in path order until the total limit; the first that does not fit and all after are left out."""
    for index, candidate in enumerate(candidates):
        if candidate.tracked_patch is not None:
            patch: bytes | None = candidate.tracked_patch
        else:
            patch = _untracked_patch(repo, candidate.path, limits)
        if patch is None:
            continue
        if not patch:
            parts.too_large.append(candidate.path)
            continue
        text = decode_text(patch)
        size = len(patch) if text.isascii() else len(text.encode("utf-8"))  # as sent, after U+FFFD
        if parts.patch_bytes + size > limits.max_diff_bytes:
            parts.over_total.extend(c.path for c in candidates[index:])
            return
        parts.patches.append(text)
        parts.patch_bytes += size


def _listing(title: str, paths: list[bytes]) -> str:
    if not paths:
        return ""
    shown = sorted(paths)[:MAX_LISTED_PATHS]
    lines = [f"{title} ({len(paths)}):", *(f"  {display(p)}" for p in shown)]
    if len(paths) > len(shown):
        lines.append(f"  ... and {len(paths) - len(shown)} more not named here")
    return "\n".join(lines) + "\n"


def render_working_diff(commit: str | None, parts: DiffParts, limits: DiffLimits, operation: str | None) -> WorkingDiff:
    against = f"commit {commit}" if commit else "an empty repository (no commits yet)"
    state = f"Note: {operation} is in progress in this repository.\n" if operation else ""
    left_out = (
        _listing("changed files excluded by path pattern", parts.excluded)
        + _listing(
            f"changed files over the per-file limit of {limits.max_file_bytes} bytes",
            parts.too_large,
        )
        + _listing(
            f"changed files left out because the diff reached its limit of {limits.max_diff_bytes} bytes "
            "(every file from this one on, in path order)",
            parts.over_total,
        )
        + _listing("nested git repositories, not entered", parts.nested_repos)
    )
    left_out_count = len(parts.excluded) + len(parts.too_large) + len(parts.over_total) + len(parts.nested_repos)
    if not parts.patches and not left_out:
        text = f"The working tree is clean: no uncommitted changes against {against}.\n{state}"
    else:
        text = (
            f"Uncommitted changes in the working tree against {against}: staged and unstaged edits to "
            "tracked files, and untracked files (not ignored) as new files, as a git unified diff.\n"
            f"{state}\n"
            + "".join(parts.patches)
            + f"<diff_info>\nfiles included: {len(parts.patches)}, bytes: {parts.patch_bytes}\n{left_out}</diff_info>\n"
        )
    return WorkingDiff(
        commit=commit,
        text=text,
        message_json=system_message_json(text),
        included_files=len(parts.patches),
        left_out_files=left_out_count,
    )


def operation_in_progress(repo: GitRepo) -> str | None:
    """A merge, rebase, cherry-pick, revert or bisect under way, by git's own marker files."""
    markers = (
        ("rebase-merge", "a rebase"),
        ("rebase-apply", "a rebase or git am"),
        ("MERGE_HEAD", "a merge"),
        ("CHERRY_PICK_HEAD", "a cherry-pick"),
        ("REVERT_HEAD", "a revert"),
        ("BISECT_LOG", "a bisect"),
    )
    for name, label in markers:
        if (repo.git_dir / name).exists():
            return label
    return None


# Reads of the changed paths are retried this many times while the index keeps changing under them.
INDEX_READ_ATTEMPTS = 5


def index_identity(repo: GitRepo) -> tuple[int, int, int] | None:
    """Inode, size and mtime of the index: git replaces it by rename, so any update changes this."""
    try:
        st = os.stat(repo.git_dir / "index")
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def build_working_diff(repo: GitRepo, commit: str | None, limits: DiffLimits) -> WorkingDiff:
    """Compute the working diff against ``commit`` (blocking; run it in a thread).

    The tracked changes (``diff-index``) and the untracked files (``ls-files``) are two reads of
    the index. A ``git add`` between them moved a new file from untracked to tracked after the
    first read and before the second, and it was in neither; a ``git rm --cached`` put one in both.
    So the reads are repeated while the index changed under them (the file watcher also sees that
    change, so the next request re-reads in any case).
    """
    base = commit if commit is not None else repo.empty_tree
    for _ in range(INDEX_READ_ATTEMPTS):
        before = index_identity(repo)
        parts = DiffParts()
        candidates = collect_changes(repo, base, limits, parts)
        if index_identity(repo) == before:
            break
    select_patches(repo, candidates, limits, parts)
    return render_working_diff(commit, parts, limits, operation_in_progress(repo))
