"""History blocks: what one commit changed against its first parent, as message 1's history carries it.

A block holds the commit's message and, per changed file within the exclusions and the per-file
limit, its patch (or with ``full_files`` its full new text); the files left out and the secrets
redacted are listed at its end (history.py puts the blocks in order).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..git.commits import BIG_FILE_LIMIT_FACTOR, CommitDiff, commit_diffs
from ..git.exclusions import PathFilter
from ..git.repo import MODE_MISSING, MODE_SUBMODULE, MODE_SYMLINK, GitRepo, RawChange, read_all
from ..text import decode_utf8, display, is_binary, listing, quoted
from .secrets import COMMIT_MESSAGE, Redaction, redaction_listing
from .snapshot import SnapshotLimits, file_block


class BlockRenderer:
    """Renders commits' blocks, many from one ``commit_diffs`` call (blocking: run it in a thread)."""

    def __init__(self, repo: GitRepo, snapshot_limits: SnapshotLimits, full_files: bool) -> None:
        self.repo = repo
        self.snapshot_limits = snapshot_limits
        self.full_files = full_files

    def render(self, commits: Sequence[str]) -> list[tuple[str, str, int]]:
        """(commit, block, secrets redacted in it) for each commit, in order."""
        if not commits:
            return []
        limits = self.snapshot_limits
        diffs = commit_diffs(self.repo, commits, limits.max_file_bytes, patches=not self.full_files)
        over_big_file_limit = self._over_big_file_limit(diffs)
        return [(diff.commit, *self._render(diff, over_big_file_limit)) for diff in diffs]

    def _render(self, diff: CommitDiff, over_big_file_limit: set[tuple[str, bytes]]) -> tuple[str, int]:
        path_filter: PathFilter = self.snapshot_limits.path_filter
        excluded = sorted(c.path for c in diff.changes if path_filter.excludes(c.path))
        kept = sorted((c for c in diff.changes if not path_filter.excludes(c.path)), key=lambda c: c.path)
        too_large: list[bytes] = []
        found: list[Redaction] = []
        if self.full_files:
            body = self._full_files(kept, too_large, found)
        else:
            body = self._patches(diff, kept, over_big_file_limit, too_large, found)
        message = diff.message
        secrets = self.snapshot_limits.secrets
        if secrets is not None:
            message, in_message = secrets.redact(COMMIT_MESSAGE, message)
            found.extend(in_message)
        parent_attribute = f' parent="{diff.parent}"' if diff.parent else ""
        notes = (
            _listing("changed files excluded by path pattern", excluded)
            + _listing(
                f"changed files over the per-file limit of {self.snapshot_limits.max_file_bytes} bytes", too_large
            )
            + redaction_listing(found)
        )
        text = decode_utf8(message)
        if text and not text.endswith("\n"):
            text += "\n"
        block = f'<commit id="{diff.commit}"{parent_attribute}>\n<message>\n{text}</message>\n{body}{notes}</commit>\n'
        return block, len(found)

    def _patches(
        self,
        diff: CommitDiff,
        kept: Sequence[RawChange],
        over_big_file_limit: set[tuple[str, bytes]],
        too_large: list[bytes],
        found: list[Redaction],
    ) -> str:
        wanted = {c.path for c in kept}
        parts = []
        for path, file_patch in diff.patches:
            if path not in wanted:
                continue  # excluded, or under a kept path that became a folder (conf -> conf/.env)
            if len(file_patch) > self.snapshot_limits.max_file_bytes or (diff.commit, path) in over_big_file_limit:
                if path not in too_large:
                    too_large.append(path)
                continue
            sent = file_patch
            if self.snapshot_limits.secrets is not None:  # removed lines too: a secret taken out is still one
                sent, in_patch = self.snapshot_limits.secrets.redact_patch(path, file_patch)
                found.extend(in_patch)
            parts.append(decode_utf8(sent))
        return "".join(parts)

    def _over_big_file_limit(self, diffs: Sequence[CommitDiff]) -> set[tuple[str, bytes]]:
        """(commit, path) of changes git called binary only for their size (commits.BIG_FILE_LIMIT_FACTOR)."""
        binary: list[tuple[str, RawChange]] = []
        for diff in diffs:
            paths = {path for path, patch in diff.patches if b"\nBinary files " in patch}
            binary.extend((diff.commit, change) for change in diff.changes if change.path in paths)
        if not binary:
            return set()
        sizes = self.repo.blob_sizes(sorted({oid for _, c in binary for oid in (c.old_oid, c.new_oid)}))
        limit = self.snapshot_limits.max_file_bytes * BIG_FILE_LIMIT_FACTOR
        return {
            (commit, c.path) for commit, c in binary if max(sizes.get(c.old_oid, 0), sizes.get(c.new_oid, 0)) > limit
        }

    def _full_files(self, kept: Sequence[RawChange], too_large: list[bytes], found: list[Redaction]) -> str:
        present = [c for c in kept if c.new_mode not in (MODE_MISSING, MODE_SUBMODULE)]
        sizes = self.repo.blob_sizes([c.new_oid for c in present])
        readable = [c for c in present if sizes.get(c.new_oid, 0) <= self.snapshot_limits.max_file_bytes]
        too_large.extend(c.path for c in present if c not in readable)
        contents = dict(
            zip((c.path for c in readable), read_all(self.repo, [c.new_oid for c in readable]), strict=True)
        )
        parts = []
        for change in kept:
            if change.new_mode == MODE_MISSING:
                parts.append(f"<deleted path={quoted(change.path)}/>\n")
            elif change.new_mode == MODE_SUBMODULE:
                parts.append(f"<submodule path={quoted(change.path)} commit={quoted(change.new_oid.encode())}/>\n")
            elif change.path in contents:
                data = contents[change.path]
                if change.new_mode == MODE_SYMLINK:
                    parts.append(f"<symlink path={quoted(change.path)} target={quoted(data)}/>\n")
                elif is_binary(data):
                    parts.append(f"<binary path={quoted(change.path)} bytes={len(data)}/>\n")
                else:
                    if self.snapshot_limits.secrets is not None:
                        data, in_file = self.snapshot_limits.secrets.redact(change.path, data, oid=change.new_oid)
                        found.extend(in_file)
                    parts.append(file_block(change.path, data))
        return "".join(parts)


def _listing(title: str, paths: Sequence[bytes]) -> str:
    block = listing(title, [display(p) for p in paths])
    return f"<left_out>\n{block}</left_out>\n" if block else ""
