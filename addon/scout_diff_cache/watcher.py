"""Change detection, so HEAD and the working diff are recomputed only when something changed.

A watchdog (inotify on Linux) observer counts every write, create, delete or move in the work
tree and in the git directories (except object and log files and lock files, which git writes
while it works and which change neither HEAD nor the working tree's content). The generation is
that count plus a coarse clock: state is also re-read every ``resync_seconds``, a guard against a
missed event. Where no watcher can be started (inotify limits, unsupported file systems) the
clock alone drives it, at ``poll_seconds``, so an edit still shows within that time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from watchdog.events import (
    FileClosedNoWriteEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

logger = logging.getLogger(__name__)

RESYNC_SECONDS = 10.0
POLL_SECONDS = 0.1

_IGNORED_GIT_PARTS = ("objects", "logs")
_IGNORED_EVENTS = (FileOpenedEvent, FileClosedNoWriteEvent)

Generation = tuple[int, int]


class _CountingHandler(FileSystemEventHandler):
    def __init__(self, monitor: ChangeMonitor) -> None:
        self._monitor = monitor

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, _IGNORED_EVENTS):
            return
        paths = [event.src_path, event.dest_path] if event.dest_path else [event.src_path]
        if any(self._monitor.is_relevant(os.fsdecode(p)) for p in paths):
            self._monitor.note_change()


class ChangeMonitor:
    """Tells whether the repository may have changed since a given generation."""

    def __init__(self, work_tree: Path, git_dirs: list[Path], resync_seconds: float = RESYNC_SECONDS) -> None:
        self._work_tree = work_tree
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
        """False for git's own bookkeeping files that change neither HEAD nor the tree's content."""
        if path.endswith(".lock"):
            return False
        for git_dir in self._git_dirs:
            git_dir_text = str(git_dir)
            if path == git_dir_text or path.startswith(git_dir_text + os.sep):
                parts = Path(path).relative_to(git_dir).parts
                return not (parts and parts[0] in _IGNORED_GIT_PARTS)
        return True

    def start(self) -> None:
        observer = Observer()
        handler = _CountingHandler(self)
        try:
            observer.schedule(handler, str(self._work_tree), recursive=True)
            for git_dir in self._git_dirs:
                if not git_dir.is_relative_to(self._work_tree):
                    observer.schedule(handler, str(git_dir), recursive=True)
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
