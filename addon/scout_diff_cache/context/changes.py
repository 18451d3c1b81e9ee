"""What changed between two states of the repository, as one context message for a continuing conversation.

A state is a commit plus the working-tree contents a working diff brought it to (``WorkState``).
The change from an earlier state to the current one covers new commits and working-tree edits
alike: for each path whose content differs (within the exclusions and the per-file limit) a
unified diff of the earlier content against the current one, in bytewise path order, made with
``difflib`` (deterministic: the same two states give the same bytes on every machine). Applied
after what the conversation already holds, it gives the current state.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ..git.repo import GitRepo, TreeEntry, read_all
from ..memo import ContentMemo
from ..text import decode_utf8, display, is_binary, listing, short_commit
from .framing import system_message_json
from .secrets import Redaction, SecretScanner, redaction_listing
from .workdiff import DiffLimits, WorkState

CONTEXT_LINES = 3
TEXT_START = "Changes to the repository since the previous context message"
NO_NEWLINE = "\\ No newline at end of file\n"


@dataclass(frozen=True)
class Changes:
    """The change message (JSON-encoded once), or nothing when the two states are the same."""

    message_json: bytes
    text: str
    files: int
    left_out: int


@dataclass
class _Found:
    patches: list[str] = field(default_factory=list)
    binary: list[bytes] = field(default_factory=list)
    too_large: list[bytes] = field(default_factory=list)
    redactions: list[Redaction] = field(default_factory=list)


_trees: ContentMemo[dict[bytes, TreeEntry]] = ContentMemo(2)  # a session's turns compare the same commits


def _tree(repo: GitRepo, commit: str | None) -> dict[bytes, TreeEntry]:
    if commit is None:
        return {}
    key = ContentMemo.key(f"{repo.git_dir}\0{commit}".encode())
    return _trees.get_or_make(key, lambda: {e.path: e for e in repo.ls_tree(commit) if e.kind == "blob"})


def _lines(data: bytes) -> list[str]:
    return decode_utf8(data).splitlines(keepends=True)


def file_patch(path: bytes, old: bytes | None, new: bytes | None) -> str:
    """A unified diff of one path, git's header style; ``None`` content: the path does not exist."""
    name = display(path)
    head = [f"diff --git a/{name} b/{name}\n"]
    if old is None:
        head.append("new file\n")
    elif new is None:
        head.append("deleted file\n")
    head.append("--- /dev/null\n" if old is None else f"--- a/{name}\n")
    head.append("+++ /dev/null\n" if new is None else f"+++ b/{name}\n")
    body = []
    for line in difflib.unified_diff(_lines(old or b""), _lines(new or b""), n=CONTEXT_LINES, lineterm="\n"):
        if line.startswith(("---", "+++")):
            continue  # the headers above, with git's /dev/null
        body.append(line if line.endswith("\n") else line + "\n" + NO_NEWLINE)
    return "".join(head + body)


def _content(state: WorkState, tree: dict[bytes, TreeEntry], blobs: dict[str, bytes], path: bytes) -> bytes | None:
    if path in state.dirty:
        return state.dirty[path]
    entry = tree.get(path)
    return None if entry is None else blobs[entry.oid]


def changed_paths(
    prev: WorkState, now: WorkState, prev_tree: dict[bytes, TreeEntry], now_tree: dict[bytes, TreeEntry]
) -> list[bytes]:
    committed = {
        path
        for path in prev_tree.keys() | now_tree.keys()
        if (prev_tree.get(path) or _ABSENT).oid != (now_tree.get(path) or _ABSENT).oid
    }
    return sorted(committed | set(prev.dirty) | set(now.dirty))


_ABSENT = TreeEntry("", "", "", None, b"")


def changes_between(repo: GitRepo, prev: WorkState, now: WorkState, limits: DiffLimits) -> Changes | None:
    """The message that takes a conversation from ``prev`` to ``now`` (blocking: reads git); None if equal."""
    prev_tree, now_tree = _tree(repo, prev.commit), _tree(repo, now.commit)
    found = _Found()
    paths = [p for p in changed_paths(prev, now, prev_tree, now_tree) if not limits.path_filter.excludes(p)]
    wanted = [
        tree[p]
        for p in paths
        for state, tree in ((prev, prev_tree), (now, now_tree))
        if p not in state.dirty and p in tree
    ]
    for entry in wanted:
        if (entry.size or 0) > limits.max_file_bytes:
            found.too_large.append(entry.path)
    found.too_large.extend(now.skipped - prev.skipped)  # changed in the work tree, left out of the diff too
    skip = set(found.too_large)
    oids = sorted({entry.oid for entry in wanted if entry.path not in skip})
    blobs = dict(zip(oids, read_all(repo, oids), strict=True))
    for path in paths:
        if path in skip:
            continue
        old, new = _content(prev, prev_tree, blobs, path), _content(now, now_tree, blobs, path)
        if old == new:
            continue
        if any(data is not None and len(data) > limits.max_file_bytes for data in (old, new)):
            found.too_large.append(path)
        elif any(data is not None and is_binary(data) for data in (old, new)):
            found.binary.append(path)
        else:
            redactions: list[Redaction] = []
            if limits.secrets is not None:  # both sides: the diff of the redacted texts
                old, new = (_redacted(limits.secrets, path, data, redactions) for data in (old, new))
            patch = file_patch(path, old, new)
            if "[redacted " in patch:  # listed when the patch shows one (not for lines outside its hunks)
                found.redactions.extend(redactions)
            found.patches.append(patch)
    if not (found.patches or found.binary or found.too_large):
        return None
    return _render(prev, now, found, limits)


def _redacted(secrets: SecretScanner, path: bytes, data: bytes | None, redactions: list[Redaction]) -> bytes | None:
    if data is None:
        return None
    data, found = secrets.redact(path, data)
    redactions.extend(found)
    return data


def _render(prev: WorkState, now: WorkState, found: _Found, limits: DiffLimits) -> Changes:
    moved = (
        f"HEAD moved from {short_commit(prev.commit)} to {short_commit(now.commit)}"
        if prev.commit != now.commit
        else f"HEAD is still {short_commit(now.commit)}"
    )
    left_out = listing("changed binary files, not shown", [display(p) for p in sorted(found.binary)]) + listing(
        f"changed files not shown: over the per-file limit of {limits.max_file_bytes} bytes, or left out "
        "of the working diff (its size limit, or to fit the window)",
        [display(p) for p in sorted(set(found.too_large))],
    )
    text = (
        f"{TEXT_START} ({moved}; commits and uncommitted "
        "edits alike), as a unified diff against the state the earlier context messages describe. "
        "Apply it after them: the result is the repository now.\n\n"
        + "".join(found.patches)
        + f"<changes_info>\nfiles changed: {len(found.patches)}\n{left_out}</changes_info>\n"
        + redaction_listing(found.redactions)
    )
    return Changes(system_message_json(text), text, len(found.patches), len(found.binary) + len(set(found.too_large)))
