"""The files that say how a run directory's run stands, named once for the runs that write them and the report that reads them."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import IO

RESULT_FILE = "result.json"
"""Written when a training run (or a pipeline stage) reaches its budget."""
FAILED_JOB = "failed.txt"
"""Left in a sweep job's directory when the job failed: its one-line error."""
RUN_LOCK = ".lock"
"""Locked (``flock``) by the run that owns the directory, for as long as it runs."""
LOCK_PATIENCE = 0.5
"""Seconds a run tries for a busy lock before it counts the directory as in use: :func:`is_locked` holds it an instant."""


def take_lock(lock: IO) -> bool:
    """Lock the open ``RUN_LOCK`` file ``lock`` for this run; False if another run holds it.

    A report that asks whether the directory's run is still going (:func:`is_locked`) holds a
    shared lock for an instant, so a busy lock is tried again for :data:`LOCK_PATIENCE` seconds.
    """
    deadline = time.monotonic() + LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir``'s lock: a run still going. A lock left by a run that ended is free."""
    try:
        descriptor = os.open(Path(run_dir) / RUN_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(descriptor)  # closing releases the shared lock this check may have taken
    return False
