"""Rendered work kept on disk across restarts: base snapshots, history blocks, depths and base sizes.

A restart, or a second proxy on the same machine, finds message 1's base and the history blocks
already rendered: its first answer reads them back (about 50 ms for a 40 MB base, checksum
included) instead of reading every blob again (one ``git archive`` of CPU), making the tail's
patches and walking the first-parent chain to count HEAD's depth.

Every entry is named by SHA-256 over what its bytes depend on, so a changed setting, an upgrade or
an edited repository config never reads an entry made under others (``Scope``):

- this package's source files and git's version (what renders, and what makes the patches);
- the repository: its git directory, git's ``diff.*`` configuration (every scope: a diff driver's
  hunk-header pattern shapes patches) and ``info/attributes`` (which assigns drivers and marks
  files binary); neither is part of any commit;
- the settings the build takes (size limits, exclusions, secret rules, the history settings, the
  preamble and the window budget) and the commit.

An entry is written whole to a temporary file and renamed into place (a reader never sees half of
one); its length and SHA-256 are checked on every read, and a damaged entry is removed and built
again. The directory is created 0700 and entries 0600; a directory that another user owns or that
group or others may write is not used: whoever can write there chooses what is sent upstream as
the repository. Past ``max_bytes`` the least recently used entries are removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = b"scout-diff-cache build entry 1\n"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
KINDS = ("bases", "blocks", "depths", "sizes")
TRIM_TO_PERCENT = 90  # past max_bytes, entries are removed until the total is this share of it
STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a writer that died


class UnsafeCacheDir(Exception):
    """The directory cannot be used: the message says why and what to do."""


@functools.cache
def code_digest() -> str:
    """SHA-256 over this package's source files (a few ms, once per process)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def git_version() -> str:
    return subprocess.run(["git", "version"], capture_output=True, check=False).stdout.decode().strip()


@dataclass(frozen=True)
class Scope:
    """The digest of everything an entry depends on but its own key (code, git, repository, settings)."""

    digest: str

    @classmethod
    def of(cls, repository: Sequence[str], settings: Sequence[object]) -> Scope:
        material = [FORMAT.decode(), code_digest(), git_version(), *repository, repr(tuple(settings))]
        return cls(hashlib.sha256("\0".join(material).encode("utf-8", "surrogatepass")).hexdigest())

    def key(self, *parts: object) -> str:
        return hashlib.sha256("\0".join([self.digest, *map(repr, parts)]).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Entry:
    meta: dict[str, Any]
    payload: bytes
    sha256: str  # of the payload, checked


class BuildCache:
    """Entries on disk: reads block (call from worker threads), writes go to one background thread."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="scout build cache")
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()
        self._total: int | None = None  # bytes on disk, counted at the first write
        self._failed = False
        self._counts = {kind: {"read": 0, "missed": 0, "written": 0} for kind in KINDS}

    def counts(self) -> dict[str, dict[str, int]]:
        """Per kind of entry, how many this process read back, looked for in vain, and wrote (/health)."""
        with self._lock:
            return {kind: dict(counts) for kind, counts in self._counts.items()}

    def _count(self, kind: str, what: str) -> None:
        with self._lock:
            self._counts[kind][what] += 1

    @classmethod
    def open(cls, root: Path, max_bytes: int) -> BuildCache:
        """Create (0700) or check the directory; UnsafeCacheDir if it cannot be used."""
        root = root.expanduser()
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_private(root)  # before anything is made in it
            for kind in KINDS:
                (root / kind).mkdir(mode=0o700, exist_ok=True)
                check_private(root / kind)
        except OSError as e:
            raise UnsafeCacheDir(f"{root}: cannot be used: {e.strerror or e}") from None
        return cls(root.resolve(), max_bytes)

    def read(self, kind: str, key: str) -> Entry | None:
        """The entry, or None when there is none or it is damaged (then it is removed)."""
        path = self.root / kind / key
        try:
            with path.open("rb") as file:
                entry = _parse(file.readline(), file.readline(), file.read())
        except OSError:
            self._count(kind, "missed")
            return None
        self._count(kind, "missed" if entry is None else "read")
        with contextlib.suppress(OSError):  # a read-only cache is still read
            if entry is None:
                logger.warning("build cache: %s is damaged; removed, built again", path)
                path.unlink(missing_ok=True)
            else:
                os.utime(path)  # most recently used
        return entry

    def write(self, kind: str, key: str, meta: dict[str, Any], payload: bytes) -> None:
        """Store the entry in the background (a failure is logged once, never raised)."""
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._writer.submit(self._write, kind, key, meta, payload))

    def flush(self) -> None:
        """Wait for the writes queued so far."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.result()

    def usage(self) -> tuple[int, int]:
        """How many entries it holds, and their bytes."""
        sizes = [
            item.stat().st_size
            for kind in KINDS
            for item in os.scandir(self.root / kind)
            if not item.name.startswith(".tmp-")
        ]
        return len(sizes), sum(sizes)

    def _write(self, kind: str, key: str, meta: dict[str, Any], payload: bytes) -> None:
        digest = hashlib.sha256(payload).hexdigest()
        header = json.dumps({**meta, "bytes": len(payload), "sha256": digest}, separators=(",", ":")).encode()
        folder = self.root / kind
        temporary: str | None = None
        try:
            descriptor, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)  # 0600
            with os.fdopen(descriptor, "wb") as file:
                file.write(FORMAT + header + b"\n")
                file.write(payload)
            os.replace(temporary, folder / key)
            self._count(kind, "written")
        except OSError as e:
            if not self._failed:
                logger.warning("build cache: cannot write under %s (%s); restarts will build again", folder, e)
            self._failed = True
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            return
        self._trim(len(FORMAT) + len(header) + 1 + len(payload))

    def _trim(self, written: int) -> None:
        """Remove the least recently used entries once the total passes max_bytes (and stale temporaries)."""
        if self._total is not None:
            self._total += written
            if self._total <= self.max_bytes:
                return
        files = []
        now = time.time()
        for kind in KINDS:
            for item in os.scandir(self.root / kind):
                with contextlib.suppress(OSError):
                    info = item.stat()
                    if item.name.startswith(".tmp-"):
                        if now - info.st_mtime > STALE_TEMP_SECONDS:
                            os.unlink(item.path)
                        continue
                    files.append((info.st_mtime, info.st_size, item.path))
        total = sum(size for _, size, _ in files)
        if total > self.max_bytes:
            for _, size, path in sorted(files):
                if total <= self.max_bytes * TRIM_TO_PERCENT // 100:
                    break
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    total -= size
        self._total = total


def check_private(folder: Path) -> None:
    """UnsafeCacheDir unless ``folder`` is a directory of this user that group and others cannot write."""
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheDir(f"{folder} is not a directory")
    if info.st_uid != os.getuid():
        raise UnsafeCacheDir(f"{folder} belongs to another user (uid {info.st_uid}); use a directory of your own")
    if info.st_mode & 0o022:
        raise UnsafeCacheDir(
            f"{folder} may be written by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run chmod go-w on it or choose another BUILD_CACHE_DIR"
        )


def _parse(first_line: bytes, header: bytes, payload: bytes) -> Entry | None:
    if first_line != FORMAT or not header.endswith(b"\n"):
        return None
    try:
        meta = json.loads(header)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("bytes") != len(payload):
        return None
    digest = hashlib.sha256(payload).hexdigest()
    if meta.get("sha256") != digest:
        return None
    return Entry(meta, payload, digest)
