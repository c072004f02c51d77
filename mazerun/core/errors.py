"""The one exception type whose message is shown to the user as a one-line error."""

from __future__ import annotations

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
