"""Change detection, so HEAD and the working diff are recomputed only when something changed.

A watchdog (inotify on Linux) observer counts every write, create, delete or move in the work
tree and in the git directories (except object and log files and lock files under the git
directories, which git writes while it works and which change neither HEAD nor the working
tree's content). The generation is that count plus a coarse clock: state is also re-read every
``resync_seconds``, a guard against a missed event. Where no watcher can be started (inotify
limits, unsupported file systems) the clock alone drives it, at ``poll_seconds``, so an edit
still shows within that time.

Reads are not subscribed to at all (no IN_OPEN, IN_CLOSE_NOWRITE): every file an editor, a build
or git itself (our own snapshot builds included) opens would otherwise be an event, and watchdog
logs each event at debug level, which mitmproxy forwards to its event loop one wake-up byte at a
time. A burst of reads then filled the loop's wake-up pipe and a SIGTERM or Ctrl-C arriving
meanwhile was lost: mitmdump did not stop. watchdog's own debug logging is off for the same reason.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

logger = logging.getLogger(__name__)

# watchdog logs every inotify event at debug level (mitmproxy sets the root logger to DEBUG).
logging.getLogger("watchdog").setLevel(logging.INFO)

RESYNC_SECONDS = 10.0
POLL_SECONDS = 0.1

_IGNORED_GIT_PARTS = ("objects", "logs")
# Changes only: leaving out FileOpenedEvent and FileClosedNoWriteEvent keeps IN_OPEN and
# IN_CLOSE_NOWRITE out of the inotify mask, so reads are not even reported by the kernel.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
]

Generation = tuple[int, int]


class _CountingHandler(FileSystemEventHandler):
    def __init__(self, monitor: ChangeMonitor) -> None:
        self._monitor = monitor

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not isinstance(event, tuple(WATCHED_EVENTS)):
            return
        paths = [event.src_path, event.dest_path] if event.dest_path else [event.src_path]
        if any(self._monitor.is_relevant(os.fsdecode(p)) for p in paths):
            self._monitor.note_change()


class ChangeMonitor:
    """Tells whether the repository may have changed since a given generation."""

    def __init__(self, work_tree: Path, git_dirs: list[Path], resync_seconds: float = RESYNC_SECONDS) -> None:
        self._work_tree = work_tree.resolve()  # the same form as the git dirs, for is_relevant
        self._git_dirs = sorted({d.resolve() for d in git_dirs})
        self._changes = 0
        self._lock = threading.Lock()
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._quantum = POLL_SECONDS
        self._resync_seconds = resync_seconds

    @property
    def watching(self) -> bool:
        return self._observer is not None

    @property
    def generation(self) -> Generation:
        return self._changes, int(time.monotonic() / self._quantum)

    def note_change(self) -> None:
        with self._lock:
            self._changes += 1

    def is_relevant(self, path: str) -> bool:
        """False for git's own bookkeeping files that change neither HEAD nor the tree's content.

        Lock files count only inside a git directory: a work-tree file such as ``Cargo.lock`` or
        ``poetry.lock`` is content like any other.
        """
        for git_dir in self._git_dirs:
            git_dir_text = str(git_dir)
            if path == git_dir_text or path.startswith(git_dir_text + os.sep):
                parts = Path(path).relative_to(git_dir).parts
                return not (path.endswith(".lock") or (parts and parts[0] in _IGNORED_GIT_PARTS))
        return True

    def start(self) -> None:
        observer = Observer()
        handler = _CountingHandler(self)
        try:
            observer.schedule(handler, str(self._work_tree), recursive=True, event_filter=WATCHED_EVENTS)
            for git_dir in self._git_dirs:
                if not git_dir.is_relative_to(self._work_tree):
                    observer.schedule(handler, str(git_dir), recursive=True, event_filter=WATCHED_EVENTS)
            observer.start()
        except OSError as e:
            logger.warning(
                "cannot watch %s for changes (%s); re-reading git state at most every %.0f ms instead",
                self._work_tree,
                e,
                POLL_SECONDS * 1000,
            )
            return
        self._observer = observer
        self._quantum = self._resync_seconds

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        self._quantum = POLL_SECONDS
