"""Files written whole or not at all: what every checkpoint, record, metrics file and manifest is written with."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mazerun.core.errors import MazerunError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the whole file or none of it, also after a crash.

    The bytes go to a temporary file beside ``path``, which is flushed to disk and renamed over
    ``path``; the directory is flushed too, so the rename itself survives a power cut.
    """
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_name, path)
        fsync_directory(path.parent)
    except BaseException as error:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise MazerunError(
                f"cannot write {path}: {error.strerror or error}; free disk space, or point "
                "hydra.run.dir at a writable directory"
            ) from None
        raise


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
