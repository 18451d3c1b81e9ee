"""A private, refreshed copy of the repository's index, so reading the working diff costs O(changes).

git tells a changed tracked file from an unchanged one by the stat data the index holds, except
for "racily clean" entries: files written in the same second as the index (after a clone, a
checkout, a ``git add`` of files just generated). Those it must read and hash on every
``diff-index``, and while we only read, nothing ever refreshes them: on a 100k-file checkout every
request hashed the whole tree again. ``git status`` would refresh them, but it writes
``.git/index``, which this proxy never does. Instead the index is copied into a private temporary
directory and refreshed there (``update-index --refresh``), again whenever the repository's own
index changes; the commands that read the index are pointed at the copy (``GIT_INDEX_FILE``).
What they report is the same: a refresh only records stat data for files whose content matches.

A new copy is refreshed on its first use a second or more after it was made (in place: git
writes a lock file beside it, then renames it over the copy), not at once: entries written in the
same second as the refresh would stay racy in it, and a commit, the usual reason for a new index,
leaves its stat data current, so the copy serves as it is meanwhile (racy entries are hashed, as
git does for the repository's own index); from then on only files the user touches are read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

# (inode, size, mtime, ctime) of the repository's index when it was last copied.
_Signature = tuple[int, int, int, int]


class PrivateIndex:
    """The refreshed copy of ``git_dir/index``, made on first use, removed with this object."""

    def __init__(self, git_dir: Path) -> None:
        self.source = git_dir / "index"
        self.path: Path | None = None  # the copy to read, once made (None: use the repository's index)
        self._signature: _Signature | None = None
        self._lock = threading.Lock()
        self._directory: Path | None = None
        self._settle_after: float | None = None  # when the copy may be refreshed again to settle racy entries

    def renew(self, refresh: Callable[[Path], None]) -> Path | None:
        """The copy, made again first if the repository's index changed since, refreshed by
        ``refresh(copy)`` once it is a second old. None while the repository has no index."""
        with self._lock:
            try:
                info = os.stat(self.source)
                signature = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
                if signature != self._signature or self.path is None:
                    self.path = self._copy()
            except OSError:  # no index (yet), or no repository any more: git reads (or fails) as it would
                self.path, self._signature = None, None
                return None
            if signature != self._signature:
                self._signature = signature
                self._settle_after = time.time() // 1 + 1.05  # the next whole second (timestamps are in seconds)
            elif self._settle_after is not None and time.time() >= self._settle_after:
                refresh(self.path)
                self._settle_after = None
            return self.path

    def _copy(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="scout-index-"))
            weakref.finalize(self, shutil.rmtree, self._directory, ignore_errors=True)
        target = self._directory / "index"
        staged = self._directory / "index.new"
        # git replaces its index by a rename, so this reads one whole version; the copy too is put
        # in place by a rename, so a command reading the previous copy meanwhile reads it whole.
        # The index's mtime is copied too: git takes it as the time its entries were recorded, and
        # a file changed in that same second must stay "racy" (re-read), not pass as clean by stat.
        shutil.copy2(self.source, staged)
        os.replace(staged, target)
        return target
