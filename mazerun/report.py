"""``python -m mazerun.report``: a report on runs repeated over seeds (a ``run -m runner.seed=0,1,2 ...`` sweep).

The reading, the statistics and the figures are :mod:`mazerun.training.report`'s; this entry is
the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from mazerun.core import interrupts

if __name__ == "__main__":  # stop signals handled before numpy and matplotlib load
    interrupts.run_command("mazerun.report")

from mazerun.core.errors import MazerunError
from mazerun.training.report import DEFAULT_METRIC, write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mazerun.report",
        description="Group runs by config (seeds aside) and report their final and best scores (IQM and mean with "
                    "95%% bootstrap intervals), performance profiles and learning curves, as Markdown, PNGs and HTML.",
    )
    parser.add_argument("runs", nargs="+", help="a sweep's directory (multirun/<date>/<time>) or run directories")
    parser.add_argument("--out", default="report", type=Path, help="directory the report is written to (default: report)")
    parser.add_argument("--metric", default=DEFAULT_METRIC,
                        help=f"the score, <group>/<name> of metrics.csv, higher is better (default: {DEFAULT_METRIC})")
    arguments = parser.parse_args(argv)
    try:
        print(write_report(arguments.runs, arguments.out, arguments.metric))
    except MazerunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write the report to {arguments.out}: {error.strerror or error}; "
              "give --out a writable directory", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print("error: stopped; files already written are whole", file=sys.stderr)
        return interrupts.exit_code(interrupt)
    return 0
