"""`run` and `python -m mazerun`: the stop signals are handled before Hydra and torch load (see :func:`run_command`)."""

from mazerun.core.interrupts import run_command


def main() -> None:
    run_command("mazerun.cli")


if __name__ == "__main__":
    main()
