"""A worker process that steps half of the env copies over shared memory, so the envs and the policy use two cores.

The worker builds and owns its copies (:class:`mazerun.acting.copies.EnvCopies`), and their
steps land in their rows of step arrays that live in shared memory. A step costs two bytes on
a pipe: the parent writes the half's actions into the arrays and sends ``STEP``; the worker
steps, writes the rows and answers ``DONE``. Everything rarer (reset, the episodes' resume
state, replay, close) is a pickled command on the same pipe.

The worker is spawned: a fork of a process whose torch thread pool is running can deadlock.
It starts with the stop signals held (:func:`mazerun.core.interrupts.held`) and then ignores
Ctrl-C and SIGHUP, which a terminal sends to the whole process group: the parent alone decides
what a stop means, and closes the worker. SIGTERM ends it, so that whatever ends the parent's
process group (or multiprocessing's own clean-up) ends the worker too. It also ends when the
parent is gone, which its pipe reports as end-of-file. A worker that dies while the run needs
it ends the run with one line (:class:`EnvWorkerDied`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from mazerun.acting.copies import EnvCopies, EpisodeState, Replay, StepArrays
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError, how_it_ended

STEP, DONE = b"s", b"d"
"""A step's two messages: the parent's "your half's actions are in", the worker's "its rows are written"."""
CLOSE_SECONDS = 5.0
"""How long a worker told to close may take (it may be inside a step) before it is killed."""

_CONTEXT = multiprocessing.get_context("spawn")


def shared_buffer(size: int) -> Any:
    """``size`` bytes of memory the worker shares (it is handed over when the worker starts)."""
    return _CONTEXT.RawArray("b", size)


class EnvWorkerDied(MazerunError):
    """The env worker ended while the run needed it (killed, out of memory)."""


class WorkerCopies:
    """The parent's side of a worker stepping env copies ``rows``; the same calls as :class:`EnvCopies`."""

    def __init__(self, thunks: list[Callable[[], gym.Env]], layout: dict[str, tuple[tuple[int, ...], np.dtype]],
                 buffers: dict[str, Any], rows: slice) -> None:
        self.rows = rows
        self.closed = False
        with interrupts.held():  # no stop between the start and the bookkeeping; the worker inherits the mask
            self.connection, worker_end = _CONTEXT.Pipe()
            self.process = _CONTEXT.Process(target=_serve, args=(thunks, layout, buffers, rows, worker_end),
                                            name=f"mazerun-env-worker-{rows.start}-{rows.stop - 1}", daemon=True)
            self.process.start()
            worker_end.close()  # the worker holds the only copy: its end shows here as end-of-file

    def reset(self) -> None:
        self._call("reset")

    def send(self) -> None:
        self._send(STEP)

    def wait(self) -> None:
        reply = self._receive()
        if reply != DONE:
            raise MazerunError(pickle.loads(reply)[1])

    def episode_states(self) -> list[EpisodeState]:
        return self._call("episode_states")

    def replay(self, states: list[EpisodeState]) -> list[Replay]:
        return self._call("replay", states)

    def close(self) -> None:
        """Tell the worker to end; kill it if it has not within :data:`CLOSE_SECONDS`."""
        if self.closed:
            return
        self.closed = True
        with interrupts.held():  # a second Ctrl-C here must not leave the worker behind
            with contextlib.suppress(OSError):
                self.connection.send_bytes(pickle.dumps(("close", ())))
            self.process.join(timeout=CLOSE_SECONDS)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            self.connection.close()

    def _call(self, name: str, *args: Any) -> Any:
        self._send(pickle.dumps((name, args)))
        kind, value = pickle.loads(self._receive())
        if kind == "error":
            raise MazerunError(value)
        return value

    def _send(self, message: bytes) -> None:
        try:
            self.connection.send_bytes(message)
        except OSError:
            raise self._died() from None

    def _receive(self) -> bytes:
        try:
            return self.connection.recv_bytes()
        except (EOFError, OSError):
            raise self._died() from None

    def _died(self) -> BaseException:
        """Why the worker is gone: a stop signal the whole process group got (then stop as asked), else one line."""
        self.process.join(timeout=CLOSE_SECONDS)
        interrupts.check()
        how, _ = how_it_ended(self.process.exitcode)
        return EnvWorkerDied(f"the env worker stepping env copies {self.rows.start} to {self.rows.stop - 1} {how}; "
                             "the run cannot go on without them")


def _failure(what: str, error: Exception) -> bytes:
    cause = str(error) if isinstance(error, MazerunError) else f"{type(error).__name__}: {error}"
    return pickle.dumps(("error", f"the env worker {what}: {cause}"))


def _serve(thunks: list[Callable[[], gym.Env]], layout: dict[str, tuple[tuple[int, ...], np.dtype]],
           buffers: dict[str, Any], rows: slice, connection: Connection) -> None:
    """The worker's life: build its copies, then step them and answer commands until told to close."""
    for number in (signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, interrupts.HANDLED_SIGNALS)  # held by the parent while it started
    try:
        copies = EnvCopies([thunk() for thunk in thunks], StepArrays.on(layout, buffers).rows(rows))
    except Exception as error:  # noqa: BLE001 - whatever stops an env from being built is the parent's one line
        connection.send_bytes(_failure("could not build its env copies", error))
        return
    if "torch" in sys.modules:  # an expert with a network: one thread, the parent has the other core
        sys.modules["torch"].set_num_threads(1)
    try:
        while True:
            message = connection.recv_bytes()
            if message == STEP:
                copies.send()
                connection.send_bytes(DONE)
                continue
            name, args = pickle.loads(message)
            if name == "close":
                break
            connection.send(("ok", getattr(copies, name)(*args)))
    except (EOFError, OSError):
        pass  # the parent is gone (end-of-file, or the pipe was reset)
    except Exception as error:  # noqa: BLE001 - an env that fails: the parent says so in one line
        with contextlib.suppress(OSError):
            connection.send_bytes(_failure("failed", error))
    finally:
        copies.close()
