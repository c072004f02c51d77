"""A report on runs repeated over seeds: scores with intervals, performance profiles and learning curves.

Runs are grouped by config: the composed ``.hydra/config.yaml`` with its seed keys
(``runner.seed``, ``hpo.seed``...) left out, so each seed of one config is a replicate. Per
group, the final score (the metric at a run's last report) and the best score (its highest)
are aggregated as an interquartile mean and a mean, each with a 95% stratified-bootstrap interval
(:mod:`mazerun.training.statistics`). Only finished runs (``result.json``) are aggregated; a
run still going (its directory's lock held), one that failed (``failed.txt``) and one that
stopped early are listed with their status. Runs of different envs are never one group, and the
figures give each env its own panels: scores on different scales share no axis.

A run is read from ``metrics.csv``, ``result.json`` and ``.hydra/config.yaml`` alone. The report
is a Markdown file, PNGs and one HTML page that holds the PNGs inline, each written whole.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write_bytes
from mazerun.core.rundir import FAILED_JOB, RESULT_FILE, is_locked
from mazerun.training.metrics import METRICS_CSV
from mazerun.training.statistics import (
    AGGREGATES,
    INTERVAL_REPS,
    PROFILE_REPS,
    Estimate,
    interval_estimate,
    performance_profile,
)

CONFIG_FILE = Path(".hydra") / "config.yaml"
SEED_KEY = "seed"
"""A config key whose last part is this is a replicate's seed, not part of the config."""
DEFAULT_METRIC = "eval/mean_return"
PROFILE_POINTS = 101
WALL_TIME_POINTS = 101
IMAGES = {
    "scores.png": "Final and best scores: IQM and mean with 95% bootstrap intervals",
    "performance_profile.png": "Performance profile of the final scores (share of runs above each score)",
    "curves_steps.png": "Learning curves against steps: IQM over seeds with 95% bootstrap bands",
    "curves_wall_time.png": "Learning curves against wall time: IQM over seeds with 95% bootstrap bands",
}
"""The figures of a report, in the order the page shows them, with their captions."""

FINISHED, RUNNING, FAILED, STOPPED = "finished", "running", "failed", "stopped"


@dataclass
class Run:
    """One run directory as the report sees it: its status, config and the curve of the scored metric."""

    path: Path
    status: str
    config: dict[str, Any]
    """Flattened keys (``algorithm.lr``), seeds left out."""
    seed: Any
    env_id: str | None
    steps: list[int] = field(default_factory=list)
    wall_seconds: list[float | None] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def final(self) -> float | None:
        return self.values[-1] if self.values else None

    @property
    def best(self) -> float | None:
        return max(self.values) if self.values else None


@dataclass
class Group:
    """The runs of one config (its seeds)."""

    label: str
    runs: list[Run]

    @property
    def scored(self) -> list[Run]:
        """The finished runs that logged the metric: the replicates the aggregates are over."""
        return [run for run in self.runs if run.status == FINISHED and run.values]


# --- reading runs ------------------------------------------------------------------------------------

def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Each path that is a run directory, or the run directories below it (a sweep's jobs), in order."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise MazerunError(f"{path} is not a directory; give a sweep's directory (multirun/<date>/<time>) "
                               "or run directories (outputs/<date>/<time>)")
        if (path / CONFIG_FILE).is_file():
            runs = [path]
        else:
            runs = sorted((config.parent.parent for config in path.rglob(str(CONFIG_FILE))), key=_natural_order)
        if not runs:
            raise MazerunError(f"{path} holds no run directory (none has {CONFIG_FILE}); give a sweep's directory "
                               "(multirun/<date>/<time>) or run directories (outputs/<date>/<time>)")
        found += [run for run in runs if run not in found]
    return found


def _natural_order(path: Path) -> list[Any]:
    """Job 10 after job 9: numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def read_run(path: Path, metric: str) -> Run:
    """``path``'s status, config without seeds, and the rows of ``metric`` (``<group>/<name>``) it logged."""
    config = _read_config(path / CONFIG_FILE)
    flat = flatten(config)
    seeds = {key: value for key, value in flat.items() if key.rsplit(".", 1)[-1] == SEED_KEY}
    result = _read_result(path / RESULT_FILE)
    if (path / FAILED_JOB).is_file():
        status = FAILED
    elif result is not None:
        status = FINISHED
    elif is_locked(path):
        status = RUNNING
    else:
        status = STOPPED
    env_id = result.get("env_id") if result else None
    run = Run(path, status, {key: value for key, value in flat.items() if key not in seeds},
              seeds.get("runner.seed", next(iter(seeds.values()), None)), env_id or flat.get("env.name"))
    rows = _read_metric_rows(path / METRICS_CSV, metric, torn_tail=status != FINISHED)
    run.steps = [step for step, _, _ in rows]
    run.wall_seconds = [wall for _, wall, _ in rows]
    run.values = [value for _, _, value in rows]
    return run


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``a.b.c`` keys; lists stay values (made hashable as tuples)."""
    if isinstance(config, dict):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(config, list):
        config = tuple(config)
    return {prefix[:-1]: config}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())
        raise MazerunError(f"{path} is not readable YAML ({reason}); a run's config is written by run itself: "
                           "leave that run directory out") from None
    if not isinstance(config, dict):
        raise MazerunError(f"{path} is not a config (a YAML mapping); leave that run directory out")
    return config


def _read_result(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MazerunError(f"{path} is not readable JSON ({error}); leave that run directory out") from None
    if not isinstance(result, dict):
        raise MazerunError(f"{path} is not a run's result (a JSON object); leave that run directory out")
    return result


def _read_metric_rows(path: Path, metric: str, torn_tail: bool) -> list[tuple[int, float | None, float]]:
    """(step, wall_seconds, value) of ``metric`` in step order; none for a run with no metrics.csv yet.

    With ``torn_tail`` (a run that has not finished), a last line that does not parse is one the run
    was writing when the file was read, and is left out.
    """
    if not path.is_file():
        return []
    group, _, name = metric.rpartition("/")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            lines = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise MazerunError(f"{path} is not a readable metrics.csv ({error}); leave that run directory out") from None
    rows = []
    for index, row in enumerate(lines):
        if row.get("group") != group or row.get("metric") != name:
            continue
        try:
            wall = row.get("wall_seconds")
            rows.append((int(row["step"]), float(wall) if wall else None, float(row["value"])))
        except (TypeError, ValueError):
            if torn_tail and index == len(lines) - 1:
                break
            raise MazerunError(f"{path}, line {index + 2}: {row.get('step')!r}, {row.get('value')!r} is not a step and "
                               "a number; a metrics.csv is written by run itself: leave that run directory out") from None
    rows.sort(key=lambda row: row[0])
    return rows


def logged_metrics(paths: Iterable[Path]) -> list[str]:
    """Every ``<group>/<name>`` of the given metrics.csv files: what ``--metric`` may name."""
    names: set[str] = set()
    for path in paths:
        if path.is_file():
            with path.open(newline="", encoding="utf-8", errors="replace") as handle:
                names.update(f"{row.get('group')}/{row.get('metric')}" for row in csv.DictReader(handle))
    return sorted(names)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs of one env with equal configs (seeds aside) as one group each, in the order their first run came."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps([run.env_id, sorted(run.config.items())], default=str), []).append(run)
    members = list(groups.values())
    configs = [runs[0].config for runs in members]
    several_envs = len({runs[0].env_id for runs in members} - {None}) > 1  # a run that failed early names none
    return [Group(_label(runs, configs, several_envs), runs) for runs in members]


def _trainer(config: dict[str, Any]) -> str:
    return str(config.get("algorithm.name") or config.get("pipeline.name") or "recording")


def _label(runs: list[Run], configs: list[dict[str, Any]], several_envs: bool) -> str:
    """The group's algorithm, then the keys it sets that differ from the other groups of that algorithm, then its
    env where the groups span several; a report of one config names its algorithm and env."""
    config = runs[0].config
    trainer = _trainer(config)
    env = runs[0].env_id
    if len(configs) == 1:
        return f"{trainer} on {env}" if env else trainer
    peers = [other for other in configs if _trainer(other) == trainer]
    differing = sorted(key for key in config if any(other.get(key) != config[key] for other in peers)
                       and not (several_envs and key == "env.name"))
    words = [trainer, *(f"{key}={_format_value(config[key])}" for key in differing)]
    return " ".join(words + ([f"on {env}"] if several_envs and env else []))


def by_env(groups: list[Group]) -> dict[str | None, list[tuple[int, Group]]]:
    """The groups of each env, with each group's index (its colour in every figure).

    A group whose runs name no env (they failed before writing a result, so nothing of them is
    drawn) goes with the first env.
    """
    known = [group.runs[0].env_id for group in groups if group.runs[0].env_id]
    envs: dict[str | None, list[tuple[int, Group]]] = {}
    for index, group in enumerate(groups):
        envs.setdefault(group.runs[0].env_id or (known[0] if known else None), []).append((index, group))
    return envs


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


# --- the numbers ---------------------------------------------------------------------------------------

@dataclass
class GroupScores:
    """A group's aggregates: (aggregate name, final or best) -> estimate."""

    group: Group
    estimates: dict[tuple[str, str], Estimate]


def score_groups(groups: list[Group]) -> list[GroupScores]:
    """IQM and mean of the final and the best scores of every group's finished runs, with their intervals."""
    scored = []
    for group in groups:
        estimates: dict[tuple[str, str], Estimate] = {}
        runs = group.scored
        if runs:
            for kind in ("final", "best"):
                scores = np.array([getattr(run, kind) for run in runs])
                for name, aggregate in AGGREGATES.items():
                    estimates[name, kind] = interval_estimate(scores, aggregate)
        scored.append(GroupScores(group, estimates))
    return scored


def format_number(value: float | None) -> str:
    """4 significant digits, as the console tables print them; a dash for a missing value."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"


def format_estimate(estimate: Estimate | None) -> str:
    if estimate is None:
        return "–"
    return f"{format_number(estimate.value)} [{format_number(estimate.low)}, {format_number(estimate.high)}]"


SCORE_COLUMNS = [("IQM", "final"), ("mean", "final"), ("IQM", "best"), ("mean", "best")]


def score_table(scores: list[GroupScores]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the table of groups."""
    header = ["config", "seeds", *(f"{kind} {name} [95% CI]" for name, kind in SCORE_COLUMNS)]
    rows = []
    for entry in scores:
        counts = f"{len(entry.group.scored)} of {len(entry.group.runs)}"
        rows.append([entry.group.label, counts, *(format_estimate(entry.estimates.get(column))
                                                  for column in SCORE_COLUMNS)])
    return header, rows


def run_table(groups: list[Group], root: Path) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the table of runs: where, which group and seed, how it stands, its scores."""
    header = ["run", "config", "seed", "status", "last step", "final", "best"]
    rows = []
    for group in groups:
        for run in group.runs:
            rows.append([_relative(run.path, root), group.label, str(run.seed), run.status,
                         str(run.steps[-1]) if run.steps else "–", format_number(run.final), format_number(run.best)])
    return header, rows


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def step_curve(runs: list[Run], reps: int = PROFILE_REPS) -> tuple[np.ndarray, list[Estimate]]:
    """IQM over the runs at every step any of them reported, with bootstrap intervals (over the runs there)."""
    steps = sorted({step for run in runs for step in run.steps})
    estimates = []
    for step in steps:
        values = np.array([value for run in runs for at, value in zip(run.steps, run.values) if at == step])
        estimates.append(interval_estimate(values, AGGREGATES["IQM"], reps=reps))
    return np.array(steps), estimates


def wall_time_curve(runs: list[Run], points: int = WALL_TIME_POINTS,
                    reps: int = PROFILE_REPS) -> tuple[np.ndarray, list[Estimate]]:
    """IQM over the runs of the score each had reached at each time, from when all had one to when the first ended.

    If a run ended before another's first report (runs of very different speeds), that first report is the one
    time at which every run has a score. Runs without wall_seconds (files written before the column) are left out.
    """
    timed = [run for run in runs if run.wall_seconds and all(wall is not None for wall in run.wall_seconds)]
    if not timed:
        return np.array([]), []
    start = max(run.wall_seconds[0] for run in timed)
    end = min(run.wall_seconds[-1] for run in timed)
    times = np.linspace(start, end, points) if end > start else np.array([start])
    reached = np.array([np.array(run.values)[np.searchsorted(np.array(run.wall_seconds), times, side="right") - 1]
                        for run in timed])  # (runs, times): the last report at or before each time
    return times, [interval_estimate(reached[:, index], AGGREGATES["IQM"], reps=reps) for index in range(len(times))]


# --- figures ---------------------------------------------------------------------------------------------

def _figure(width: float = 7.5, height: float = 4.5, layout: str | None = None) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any, tight: bool = True) -> bytes:
    if tight:
        figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    return image.getvalue()


def _colour(index: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def plot_scores(scores: list[GroupScores], metric: str) -> bytes:
    """One panel per (aggregate, final/best) and env: a dot per group with its interval as a bar, as rliable plots
    them."""
    envs = by_env([entry.group for entry in scores])
    figure = _figure(10, sum(1.5 + 0.6 * len(members) for members in envs.values()), layout="constrained")
    rows = figure.subfigures(len(envs), 1, squeeze=False,
                             height_ratios=[1 + 0.6 * len(members) for members in envs.values()])[:, 0]
    for row_figure, (env, members) in zip(rows, envs.items()):
        panels = row_figure.subplots(1, len(SCORE_COLUMNS), sharey=True, squeeze=False)[0]
        for panel, column in zip(panels, SCORE_COLUMNS):
            for row, (index, group) in enumerate(members):
                estimate = scores[index].estimates.get(column)
                if estimate is None:
                    continue
                panel.plot([estimate.low, estimate.high], [row, row], color=_colour(index), linewidth=6, alpha=0.6,
                           solid_capstyle="butt")
                panel.plot([estimate.value], [row], marker="|", markersize=14, color="black")
            panel.set_title(f"{column[1]} {column[0]}" + (f", {env}" if len(envs) > 1 else ""), fontsize="small")
            panel.grid(axis="x", alpha=0.3)
            panel.set_xlabel(metric)
        panels[0].set_yticks(range(len(members)), [textwrap.fill(group.label, 40) for _, group in members])
        panels[0].set_ylim(len(members) - 0.4, -0.6)  # the first group on top, as in the table
    return _png(figure, tight=False)  # constrained layout, which subfigures take


def _env_panels(groups: list[Group], title: str) -> tuple[Any, list[tuple[Any, str | None, list[tuple[int, Group]]]]]:
    """A figure with one panel per env side by side, each with that env's groups."""
    envs = by_env(groups)
    figure = _figure(7.5 * len(envs) if len(envs) > 1 else 7.5, 4.5)
    panels = figure.subplots(1, len(envs), squeeze=False)[0]
    for panel, env in zip(panels, envs):
        if len(envs) > 1:
            panel.set_title(f"{title} on {env}")
    return figure, [(panel, env, members) for panel, (env, members) in zip(panels, envs.items())]


def plot_profile(groups: list[Group], metric: str) -> bytes:
    """Share of each group's runs whose final score exceeds tau, over the range of its env's final scores."""
    figure, panels = _env_panels(groups, "performance profile")
    for axes, _, members in panels:
        finals = [run.final for _, group in members for run in group.scored]
        if not finals:
            continue
        low, high = min(finals), max(finals)
        margin = 0.05 * (high - low) or 1.0
        thresholds = np.linspace(low - margin, high + margin, PROFILE_POINTS)
        for index, group in members:
            if not group.scored:
                continue
            profile, band_low, band_high = performance_profile(np.array([run.final for run in group.scored]),
                                                               thresholds)
            axes.plot(thresholds, profile, color=_colour(index), label=group.label)
            axes.fill_between(thresholds, band_low, band_high, color=_colour(index), alpha=0.2, linewidth=0)
        axes.set_xlabel(f"final {metric} (tau)")
        axes.set_ylabel("share of runs with score > tau")
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return _png(figure)


def plot_curves(groups: list[Group], metric: str, against_time: bool) -> bytes:
    """Each group's IQM curve over its finished runs with its 95% band, against steps or wall time."""
    figure, panels = _env_panels(groups, "learning curves")
    for axes, _, members in panels:
        for index, group in members:
            if not group.scored:
                continue
            xs, estimates = wall_time_curve(group.scored) if against_time else step_curve(group.scored)
            if not estimates:
                continue
            step = "post" if against_time else None  # a run's score holds from one report to the next
            axes.plot(xs, [estimate.value for estimate in estimates], color=_colour(index), label=group.label,
                      marker=None if against_time else "o", markersize=3,
                      drawstyle="steps-post" if step else "default")
            axes.fill_between(xs, [estimate.low for estimate in estimates], [estimate.high for estimate in estimates],
                              color=_colour(index), alpha=0.2, linewidth=0, step=step)
        axes.set_xlabel("wall time (seconds of training)" if against_time else "steps (updates or env steps)")
        axes.set_ylabel(f"{metric} (IQM over seeds)")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no run logged wall_seconds (metrics.csv written before the column)",
                      ha="center", va="center", transform=axes.transAxes)
    return _png(figure)


# --- pages ---------------------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def intro(metric: str, scored_runs: int, runs: int) -> str:
    return (f"Scores are `{metric}`: final is its value at a run's last report, best its highest. Aggregates are over "
            f"the {scored_runs} finished runs of {runs}, grouped by config (seeds aside): interquartile mean (IQM) and "
            f"mean, with 95% stratified-bootstrap intervals (percentile method, {INTERVAL_REPS:,} resamples, as rliable "
            "computes them).")


HTML_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
              "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
              "th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}")


def write_report(paths: Iterable[str | Path], out: Path, metric: str = DEFAULT_METRIC) -> str:
    """Read the runs under ``paths``, write ``report.md``, the PNGs and ``report.html`` into ``out``; says what it wrote."""
    if "/" not in metric:
        raise MazerunError(f"--metric {metric} names no logged metric; write <group>/<name> as in metrics.csv, "
                           "e.g. eval/mean_return")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MazerunError(f"--out {out} is a file; give a directory for the report")
    run_dirs = find_run_dirs(paths)
    runs = [read_run(path, metric) for path in run_dirs]
    if not any(run.values for run in runs if run.status == FINISHED):
        finished = [run for run in runs if run.status == FINISHED]
        if not finished:
            raise MazerunError(f"none of the {len(runs)} runs has finished (no {RESULT_FILE}); report again when one has")
        known = ", ".join(logged_metrics(run.path / METRICS_CSV for run in finished)) or "none"
        raise MazerunError(f"no finished run logged {metric}; choose --metric among: {known}")
    groups = group_runs(runs)
    scores = score_groups(groups)
    root = Path.cwd()
    figures = {
        "scores.png": plot_scores(scores, metric),
        "performance_profile.png": plot_profile(groups, metric),
        "curves_steps.png": plot_curves(groups, metric, against_time=False),
        "curves_wall_time.png": plot_curves(groups, metric, against_time=True),
    }
    tables = [("Scores", score_table(scores)), ("Runs", run_table(groups, root))]
    text = intro(metric, sum(len(group.scored) for group in groups), len(runs))
    markdown = [f"# Report: {metric}", "", text, ""]
    for title, (header, rows) in tables:
        markdown += [f"## {title}", "", markdown_table(header, rows), ""]
    markdown += ["## Figures", ""] + [f"![{caption}]({name})\n" for name, caption in IMAGES.items()]
    page = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Report: {html.escape(metric)}</title>",
            f"<style>{HTML_STYLE}</style></head><body><h1>Report: {html.escape(metric)}</h1>",
            f"<p>{html.escape(text).replace('`', '')}</p>"]
    page += [f"<h2>{title}</h2>{html_table(header, rows)}" for title, (header, rows) in tables]
    page += [f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,"
             f"{base64.b64encode(figures[name]).decode()}'><figcaption>{html.escape(caption)}</figcaption></figure>"
             for name, caption in IMAGES.items()]
    page.append("</body></html>")
    out.mkdir(parents=True, exist_ok=True)
    for name, image in figures.items():
        atomic_write_bytes(out / name, image)
    atomic_write_bytes(out / "report.md", "\n".join(markdown).encode())
    atomic_write_bytes(out / "report.html", "\n".join(page).encode())
    statuses = ", ".join(f"{sum(run.status == status for run in runs)} {status}"
                         for status in (FINISHED, RUNNING, FAILED, STOPPED) if any(run.status == status for run in runs))
    return (f"{len(runs)} runs ({statuses}) in {len(groups)} config{'s' * (len(groups) > 1)}: "
            f"wrote {out / 'report.md'}, {out / 'report.html'} and {len(figures)} PNGs")
