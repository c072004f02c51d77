"""Ctrl-C, SIGTERM and SIGHUP as a request to stop at the next safe point.

Batch schedulers and ``timeout`` send SIGTERM, closing a terminal sends SIGHUP: all three are
handled like Ctrl-C. Inside a :func:`deferred` region (a training loop) the first signal only
sets a flag, and the loop stops at its next :func:`check`, between two updates, where its
state is whole and can be saved to be continued exactly. A second signal stops at once.
Outside such regions a signal raises :class:`Interrupted` where the program is, as Ctrl-C
always does, and is recorded as well: Python swallows an exception raised inside a ``__del__``,
a weakref or GC callback (the handler runs wherever the interpreter is), so the request stays
pending until a :func:`check` raises it, and the unraisable hook keeps quiet about it. Loops and
long phases call :func:`check`; :func:`run_command` makes a module's ``main`` a command whose
stop signals are handled from its first moment. The CLI installs the handlers; code run without
it (tests, notebooks) still gets Python's own KeyboardInterrupt, which the loops handle the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
from typing import Any, Callable, Iterator, NoReturn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_requested: Interrupted | None = None
_deferring = 0
_done = False


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; ``exit_code`` is the shell's convention, 128 + the signal number."""

    def __init__(self, signal_number: int) -> None:
        self.signal_number = signal_number
        self.signal_name = signal.Signals(signal_number).name
        super().__init__(f"stopped by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The exit code of a stop: 128 + its signal, 130 for Python's own KeyboardInterrupt."""
    return interrupt.exit_code if isinstance(interrupt, Interrupted) else 128 + signal.SIGINT


def _handle(signal_number: int, frame: Any) -> None:
    """Record the stop; raise it now unless a deferred region waits for it (a second signal always raises)."""
    global _requested
    if _done:
        return
    interrupted = Interrupted(signal_number)
    if _requested is None:
        _requested = interrupted
        if _deferring:
            return
    raise interrupted


def _unraisable(report: Any) -> None:
    """A stop raised where Python can only print it (a ``__del__``, a weakref or GC callback) stays pending, silently."""
    if not isinstance(report.exc_value, Interrupted):
        sys.__unraisablehook__(report)


def done() -> None:
    """The command's work is done and on disk: a stop asked for from now on changes nothing, and is let pass.

    Without it a stop that lands while the command prints its last line reports a failure that did not happen.
    """
    global _done
    _done = True


def install() -> None:
    """Route the stop signals through :func:`_handle`; a signal the process was started ignoring stays ignored."""
    for number in HANDLED_SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, _handle)
    sys.unraisablehook = _unraisable


def run_command(module: str) -> NoReturn:
    """Run ``module``'s ``main()`` as a command and exit with its code (``run``, ``python -m mazerun.datasets``).

    The handlers come first: a stop asked for while the module imports (torch takes a second)
    waits for the import to end, then exits quietly with its code; raised inside the import it
    printed a traceback, or was swallowed there. Once ``main`` returns, later stop signals are
    ignored: Python's teardown restores their default action, which turned a finished command
    into one killed by the signal.
    """
    install()
    try:
        with deferred():
            main: Callable[[], int | None] = importlib.import_module(module).main
        code = main()
    except KeyboardInterrupt as interrupt:
        code = exit_code(interrupt)
    finally:
        for number in HANDLED_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
    sys.exit(code)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A region whose code calls :func:`check` often: signals wait for it there."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring:
        check()  # a stop asked for after the region's last check


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold the stop signals until the block ends, for the bookkeeping of child processes.

    A stop between starting a child and noting it would leave a process nobody ends, and one
    between reading a child's reply and noting it a child counted busy for ever. A child started
    inside inherits the held mask, so it can ignore the signals before one reaches it (Ctrl-C
    goes to the whole process group).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def check() -> None:
    """Raise the pending stop, if a signal asked for one."""
    global _requested
    if _requested is not None:
        pending, _requested = _requested, None
        raise pending


def pending() -> Interrupted | None:
    """The stop a signal asked for that :func:`check` has not raised yet (data-parallel ranks share it first)."""
    return _requested


def restated(interrupt: KeyboardInterrupt, message: str) -> KeyboardInterrupt:
    """The same stop (its signal and exit code kept) told as ``message``: where it stopped, how to go on."""
    interrupt.args = (message,)
    return interrupt
