"""Files written whole or not at all: what every checkpoint, record, metrics file and manifest is written with."""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

from mazerun.core.errors import MazerunError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _cannot_write(path: Path, error: OSError) -> MazerunError:
    return MazerunError(
        f"cannot write {path}: {error.strerror or error}; free disk space, or point "
        "hydra.run.dir at a writable directory"
    )


def _write_temporary(path: Path, write: Callable[[BinaryIO], object], *, flush: bool) -> str:
    """A new temporary file beside ``path`` that ``write`` fills (flushed to disk with ``flush``); returns its name."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if flush:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        return tmp_name
    except BaseException as error:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _cannot_write(path, error) from None
        raise


def _publish(tmp_name: str, path: Path) -> None:
    """Rename the flushed temporary file over ``path`` and flush the directory, so the rename survives a power cut."""
    try:
        os.replace(tmp_name, path)
        fsync_directory(path.parent)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _cannot_write(path, error) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the whole file or none of it, also after a crash.

    The bytes go to a temporary file beside ``path``, which is flushed to disk and renamed over
    ``path``; the directory is flushed too, so the rename itself survives a power cut.
    """
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], object],
                 check: Callable[[Path], object] | None = None) -> None:
    """:func:`atomic_write_bytes` of what ``write`` streams into the file, which need never be whole in memory.

    ``check`` reads the flushed temporary file before it is renamed over ``path``; what it raises
    leaves ``path`` as it was, and no temporary file.
    """
    tmp_name = _write_temporary(path, write, flush=True)
    if check is not None:
        try:
            check(Path(tmp_name))
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    _publish(tmp_name, path)


class BackgroundFlusher:
    """Atomic writes as :func:`atomic_write_bytes` makes them, with the wait for the disk in a thread.

    An fsync costs about 0.3 ms on a VM's disk, a tenth of recording a LunarLander episode, and
    ``os.fsync`` releases the GIL: the caller writes a file's bytes and goes on (the next
    episode) while this thread flushes it, renames it into place and flushes its directory. A
    file appears under its name only once its bytes are on disk, as with atomic_write_bytes.
    :meth:`wait` returns when every write so far is in place; an error of the thread (a full
    disk) is raised there, or by the next :meth:`write`, once.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, Path] | None] = queue.Queue()
        self._error: MazerunError | None = None
        self._thread: threading.Thread | None = None

    def write(self, path: Path, data: bytes) -> None:
        self._raise_error()
        tmp_name = _write_temporary(path, lambda handle: handle.write(data), flush=False)
        if self._thread is None:
            self._thread = threading.Thread(target=self._flush_each, name="mazerun-flusher", daemon=True)
            self._thread.start()
        self._queue.put((tmp_name, path))

    def wait(self) -> None:
        """Block until every file written so far is in place."""
        self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Put every written file in place and end the thread (a stop included: nothing written is lost)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_error()

    def _flush_each(self) -> None:
        while (item := self._queue.get()) is not None:
            tmp_name, path = item
            try:
                fd = os.open(tmp_name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _publish(tmp_name, path)
            except OSError as error:
                Path(tmp_name).unlink(missing_ok=True)
                self._error = self._error or _cannot_write(path, error)
            except MazerunError as error:
                self._error = self._error or error
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _raise_error(self) -> None:
        """Raise the thread's first error, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
