"""One repository's entries in the build cache (buildcache.py): scopes, and message 1's bases as entries."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ..git.repo import GitRepo
from ..text import human_bytes, path_key, short_commit
from .buildcache import BuildCache, Entry, Scope
from .fit import FitReport, Omitted, Outlined, WindowBudget
from .snapshot import Snapshot, SnapshotLimits

logger = logging.getLogger(__name__)


def repository_identity(repo: GitRepo) -> list[str]:
    """What, besides a commit, shapes what is read from this repository: where it is, git's diff
    configuration and its attributes file (read at every start: a user may edit them between)."""
    diff_config = repo.run("config", "--get-regexp", r"^diff\.", ok_codes=(0, 1))  # 1: none set
    try:
        attributes = (repo.common_dir / "info" / "attributes").read_bytes()
    except OSError:
        attributes = b""
    return [str(repo.common_dir.resolve()), hashlib.sha256(diff_config + b"\0" + attributes).hexdigest()]


def limits_key(limits: SnapshotLimits) -> tuple[object, ...]:
    """The snapshot settings as plain values, for a scope."""
    secrets = limits.secrets.key if limits.secrets is not None else None
    return (limits.max_file_bytes, limits.max_snapshot_bytes, limits.path_filter.patterns, secrets)


class RepositoryBuilds:
    """One repository's entries under one set of settings (their scopes worked out once, at start)."""

    def __init__(self, cache: BuildCache, repo: GitRepo, limits: SnapshotLimits, full_files: bool) -> None:
        self.cache = cache
        self.repo = repo
        repository = repository_identity(repo)
        self._bases = Scope.of(repository, ("bases", limits_key(limits)))
        self._blocks = Scope.of(repository, ("blocks", limits_key(limits), full_files))
        self._sizes = Scope.of(repository, ("sizes", limits_key(limits)))
        self._depths = Scope.of(repository, ("depths",))

    def snapshot(
        self, commit: str, preamble: str, budget: WindowBudget | None, build: Callable[[], Snapshot]
    ) -> Snapshot:
        """The snapshot ``build`` makes, read back if it was kept, else built and kept. Blocking.

        A fitted base is keyed by its budget: the share's tokens and the measure's identity (for the
        upstream's tokenizer: its address, model and count of a probe text), so a plan made with one
        model's tokenizer is never read back for another.
        """
        key = self._bases.key(commit, preamble, budget.key if budget is not None else None)
        started = time.perf_counter()
        entry = self.cache.read("bases", key)
        if entry is not None:
            found = snapshot_from_entry(entry)
            logger.info(
                "snapshot %s read from the build cache in %.2f s (%s)",
                short_commit(commit),
                time.perf_counter() - started,
                human_bytes(found.size),
            )
            return found
        snapshot = build()
        self.cache.write("bases", key, *snapshot_entry(snapshot))
        return snapshot

    def block(self, commit: str) -> tuple[str, int] | None:
        """A commit's history block and the secrets redacted in it."""
        entry = self.cache.read("blocks", self._blocks.key(commit))
        if entry is None:
            return None
        return entry.payload.decode("utf-8", "surrogatepass"), int(entry.meta["redacted"])

    def save_block(self, commit: str, block: str, redacted: int) -> None:
        payload = block.encode("utf-8", "surrogatepass")
        self.cache.write("blocks", self._blocks.key(commit), {"redacted": redacted}, payload)

    def depth(self, commit: str) -> int | None:
        """HEAD's first-parent depth (never in a shallow clone: there it counts what the clone has)."""
        if self._shallow():
            return None
        entry = self.cache.read("depths", self._depths.key(commit))
        return int(entry.meta["depth"]) if entry is not None else None

    def save_depth(self, commit: str, depth: int) -> None:
        if not self._shallow():
            self.cache.write("depths", self._depths.key(commit), {"depth": depth}, b"")

    def base_size(self, commit: str) -> int | None:
        entry = self.cache.read("sizes", self._sizes.key(commit))
        return int(entry.meta["bytes_included"]) if entry is not None else None

    def save_base_size(self, commit: str, size: int) -> None:
        self.cache.write("sizes", self._sizes.key(commit), {"bytes_included": size}, b"")

    def _shallow(self) -> bool:
        return (self.repo.common_dir / "shallow").exists() or (self.repo.common_dir / "info" / "grafts").exists()


def snapshot_entry(snapshot: Snapshot) -> tuple[dict[str, Any], bytes]:
    """A base snapshot as an entry: its counts, regions and fit report, and its message bytes."""
    fit = snapshot.fit
    meta = {
        "commit": snapshot.commit,
        "file_count": snapshot.file_count,
        "symlink_count": snapshot.symlink_count,
        "skipped_count": snapshot.skipped_count,
        "regions": snapshot.regions,
        "outline_count": snapshot.outline_count,
        "redacted": snapshot.redacted,
        "fit": None
        if fit is None
        else {
            "budget": fit.budget,
            "measure": fit.measure,
            "repository_tokens": fit.repository_tokens,
            "planned_tokens": fit.planned_tokens,
            "cut": fit.cut,
            "outlined": [(path_key(o.path), o.tokens, o.full_tokens) for o in fit.outlined],
            "omitted": [(path_key(o.path), o.tokens) for o in fit.omitted],
            "tiers": fit.tiers,
        },
    }
    return meta, snapshot.message_json


def snapshot_from_entry(entry: Entry) -> Snapshot:
    """The base snapshot ``snapshot_entry`` stored (its prefix key from the checksum just verified)."""
    meta = entry.meta
    fit = meta["fit"]
    return Snapshot(
        commit=meta["commit"],
        message_json=entry.payload,
        file_count=meta["file_count"],
        symlink_count=meta["symlink_count"],
        skipped_count=meta["skipped_count"],
        base_commit=meta["commit"],
        regions=tuple((offset, label) for offset, label in meta["regions"]),
        fit=None
        if fit is None
        else FitReport(
            budget=fit["budget"],
            measure=fit["measure"],
            repository_tokens=fit["repository_tokens"],
            planned_tokens=fit["planned_tokens"],
            cut=fit["cut"],
            outlined=[Outlined(_path(path), tokens, full) for path, tokens, full in fit["outlined"]],
            omitted=[Omitted(_path(path), tokens) for path, tokens in fit["omitted"]],
            tiers=fit["tiers"],
        ),
        outline_count=meta["outline_count"],
        redacted=meta["redacted"],
        prefix_key=entry.sha256[:16],
    )


def _path(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")
