"""Reading objects through ``git cat-file --batch``; many at once through two processes in parallel.

A snapshot reads every blob of a tree. One cat-file process inflates them at about the speed of
``git archive``, and the build renders each while git waits on a full pipe. Two processes, the
second half's output read ahead by a thread into a bounded buffer, keep two cores busy: on this
Python's standard library (38 MB) reading took 0.19-0.24 s against 0.27-0.35 s with one.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import threading
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING

from .errors import GitError

if TYPE_CHECKING:
    from .repo import GitRepo

PARALLEL_MIN_OBJECTS = 256  # fewer are read by one process (starting a second costs milliseconds)
READ_AHEAD_BYTES = 32 << 20  # what the read-ahead thread may hold before the build takes it
PIPE_BYTES = 1 << 20


def read_blobs(repo: GitRepo, oids: Sequence[str]) -> Generator[bytes]:
    """Each object's content, in order; closing the generator stops every process and thread."""
    if len(oids) < PARALLEL_MIN_OBJECTS:
        yield from cat_file(repo, oids)
        return
    half = len(oids) // 2
    first = cat_file(repo, oids[:half])
    later = ReadAhead(cat_file(repo, oids[half:]), READ_AHEAD_BYTES)
    try:
        yield from first
        yield from later
    finally:
        first.close()
        later.close()


def cat_file(repo: GitRepo, oids: Sequence[str]) -> Generator[bytes]:
    """Contents of the given objects, in order, through one ``git cat-file --batch`` process."""
    if not oids:
        return
    command, env = repo.cat_file_command()
    try:
        proc = subprocess.Popen(
            command,
            cwd=repo.toplevel,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=PIPE_BYTES,  # whole objects per read call, not 8 KiB at a time
        )
    except OSError as e:
        raise repo.start_error(e) from None
    assert proc.stdin is not None and proc.stdout is not None
    with contextlib.suppress(AttributeError, OSError):  # Linux only; git may write 1 MiB ahead, not 64 KiB
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def feed() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(b"".join(oid.encode() + b"\n" for oid in oids))
            proc.stdin.close()
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=feed, name="scout-cat-file-writer", daemon=True)
    writer.start()
    try:
        for oid in oids:
            header = proc.stdout.readline().split()
            if len(header) != 3:
                error = proc.stderr.read().decode("utf-8", "replace").strip() if proc.stderr else ""
                raise GitError(f"git cat-file could not read object {oid}: {error or b' '.join(header)!r}")
            size = int(header[2])
            data = proc.stdout.read(size)
            proc.stdout.read(1)
            if len(data) != size:
                raise GitError(f"git cat-file returned a truncated object {oid}")
            yield data
    finally:
        proc.kill()
        proc.wait()
        writer.join()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


class ReadAhead:
    """Items of ``source`` read by a thread while the consumer is busy, at most ``limit`` bytes held."""

    def __init__(self, source: Generator[bytes], limit: int) -> None:
        self._source = source
        self._limit = limit
        self._items: deque[bytes] = deque()
        self._held = 0
        self._finished = False
        self._stopped = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="scout-cat-file-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for data in self._source:
                with self._changed:
                    while self._held >= self._limit and not self._stopped:
                        self._changed.wait()
                    if self._stopped:
                        return
                    self._items.append(data)
                    self._held += len(data)
                    self._changed.notify_all()
        except BaseException as e:  # handed to the consumer, raised where it would have been
            self._error = e
        finally:
            self._source.close()
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._changed:
                while not self._items and not self._finished:
                    self._changed.wait()
                if not self._items:
                    if self._error is not None:
                        raise self._error
                    return
                data = self._items.popleft()
                self._held -= len(data)
                self._changed.notify_all()
            yield data

    def close(self) -> None:
        """Stop reading (after the object being read, at most) and wait for the thread to end."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._thread.join()
