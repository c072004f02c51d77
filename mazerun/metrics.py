"""One place every trainer reports numbers to: TensorBoard, ``metrics.csv`` and the console.

The CSV is in long format (``step,group,metric,value``, one row per metric) because the
metric sets differ between groups ("train", "eval") and between calls; a wide table would
need its header rewritten whenever a new metric appears. Rows are flushed after every
:meth:`MetricsLogger.log` call, so an interrupted run still leaves a valid file.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import TracebackType
from typing import Callable

from torch.utils.tensorboard import SummaryWriter

STEP_WIDTH = 5
PATH_WIDTH = 72
VALUE_WIDTH = 9
GROUP_WIDTH = 10
"""Column widths of Maze's console table; columns grow when a cell is wider."""

CSV_COLUMNS = ("step", "group", "metric", "value")


def _format_value(value: float | str) -> str:
    return value if isinstance(value, str) else f"{float(value):.3f}"


def format_table(step: int, rows: list[tuple[str, str, float | str]]) -> str:
    """Render ``(group, metric_name, value)`` rows as Maze's aligned ``step|path|value`` table.

    Floats are shown with 3 decimals, strings as given; all values are right-aligned.
    """
    paths = [f"{group:<{max(GROUP_WIDTH, len(group) + 1)}}{name}" for group, name, _ in rows]
    values = [_format_value(value) for _, _, value in rows]
    step_width = max(STEP_WIDTH, len(str(step)))
    path_width = max([PATH_WIDTH, *(len(path) for path in paths)])
    value_width = max([VALUE_WIDTH, *(len(value) for value in values)])
    lines = [
        f"{'step':>{step_width}}|{'path':<{path_width}}|{'value':>{value_width}}",
        f"{'=' * step_width}|{'=' * path_width}|{'=' * value_width}",
    ]
    for path, value in zip(paths, values):
        lines.append(f"{step:>{step_width}}|{path:<{path_width}}|{value:>{value_width}}")
    return "\n".join(lines)


class MetricsLogger:
    """Write scalar metrics to TensorBoard (``run_dir``), ``run_dir/metrics.csv`` and the console.

    TensorBoard event files go directly into ``run_dir`` so that
    ``tensorboard --logdir outputs/`` shows every run; the writer flushes them in the
    background and on :meth:`close`. An existing ``metrics.csv`` is appended to, so a
    resumed run keeps its history.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = True,
        console: bool = True,
        print_fn: Callable[[str], object] = print,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "metrics.csv"
        self._console = console
        self._print = print_fn
        self._writer = SummaryWriter(str(self.run_dir)) if tensorboard else None
        is_new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._csv_file = self.csv_path.open("a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        if is_new:
            self._csv.writerow(CSV_COLUMNS)
            self._csv_file.flush()

    def log(self, step: int, metrics: dict[str, float], group: str) -> None:
        """Record ``metrics`` at ``step`` under ``group`` (TensorBoard tag ``"{group}/{name}"``)."""
        values = {name: float(value) for name, value in metrics.items()}
        for name, value in values.items():
            self._csv.writerow((step, group, name, value))
            if self._writer is not None:
                self._writer.add_scalar(f"{group}/{name}", value, step)
        self._csv_file.flush()
        if self._console and values:
            self._print(format_table(step, [(group, name, value) for name, value in values.items()]))

    def close(self) -> None:
        """Flush and close the TensorBoard writer and the CSV file; safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._csv_file.closed:
            self._csv_file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics_csv(path: Path) -> list[dict]:
    """Rows of a ``metrics.csv`` as dicts with ``step`` (int), ``group``, ``metric`` and ``value`` (float)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return [
            {
                "step": int(row["step"]),
                "group": row["group"],
                "metric": row["metric"],
                "value": float(row["value"]),
            }
            for row in csv.DictReader(handle)
        ]
