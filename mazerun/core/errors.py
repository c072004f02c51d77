"""The one exception type whose message is shown to the user as a one-line error."""

from __future__ import annotations

import signal
from typing import Any


def one_line(text: str) -> str:
    """``text`` with every line break (and the indentation after it) collapsed to one space.

    numpy arrays and gymnasium spaces print over several lines; an ``error:`` line must stay one line.
    """
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class MazerunError(Exception):
    """Bad input or state the user can fix; the CLI prints the message, always one line, and exits non-zero."""

    def __init__(self, message: Any = "", *args: Any) -> None:
        super().__init__(one_line(str(message)), *args)


def how_it_ended(exitcode: int | None) -> tuple[str, str]:
    """A dead child process's exit, as a phrase and as a short note: ("was killed by SIGKILL", "SIGKILL")."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"was killed by {name}", name
    return f"exited with code {exitcode}", f"exit code {exitcode}"
