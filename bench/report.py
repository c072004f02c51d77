"""`python -m mazerun.report` on a real sweep: how long it takes, and its numbers against rliable's.

    python bench/report.py                  # 10 BC runs through `run -m`, then the report 3 times (about 5 minutes)
    python bench/report.py --smoke          # 2 seeds, 10 updates, one report: checks the wiring, not the targets

A 5-seed x 2-config sweep of BC on 50 heuristic LunarLander episodes is trained through the real
`run -m` (`algorithm.lr=0.001,0.0003`, `runner.seed=0,1,2,3,4`, 2,000 updates each: the report
reads runs, their length does not matter). Then:

- time: `python -m mazerun.report <sweep>` as a user runs it, the whole process from start to
  exit, median of 3. Target: <= 10 s.
- numbers: each config's final and best scores, read here straight from the runs' `metrics.csv`,
  go to rliable (`get_interval_estimates` with `aggregate_iqm` and `aggregate_mean`, 50,000
  resamples, percentile intervals), and every cell of the report's table must equal rliable's at
  the 4 significant digits the table prints. rliable draws its resamples from numpy's global
  stream, so beside each row is how far rliable moves from itself in a second call.

rliable 1.2 imports arch, which fails next to pandas 3: `pip install rliable "pandas<3"` (the row
fails when rliable cannot be imported).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import yaml
from common import Table, load_average, peer_version, record, run

from mazerun.training.metrics import read_metrics_csv
from mazerun.training.report import format_number

LUNAR = "LunarLander-v3"
LEARNING_RATES = ("0.001", "0.0003")
SEEDS = (0, 1, 2, 3, 4)
COLUMNS = (("IQM", "final"), ("mean", "final"), ("IQM", "best"), ("mean", "best"))
"""The score cells of the report's table, in its order."""


def scores(sweep: Path, lr: str) -> dict[str, np.ndarray]:
    """The final and best eval/mean_return of each run of the config with learning rate ``lr``."""
    finals, bests = [], []
    for job in sorted(path.parent for path in sweep.glob("*/metrics.csv")):
        if yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["algorithm"]["lr"] != float(lr):
            continue
        rows = sorted((row for row in read_metrics_csv(job / "metrics.csv")
                       if (row["group"], row["metric"]) == ("eval", "mean_return")), key=lambda row: row["step"])
        finals.append(rows[-1]["value"])
        bests.append(max(row["value"] for row in rows))
    return {"final": np.array(finals), "best": np.array(bests)}


def rliable_cells(runs: dict[str, np.ndarray]) -> list[str]:
    """rliable's IQM and mean with their 95% intervals, as the report's table prints each cell.

    rliable 1.2 draws its resamples from numpy's global stream (``np.random.choice``; the
    ``random_state`` it takes does not reach them), so two calls on the same numbers differ by
    the bootstrap's Monte-Carlo error; :func:`main` seeds that stream once.
    """
    from rliable import library, metrics

    warnings.filterwarnings("ignore", category=FutureWarning, module="arch")
    cells = []
    for aggregate, kind in COLUMNS:
        function = metrics.aggregate_iqm if aggregate == "IQM" else metrics.aggregate_mean
        points, intervals = library.get_interval_estimates({"config": runs[kind][:, None]},
                                                           lambda x: np.array([function(x)]), reps=50_000)
        value, (low, high) = points["config"][0], intervals["config"][:, 0]
        cells.append(f"{format_number(value)} [{format_number(low)}, {format_number(high)}]")
    return cells


def report_cells(markdown: str, lr: str) -> list[str]:
    """The score cells of the table row of the config with learning rate ``lr``."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| bc algorithm.lr={lr} |")]
    assert len(rows) == 1, markdown
    return [cell.strip() for cell in rows[0].strip("|").split("|")][2:6]


def largest_gap(cells: list[str], others: list[str]) -> float:
    """The largest difference between the numbers of two rows of cells."""
    numbers = [[float(text) for text in cell.replace("[", " ").replace("]", " ").replace(",", " ").split()]
               for cell in (*cells, *others)]
    half = len(numbers) // 2
    return max(abs(a - b) for mine, theirs in zip(numbers[:half], numbers[half:]) for a, b in zip(mine, theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a scratch one)")
    parser.add_argument("--smoke", action="store_true", help="2 seeds, 10 updates, one report")
    args = parser.parse_args()
    if args.smoke:
        args.updates, args.repeats, args.seeds = 10, 1, [0, 1]
    print(f"bench/report.py, {load_average()}", file=sys.stderr)
    version = peer_version("rliable", 'pip install rliable "pandas<3"')
    table = Table(f"mazerun.report on a {len(args.seeds)}-seed x 2-config BC sweep, against rliable "
                  f"{version or '(missing)'}",
                  peer_name="rliable")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        demos = record(LUNAR, 5 if args.smoke else 50, work / "expert")
        minutes = run("-m", "-cn", "conf_train", "algorithm=bc", f"runner.dataset.dir_or_file={demos}",
                      f"algorithm.lr={','.join(LEARNING_RATES)}", f"runner.seed={','.join(map(str, args.seeds))}",
                      f"algorithm.n_updates={args.updates}", "hydra.sweep.dir=sweep", cwd=work) / 60
        print(f"  sweep of {len(LEARNING_RATES) * len(args.seeds)} runs: {minutes:.1f} min", file=sys.stderr)
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mazerun.report", "sweep", "--out", "report"], cwd=work, check=True,
                           capture_output=True)
            seconds.append(time.perf_counter() - started)
        print(f"  report: {', '.join(f'{value:.2f}' for value in seconds)} s", file=sys.stderr)
        median = statistics.median(seconds)
        table.add(f"report of {len(LEARNING_RATES) * len(args.seeds)} runs, whole process: seconds (median)", median,
                  None, "<= 10", median <= 10)
        markdown = (work / "report" / "report.md").read_text()
        for lr in LEARNING_RATES:
            ours = report_cells(markdown, lr)
            runs = scores(work / "sweep", lr)
            assert len(runs["final"]) == len(args.seeds), runs
            if version is None:
                table.add(f"lr={lr}: IQM and mean [95% CI] equal rliable's", " | ".join(ours), "missing",
                          "equal at 4 digits")
                continue
            np.random.seed(0)
            theirs, theirs_again = rliable_cells(runs), rliable_cells(runs)
            print(f"  lr={lr}\n    ours:    {ours}\n    rliable: {theirs}\n    rliable again: {theirs_again}",
                  file=sys.stderr)
            equal = ours == theirs
            table.add(f"lr={lr}: cells unequal to rliable's (of 4)", float(sum(a != b for a, b in zip(ours, theirs))),
                      None, "0", equal)
            table.add(f"lr={lr}: largest gap to rliable / rliable's 2nd call", largest_gap(ours, theirs),
                      largest_gap(theirs, theirs_again))
    print(table.render())
    print(f"({load_average()})")
    sys.exit(table.exit_code())


if __name__ == "__main__":
    main()
