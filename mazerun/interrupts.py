"""Ctrl-C, SIGTERM and SIGHUP as a request to stop at the next safe point.

Batch schedulers and ``timeout`` send SIGTERM, closing a terminal sends SIGHUP: all three are
handled like Ctrl-C. Inside a :func:`deferred` region (a training loop) the first signal only
sets a flag, and the loop stops at its next :func:`check`, between two updates, where its
state is whole and can be saved to be continued exactly. A second signal stops at once.
Outside such regions a signal raises :class:`Interrupted` where the program is, as Ctrl-C
always does. The CLI installs the handlers; code run without it (tests, notebooks) still gets
Python's own KeyboardInterrupt, which the loops handle the same way.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_requested: Interrupted | None = None
_deferring = 0


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; ``exit_code`` is the shell's convention, 128 + the signal number."""

    def __init__(self, signal_number: int) -> None:
        self.signal_number = signal_number
        self.signal_name = signal.Signals(signal_number).name
        super().__init__(f"stopped by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


def _handle(signal_number: int, frame: Any) -> None:
    global _requested
    interrupted = Interrupted(signal_number)
    if _deferring and _requested is None:
        _requested = interrupted
        return
    raise interrupted


def install() -> None:
    """Route the stop signals through :func:`_handle`; a signal the process was started ignoring stays ignored."""
    for number in HANDLED_SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, _handle)


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
