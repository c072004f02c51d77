"""A worker process that steps half of the env copies over shared memory, so the envs and the policy use two cores.

The worker builds and owns its copies (:class:`mazerun.acting.copies.EnvCopies`); their steps
land in their rows of step arrays that live in memory both processes map (an anonymous file,
``memfd``). A step costs two bytes on a socket: the parent writes the half's actions into the
arrays and sends ``STEP``; the worker steps, writes the rows and answers ``DONE``. Everything
rarer (reset, the episodes' resume state, replay, close) is a pickled command on the same socket.

The worker is a fresh interpreter (``python -c``), as multiprocessing's spawn would start it:
a fork of a process whose torch thread pool is running can deadlock. It is started directly,
not through multiprocessing: spawn and forkserver both start a resource-tracker process as
well, which outlives the run by a moment, and re-run the parent's main module. The worker starts
with the stop signals held (:func:`mazerun.core.interrupts.held`) and then ignores them: a
terminal's Ctrl-C and a scheduler's SIGTERM reach the whole process group, and the parent alone
decides what a stop means (DAgger's saves the copies' episodes, which it asks the worker for),
then closes the worker. A worker also ends when the parent is gone: its socket reports
end-of-file. One that dies while the run needs it ends the run with one line
(:class:`EnvWorkerDied`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

import gymnasium as gym

from mazerun.acting.copies import EnvCopies, EpisodeState, Layout, Replay, StepArrays
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError, how_it_ended

STEP, DONE = b"s", b"d"
"""A step's two messages: the parent's "your half's actions are in", the worker's "its rows are written"."""
CLOSE_SECONDS = 5.0
"""How long a worker told to close may take (it may be inside a step) before it is killed."""
ENTRY = "from mazerun.acting.workers import main; main()"
SPIN_SECONDS = 0.001
"""How long a side polls for the other's message before it sleeps in a blocking read. Waking a sleeping process costs
tens of microseconds on a VM, per message; a step of the worker's copies takes hundreds."""


class Listener:
    """Receives the other side's messages, polling for each for up to :data:`SPIN_SECONDS` before a blocking read.

    Polling pays where the two processes have a core each: the message comes within the spin,
    and nobody waits to be woken. On a machine busier than its cores (parallel runs, a test
    suite beside) a spin only takes the core from the process it waits for, so a side spins only
    while the last message came within the spin, and yields the core on every poll.
    """

    def __init__(self, descriptor: int) -> None:
        self.poller = select.poll()
        self.poller.register(descriptor, select.POLLIN)
        self.spinning = True

    def receive(self, read: Callable[[], bytes]) -> bytes:
        """The next message, read by ``read`` (a blocking read) once it is there or the spin is over."""
        started = time.perf_counter()
        if self.spinning:
            poll, deadline = self.poller.poll, started + SPIN_SECONDS
            while not poll(0) and time.perf_counter() < deadline:
                os.sched_yield()
        message = read()
        self.spinning = time.perf_counter() - started < SPIN_SECONDS
        return message


def shared_memory(size: int) -> tuple[int, mmap.mmap]:
    """``size`` bytes of zeroed memory a worker can map: the file descriptor to hand it, and this process's mapping."""
    descriptor = os.memfd_create("mazerun-env-steps")
    os.ftruncate(descriptor, size)
    return descriptor, mmap.mmap(descriptor, size)


class EnvWorkerDied(MazerunError):
    """The env worker ended while the run needed it (killed, out of memory)."""


class WorkerCopies:
    """The parent's side of a worker stepping env copies ``rows`` in ``memory``; the same calls as :class:`EnvCopies`.

    ``memory`` is the descriptor of :func:`shared_memory`, laid out as ``layout`` for every copy.
    """

    def __init__(self, thunks: list[Callable[[], gym.Env]], layout: Layout, memory: int, rows: slice) -> None:
        self.rows = rows
        self.closed = self.resetting = False
        parent_end, worker_end = socket.socketpair()
        with parent_end, worker_end, interrupts.held():  # no stop before the bookkeeping; the worker inherits the mask
            self.process = subprocess.Popen([sys.executable, "-c", ENTRY, str(worker_end.fileno()), str(memory)],
                                            pass_fds=(worker_end.fileno(), memory), stdin=subprocess.DEVNULL)
            self.connection = Connection(parent_end.detach())
        self.listener = Listener(self.connection.fileno())
        try:  # sys.path first: the worker imports the thunks' modules with it (a test's, a plugin's)
            self._send(pickle.dumps(sys.path))
            self._send(pickle.dumps((thunks, layout, rows)))
        except BaseException:
            self.closed = True
            self.process.kill()
            self.process.wait()
            self.connection.close()
            raise

    def reset(self) -> None:
        """Start the reset; its reply is awaited where the copies' observations are first read (:meth:`settle`).

        Meanwhile the worker may still be starting (importing gymnasium, building its envs): the
        parent evaluates, or builds its own copies.
        """
        self._send(pickle.dumps(("reset", ())))
        self.resetting = True

    def settle(self) -> None:
        """Wait for the reset in flight, if one is."""
        if self.resetting:
            self.resetting = False
            self._reply()

    def send(self) -> None:
        self.settle()
        self._send(STEP)

    def wait(self) -> None:
        reply = self.listener.receive(self._receive)
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
                self.connection.send(("close", ()))
            try:
                self.process.wait(timeout=CLOSE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.connection.close()

    def _call(self, name: str, *args: Any) -> Any:
        self.settle()
        self._send(pickle.dumps((name, args)))
        return self._reply()

    def _reply(self) -> Any:
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

    def _died(self) -> MazerunError:
        """One line on the worker's end: why it ended, where it said so before it did. A stop asked for meanwhile
        ends the run as asked instead."""
        with contextlib.suppress(EOFError, OSError):
            while self.connection.poll():
                reply = self.connection.recv_bytes()
                if reply != DONE:
                    return MazerunError(pickle.loads(reply)[1])
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=CLOSE_SECONDS)
        interrupts.check()
        how, _ = how_it_ended(self.process.returncode)
        return EnvWorkerDied(f"the env worker stepping env copies {self.rows.start} to {self.rows.stop - 1} {how}; "
                             "the run cannot go on without them")


def _failure(what: str, error: Exception) -> bytes:
    cause = str(error) if isinstance(error, MazerunError) else f"{type(error).__name__}: {error}"
    return pickle.dumps(("error", f"the env worker {what}: {cause}"))


def main() -> None:
    """The worker's life (:data:`ENTRY`): build its copies, then step them and answer commands until told to close.

    Its arguments are the descriptors of its socket and of the shared memory.
    """
    for number in interrupts.HANDLED_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, interrupts.HANDLED_SIGNALS)  # held by the parent while it started
    socket_descriptor, memory_descriptor = map(int, sys.argv[1:3])
    connection = Connection(socket_descriptor)
    memory = mmap.mmap(memory_descriptor, 0)
    os.close(memory_descriptor)
    try:
        sys.path[:] = connection.recv()
        thunks, layout, rows = connection.recv()
        copies = EnvCopies([thunk() for thunk in thunks], StepArrays.on(layout, memory).rows(rows))
    except (EOFError, OSError):
        return  # the parent is gone
    except Exception as error:  # noqa: BLE001 - whatever stops an env from being built is the parent's one line
        with contextlib.suppress(OSError):
            connection.send_bytes(_failure("could not build its env copies", error))
        return
    if "torch" in sys.modules:  # an expert with a network: one thread, the parent has the other core
        sys.modules["torch"].set_num_threads(1)
    listener = Listener(socket_descriptor)
    try:
        while True:
            message = listener.receive(connection.recv_bytes)
            if message == STEP:
                copies.send()
                connection.send_bytes(DONE)
                continue
            name, args = pickle.loads(message)
            if name == "close":
                break
            connection.send(("ok", getattr(copies, name)(*args)))
    except (EOFError, OSError):
        pass  # the parent is gone (end-of-file, or the socket was reset)
    except Exception as error:  # noqa: BLE001 - an env that fails: the parent says so in one line
        with contextlib.suppress(OSError):
            connection.send_bytes(_failure("failed", error))
    finally:
        copies.close()
