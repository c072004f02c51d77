"""The one exception type whose message is shown to the user as a one-line error."""


class MazerunError(Exception):
    """Bad input or state the user can fix; the CLI prints the message and exits non-zero."""
