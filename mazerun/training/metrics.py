"""One place every trainer reports numbers to: TensorBoard, ``metrics.csv``, the console and learning curves.

The CSV is in long format (``step,group,metric,value,wall_seconds``, one row per metric) because
the metric sets differ between groups ("train", "eval") and between calls; a wide table would
need its header rewritten whenever a new metric appears. ``wall_seconds`` is the training time
when the row was logged (a continued run counts on from its history), so curves can be drawn
against time as well as steps; rows of files written before it have it empty. Rows are flushed
after every :meth:`MetricsLogger.log` call, so an interrupted run still leaves a valid file.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Callable

from mazerun.core.files import atomic_write_bytes

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

STEP_WIDTH = 5
PATH_WIDTH = 72
VALUE_WIDTH = 9
GROUP_WIDTH = 10
"""Column widths of Maze's console table; columns grow when a cell is wider."""

CSV_COLUMNS = ("step", "group", "metric", "value", "wall_seconds")
METRICS_CSV = "metrics.csv"
LEARNING_CURVE = "learning_curve.svg"


def _format_value(value: float | str) -> str:
    """Numbers with 4 significant digits (a learning rate of 3e-4 stays readable), strings as given."""
    return value if isinstance(value, str) else f"{float(value):.4g}"


def format_table(step: int, rows: list[tuple[str, str, float | str]]) -> str:
    """Render ``(group, metric_name, value)`` rows as Maze's aligned ``step|path|value`` table.

    Numbers are shown with 4 significant digits, strings as given; all values are right-aligned.
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
    resumed run keeps its history, and its clock starts at the history's last ``wall_seconds``.
    ``step_offset`` is added to every step: the stages of a pipeline report against one counter,
    so their curves line up end to end.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = True,
        console: bool = True,
        print_fn: Callable[[str], object] = print,
        step_offset: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / METRICS_CSV
        self.step_offset = step_offset
        self._console = console
        self._print = print_fn
        self._writer: SummaryWriter | None = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # a second or so of imports: only when logging

            self._writer = SummaryWriter(str(self.run_dir))
        is_new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._clock_start = time.monotonic() - (0.0 if is_new else _last_wall_seconds(self.csv_path))
        self._csv_file = self.csv_path.open("a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        if is_new:
            self._csv.writerow(CSV_COLUMNS)
            self._csv_file.flush()

    def log(self, step: int, metrics: dict[str, float], group: str) -> None:
        """Record ``metrics`` at ``step`` (plus the offset) under ``group`` (TensorBoard tag ``"{group}/{name}"``)."""
        step += self.step_offset
        values = {name: float(value) for name, value in metrics.items()}
        wall_seconds = round(time.monotonic() - self._clock_start, 3)
        for name, value in values.items():
            self._csv.writerow((step, group, name, value, wall_seconds))
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


def _last_wall_seconds(path: Path) -> float:
    """The training time a metrics.csv's history reached (0 for a file written before the column)."""
    times = [row["wall_seconds"] for row in read_metrics_csv(path, wall_seconds=True)]
    return max((value for value in times if value is not None), default=0.0)


def read_metrics_csv(path: Path, wall_seconds: bool = False) -> list[dict]:
    """Rows of a ``metrics.csv`` as dicts with ``step`` (int), ``group``, ``metric`` and ``value`` (float).

    With ``wall_seconds``, rows carry it too (None where a file written before the column lacks it).
    """
    with Path(path).open(newline="", encoding="utf-8") as handle:
        rows = []
        for row in csv.DictReader(handle):
            parsed = {"step": int(row["step"]), "group": row["group"], "metric": row["metric"],
                      "value": float(row["value"])}
            if wall_seconds:
                parsed["wall_seconds"] = float(row["wall_seconds"]) if row.get("wall_seconds") else None
            rows.append(parsed)
        return rows


def copy_metrics_history(source_dir: Path, run_dir: Path, up_to_step: int) -> None:
    """Start ``run_dir``'s metrics.csv with the rows of ``source_dir``'s up to ``up_to_step``.

    A continued run then holds its whole history; rows logged after the checkpoint it
    continues from are left out, since the continued run logs those steps again.
    """
    source = Path(source_dir) / METRICS_CSV
    if not source.is_file():
        return
    kept = [row for row in read_metrics_csv(source, wall_seconds=True) if row["step"] <= up_to_step]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    writer.writerows((row["step"], row["group"], row["metric"], row["value"],
                      "" if row["wall_seconds"] is None else row["wall_seconds"]) for row in kept)
    atomic_write_bytes(Path(run_dir) / METRICS_CSV, text.getvalue().encode())


def evaluation_curve(run_dir: Path, metric: str = "mean_return") -> tuple[list[int], list[float]]:
    """Steps and values of ``eval/<metric>`` in a run's metrics.csv (empty if none)."""
    path = Path(run_dir) / METRICS_CSV
    if not path.is_file():
        return [], []
    rows = [row for row in read_metrics_csv(path) if row["group"] == "eval" and row["metric"] == metric]
    return [row["step"] for row in rows], [row["value"] for row in rows]


def plot_curves(path: Path, curves: dict[str, tuple[list[int], list[float]]], title: str,
                xlabel: str = "environment steps") -> None:
    """Line plots of evaluation return against steps (one per label), written atomically as SVG."""
    from mazerun.training.linechart import line_chart_svg

    atomic_write_bytes(Path(path), line_chart_svg(curves, title, xlabel, "evaluation return").encode())


def write_learning_curve(run_dir: Path, title: str, xlabel: str = "environment steps") -> None:
    """Evaluation return against steps over the run's whole history (continued runs included), as SVG."""
    steps, returns = evaluation_curve(run_dir)
    if steps:
        plot_curves(Path(run_dir) / LEARNING_CURVE, {"eval mean return": (steps, returns)}, title, xlabel)


def last_value(run_dir: Path, name: str) -> float:
    """The value of ``name`` at a run's last report, for a sweeper (``optimized_metric``).

    Training runs read their ``metrics.csv`` (``<group>/<metric>``; a pipeline its last stage
    that logged it), recordings their ``rollout_stats.json`` (``mean``, ``median_step_count``...).
    """
    import json

    from mazerun.core.errors import MazerunError

    run_dir = Path(run_dir)
    stats_file = run_dir / "rollout_stats.json"
    if stats_file.is_file() and not (run_dir / METRICS_CSV).is_file():
        stats = json.loads(stats_file.read_text())
        if name in stats and isinstance(stats[name], (int, float)):
            return float(stats[name])
        known = ", ".join(key for key, value in stats.items() if isinstance(value, (int, float)))
        raise MazerunError(f"optimized_metric={name} is not a statistic of this recording; choose one of: {known}")
    files = sorted(run_dir.glob(f"**/{METRICS_CSV}"), key=lambda path: path.stat().st_mtime)
    logged: list[str] = []
    for path in reversed(files):
        rows = [row for row in read_metrics_csv(path) if f"{row['group']}/{row['metric']}" == name]
        if rows:
            return max(rows, key=lambda row: row["step"])["value"]
        logged += [f"{row['group']}/{row['metric']}" for row in read_metrics_csv(path)]
    known = ", ".join(sorted(set(logged))) or "none"
    raise MazerunError(f"optimized_metric={name} was never logged by this run; logged metrics: {known}")

