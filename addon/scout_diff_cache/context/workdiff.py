"""The working diff (system message 2): uncommitted changes against the snapshot's commit.

Tracked changes come from ``git diff-index -p <commit>`` (which, unlike ``git diff HEAD``,
never rewrites the index); untracked, non-ignored files are rendered here as new-file patches,
byte-identical to ``git diff --no-index --full-index /dev/null <file>``. Both go through the
snapshot's exclusions and per-file limit (a file's size in the commit and in the working tree, not
its patch's); past ``max_diff_bytes`` files are left out in path order and named in a note.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ..git.errors import GitError
from ..git.exclusions import PathFilter
from ..git.patches import blob_id, new_file_patch, split_patch
from ..git.repo import BLOB_MODES, MODE_EXECUTABLE, MODE_FILE, MODE_SYMLINK, GitRepo, RawChange
from ..text import decode_utf8, display, listing
from .framing import system_message_json
from .secrets import Redaction, SecretScanner, redaction_listing


@dataclass(frozen=True)
class DiffLimits:
    max_file_bytes: int
    max_diff_bytes: int
    path_filter: PathFilter
    secrets: SecretScanner | None = None  # None: nothing is redacted (REDACT_SECRETS=false)


@dataclass(frozen=True)
class WorkState:
    """The repository as a context message describes it: a commit plus these working-tree contents."""

    commit: str | None
    dirty: Mapping[bytes, bytes | None]  # path -> content (None: deleted); every other path as committed
    skipped: frozenset[bytes] = frozenset()  # changed, but not shown: over a size limit, or cut to fit


@dataclass(frozen=True)
class WorkingDiff:
    commit: str | None
    text: str
    message_json: bytes
    included_files: int
    left_out_files: int
    # What it was rendered from, to render it again with fewer patches (``cut_to_fit``).
    parts: DiffParts | None = field(default=None, compare=False, repr=False)
    limits: DiffLimits | None = field(default=None, compare=False, repr=False)
    operation: str | None = None

    @property
    def state(self) -> WorkState:
        """The state this diff (as cut, if it was) brings its commit to."""
        if self.parts is None:
            return WorkState(self.commit, {})
        parts = self.parts
        skipped = frozenset((*parts.too_large, *parts.over_total, *parts.over_window))
        return WorkState(self.commit, {path: parts.contents.get(path) for path in parts.patch_paths}, skipped)

    @property
    def redacted(self) -> int:
        """Secrets redacted in the patches it gives."""
        return 0 if self.parts is None else len(self.parts.redactions_shown())

    @property
    def size(self) -> int:
        return len(self.message_json)


@dataclass
class DiffParts:
    """The per-file patches that made it in, and the files left out with their reason."""

    patches: list[str] = field(default_factory=list)
    patch_paths: list[bytes] = field(default_factory=list)
    patch_bytes: int = 0
    over_window: list[bytes] = field(default_factory=list)
    window_tokens: int = 0  # the window over_window was cut for
    # The working-tree content of each included path when it was read (None: deleted): the state the
    # diff brings the commit to, for the next conversation turn's changes (changes.py).
    contents: dict[bytes, bytes | None] = field(default_factory=dict)
    excluded: list[bytes] = field(default_factory=list)
    too_large: list[bytes] = field(default_factory=list)
    over_total: list[bytes] = field(default_factory=list)
    nested_repos: list[bytes] = field(default_factory=list)
    redactions: list[Redaction] = field(default_factory=list)  # secrets replaced in the patches

    def redactions_shown(self) -> list[Redaction]:
        """The redactions in the patches the diff gives (not in those cut to fit the window)."""
        shown = set(self.patch_paths)
        return [redaction for redaction in self.redactions if redaction.path in shown]


def _file_mode(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return MODE_SYMLINK
    return MODE_EXECUTABLE if st.st_mode & stat.S_IXUSR else MODE_FILE


_UNTRACKED_LISTING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="scout-untracked")


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
    repo.renew_index()
    untracked = _UNTRACKED_LISTING.submit(repo.untracked_paths)  # its walk of the tree, on another core
    try:
        changes, patch = repo.working_changes(commit, limits.max_file_bytes)
    except GitError:  # a changed path git cannot read (a FIFO in place of a file): patch only the wanted ones
        changes, patch = repo.working_changes(commit, None)[0], None
    old_sizes = repo.blob_sizes(sorted({c.old_oid for c in changes if c.old_mode in BLOB_MODES}))
    for change in changes:
        old_size = old_sizes.get(change.old_oid, 0) if change.old_mode in BLOB_MODES else 0
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
    # The patch covers every changed path: keep the wanted ones (not excluded nor too large; a path that
    # became a folder shows its new files under it too).
    wanted = set(tracked)
    if patch is None:
        patch = repo.patch_of(commit, tracked) if tracked else b""
    candidates = [Candidate(path, chunk) for path, chunk in split_patch(patch) if path in wanted]
    for path in untracked.result():
        if path.endswith(b"/"):
            parts.nested_repos.append(path.rstrip(b"/"))
        elif limits.path_filter.excludes(path):
            parts.excluded.append(path)
        else:
            candidates.append(Candidate(path))
    return sorted(candidates, key=lambda c: c.path)


def _unchanged(repo: GitRepo, change: RawChange, old_size: int, new_size: int) -> bool:
    """True when a path git reports as modified only has new stat data, its content and mode as committed.

    ``git diff-index -p`` leaves such a path out of the patch by itself; this check is for paths
    that are reported without a patch (excluded, or over the per-file limit). Content that only a
    clean filter (autocrlf, LFS) would make equal counts as changed.
    """
    if change.status != "M" or change.old_mode != change.new_mode or change.old_mode not in BLOB_MODES:
        return False
    if change.new_oid.strip("0") or old_size != new_size:
        return False
    try:
        data = _read_entry(_work_tree_path(repo, change.path), is_link=change.new_mode == MODE_SYMLINK)
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


def _work_content(repo: GitRepo, path: bytes) -> bytes | None:
    """What the work tree holds at ``path`` (a file's bytes, a link's target); None when nothing is there."""
    full = _work_tree_path(repo, path)
    try:
        st = os.lstat(full)
        return None if stat.S_ISDIR(st.st_mode) else _read_entry(full, is_link=stat.S_ISLNK(st.st_mode))
    except OSError:
        return None


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
        if limits.secrets is not None:
            patch, found = limits.secrets.redact_patch(candidate.path, patch)
            parts.redactions.extend(found)
        text = decode_utf8(patch)
        size = len(patch) if text.isascii() else len(text.encode("utf-8"))  # as sent, after U+FFFD
        if parts.patch_bytes + size > limits.max_diff_bytes:
            parts.over_total.extend(c.path for c in candidates[index:])
            return
        parts.patches.append(text)
        parts.patch_paths.append(candidate.path)
        parts.patch_bytes += size
        parts.contents[candidate.path] = _work_content(repo, candidate.path)


def _listing(title: str, paths: list[bytes]) -> str:
    return listing(title, [display(p) for p in sorted(paths)])


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
        + _listing(
            f"changed files left out so the request fits the model's context window of {parts.window_tokens} "
            "tokens (every file from this one on, in path order; ask about them by name, or commit them)",
            parts.over_window,
        )
    )
    left_out_count = (
        len(parts.excluded) + len(parts.too_large) + len(parts.over_total) + len(parts.nested_repos)
    ) + len(parts.over_window)
    if not parts.patches and not left_out:
        text = f"The working tree is clean: no uncommitted changes against {against}.\n{state}"
    else:
        text = (
            f"Uncommitted changes in the working tree against {against}: staged and unstaged edits to "
            "tracked files, and untracked files (not ignored) as new files, as a git unified diff.\n"
            f"{state}\n"
            + "".join(parts.patches)
            + f"<diff_info>\nfiles included: {len(parts.patches)}, bytes: {parts.patch_bytes}\n{left_out}</diff_info>\n"
            + redaction_listing(parts.redactions_shown())
        )
    return WorkingDiff(
        commit=commit,
        text=text,
        message_json=system_message_json(text),
        included_files=len(parts.patches),
        left_out_files=left_out_count,
        parts=parts,
        limits=limits,
        operation=operation,
    )


def cut_to_fit(diff: WorkingDiff, keep: int, window_tokens: int) -> WorkingDiff:
    """The diff with only its first ``keep`` file patches (path order); the others named as left out."""
    assert diff.parts is not None and diff.limits is not None
    parts = diff.parts
    kept = parts.patches[:keep]
    cut = replace(
        parts,
        patches=kept,
        patch_paths=parts.patch_paths[:keep],
        patch_bytes=sum(len(patch.encode("utf-8")) for patch in kept),
        over_window=parts.patch_paths[keep:],
        window_tokens=window_tokens,
    )
    return render_working_diff(diff.commit, cut, diff.limits, diff.operation)


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
