"""`python -m mazerun.report` on a real seed sweep, a running and a failed run; its statistics by hand-computed cases."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, spawn_cli

from mazerun.acting.rollout import rollout
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.core.rundir import is_locked
from mazerun.training.metrics import read_metrics_csv
from mazerun.training.statistics import interquartile_means, interval_estimate, means, performance_profile

REPORT = (sys.executable, "-m", "mazerun.report")
SEEDS = (0, 1, 2, 3)
TINY_BC = ["-cn", "conf_train", "algorithm=bc", "algorithm.n_updates=40", "algorithm.eval_every=10",
           "runner.eval_repeats=1", "runner.max_episode_steps=30", "model.hidden_sizes=[16]",
           "algorithm.batch_size=32", "device=cpu"]
FIGURES = ("scores.png", "performance_profile.png", "curves_steps.png", "curves_wall_time.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-seed BC sweep (``sweep/``) and a sweep whose one job failed (``failed/``), on 4 expert episodes."""
    root = tmp_path_factory.mktemp("report")
    rollout("LunarLander-v3", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=4, max_episode_steps=60),
            root / "expert", print_fn=lambda _: None)
    records = f"runner.dataset.dir_or_file={root / 'expert' / 'trajectory_data'}"
    sweep = run_cli("-m", *TINY_BC, records, f"runner.seed={','.join(map(str, SEEDS))}", "hydra.sweep.dir=sweep",
                    cwd=root)
    assert sweep.returncode == 0, sweep.stderr
    failed = run_cli("-m", *TINY_BC, records, "runner.seed=0", "algorithm.validation_percentage=100",
                     "hydra.sweep.dir=failed", cwd=root)
    assert failed.returncode == 2 and (root / "failed" / "0" / "failed.txt").is_file(), failed.stderr
    return root


def report(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(*arguments, program=REPORT, cwd=cwd, timeout=120)


def scores(sweep: Path) -> tuple[list[float], list[float]]:
    """Each job's eval/mean_return at its last report and at its best, read straight from its metrics.csv."""
    finals, bests = [], []
    for job in sorted(path.parent for path in sweep.glob("*/metrics.csv")):
        rows = [row for row in read_metrics_csv(job / "metrics.csv")
                if (row["group"], row["metric"]) == ("eval", "mean_return")]
        finals.append(max(rows, key=lambda row: row["step"])["value"])
        bests.append(max(row["value"] for row in rows))
    return finals, bests


def table_row(markdown: str, first_cell: str) -> list[str]:
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, markdown
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_a_seed_sweep_with_a_running_and_a_failed_run_gives_the_hand_computed_scores_figures_and_statuses(
    runs: Path,
) -> None:
    with spawn_cli(*TINY_BC, f"runner.dataset.dir_or_file={runs / 'expert' / 'trajectory_data'}",
                   "algorithm.n_updates=100000000", "hydra.run.dir=running",
                   cwd=runs) as running:
        deadline = time.monotonic() + 120
        logged = runs / "running" / "metrics.csv"
        while not (logged.is_file() and "eval,mean_return" in logged.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert is_locked(runs / "running"), "the long run never started"
        result = report("sweep", "failed", "running", "--out", "report", cwd=runs)
        assert running.poll() is None  # still going while the report read it
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("6 runs (4 finished, 1 running, 1 failed) in 3 configs: wrote report/report.md, "
                                     "report/report.html and 4 PNGs")
    markdown = (runs / "report" / "report.md").read_text()

    cells = table_row(markdown, "bc algorithm.n_updates=40 algorithm.validation_percentage=10.0")
    assert cells[1] == "4 of 4"
    for kind, values, (iqm_cell, mean_cell) in zip(("final", "best"), scores(runs / "sweep"), (cells[2:4], cells[4:6])):
        values = sorted(values)
        assert len(set(values)) == 4, values  # four seeds, four different clones
        iqm, mean = (values[1] + values[2]) / 2, sum(values) / 4  # 4 runs: the IQM drops one at each end
        assert iqm_cell.startswith(f"{iqm:.4g} [") and mean_cell.startswith(f"{mean:.4g} ["), kind
        tolerance = 5e-4 * max(abs(value) for value in values)  # the table rounds to 4 significant digits
        for cell in (iqm_cell, mean_cell):
            low, high = (float(bound) for bound in cell.split("[")[1].rstrip("]").split(","))
            assert values[0] - tolerance <= low <= high <= values[-1] + tolerance, (kind, cell)

    assert table_row(markdown, "running")[3] == "running" and int(table_row(markdown, "running")[4]) >= 10
    assert table_row(markdown, "failed/0")[3] == "failed"
    assert [table_row(markdown, f"sweep/{seed}")[2:4] for seed in SEEDS] == [[str(seed), "finished"] for seed in SEEDS]

    page = (runs / "report" / "report.html").read_text()
    for name in FIGURES:
        image = (runs / "report" / name).read_bytes()
        assert image[:4] == b"\x89PNG" and f"]({name})" in markdown
        assert f"data:image/png;base64,{base64.b64encode(image).decode()}" in page
    assert "<td>running</td>" in page and "<td>failed</td>" in page

    stopped = report("running", "sweep", "--out", "again", cwd=runs)  # killed: its lock is free, no result.json
    assert stopped.returncode == 0, stopped.stderr
    assert table_row((runs / "again" / "report.md").read_text(), "running")[3] == "stopped"


def test_the_curves_follow_every_reported_step_and_the_runs_wall_time(runs: Path) -> None:
    from mazerun.training.report import find_run_dirs, read_run, step_curve, wall_time_curve

    sweep = [read_run(path, "eval/mean_return") for path in find_run_dirs([runs / "sweep"])]
    steps, estimates = step_curve(sweep)
    assert steps.tolist() == [10, 20, 30, 40]
    at_end = sorted(run.values[-1] for run in sweep)
    assert estimates[-1].value == pytest.approx((at_end[1] + at_end[2]) / 2)
    times, timed = wall_time_curve(sweep)
    first_report, first_end = max(run.wall_seconds[0] for run in sweep), min(run.wall_seconds[-1] for run in sweep)
    assert times[0] == first_report and times[-1] == max(first_end, first_report)  # a loaded machine may end one early
    assert all(estimate.low <= estimate.value <= estimate.high for estimate in timed)


@pytest.mark.parametrize(("arguments", "message"), [
    (["nowhere"], "error: nowhere is not a directory; give a sweep's directory"),
    (["expert"], "error: expert holds no run directory (none has .hydra/config.yaml)"),
    (["failed"], "error: none of the 1 runs has finished (no result.json); report again when one has"),
    (["sweep", "--metric", "eval/success_rate"], "error: no finished run logged eval/success_rate; choose --metric "
                                                 "among: eval/mean_length, eval/mean_return, eval/std_return, train/"),
    (["sweep", "--metric", "mean_return"], "error: --metric mean_return names no logged metric; write <group>/<name>"),
    (["sweep", "--out", "expert/trajectory_data/episode_00000000.pkl"], "is a file; give a directory for the report"),
])
def test_bad_input_is_one_line(runs: Path, arguments: list[str], message: str) -> None:
    result = report(*arguments, cwd=runs)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_damaged_config_or_metrics_file_is_one_line_naming_it(runs: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(runs / "sweep" / "0", tmp_path / "broken"))
    (broken / ".hydra" / "config.yaml").write_text("runner: [seed: 0\n")
    result = report(str(broken), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {broken / '.hydra' / 'config.yaml'} is not readable YAML")
    shutil.copy2(runs / "sweep" / "0" / ".hydra" / "config.yaml", broken / ".hydra" / "config.yaml")
    with (broken / "metrics.csv").open("a") as handle:
        handle.write("50,eval,mean_return,lots,1.0\n")
    result = report(str(broken), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "metrics.csv, line" in result.stderr and "'lots' is not a step and a number" in result.stderr


def test_the_line_an_unfinished_run_was_writing_is_left_out(runs: Path, tmp_path: Path) -> None:
    unfinished = Path(shutil.copytree(runs / "sweep" / "0", tmp_path / "unfinished"))
    (unfinished / "result.json").unlink()
    with (unfinished / "metrics.csv").open("a") as handle:
        handle.write("50,eval,mean_return,")  # read while the run wrote this row
    (tmp_path / "finished").symlink_to(runs / "sweep" / "1")
    result = report(str(unfinished), "finished", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert table_row((tmp_path / "report" / "report.md").read_text(), "unfinished")[3:5] == ["stopped", "40"]


def test_runs_of_different_envs_are_grouped_and_drawn_apart(runs: Path, tmp_path: Path) -> None:
    """The same BC settings on CartPole beside the LunarLander sweep: two groups, each named by its env, each scored
    on its own runs, and every figure with one panel per env."""
    rollout("CartPole-v1", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=4, max_episode_steps=60),
            tmp_path / "expert", print_fn=lambda _: None)
    sweep = run_cli("-m", *TINY_BC, f"runner.dataset.dir_or_file={tmp_path / 'expert' / 'trajectory_data'}",
                    "runner.seed=0,1", "hydra.sweep.dir=cartpole", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    (tmp_path / "lunar").symlink_to(runs / "sweep")
    result = report("lunar", "cartpole", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("6 runs (6 finished) in 2 configs"), result.stdout

    markdown = (tmp_path / "report" / "report.md").read_text()
    for env, sweep_dir, seeds in (("LunarLander-v3", runs / "sweep", 4), ("CartPole-v1", tmp_path / "cartpole", 2)):
        rows = [line for line in markdown.splitlines() if line.startswith("| bc ") and line.split("|")[1].strip()
                .endswith(f" on {env}")]
        assert len(rows) == 1, markdown
        cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
        finals = sorted(scores(sweep_dir)[0])
        assert cells[1] == f"{seeds} of {seeds}"
        mean = sum(finals) / len(finals)
        assert cells[3].startswith(f"{mean:.4g} ["), (env, cells[3])  # its own runs' mean, no other env's
    for name in FIGURES:  # one panel per env, side by side or one above the other
        width, height = (int.from_bytes((tmp_path / "report" / name).read_bytes()[offset:offset + 4], "big")
                         for offset in (16, 20))
        assert (width >= 1500) if name != "scores.png" else (height >= 2 * 150), (name, width, height)


# --- the statistics, by hand ---------------------------------------------------------------------------

def test_the_interquartile_mean_cuts_a_quarter_at_each_end_and_is_the_mean_below_four_scores() -> None:
    assert interquartile_means(np.array([[7.0, 1, 100, 3, 2, 6, 4, 5]])).tolist() == [4.5]  # mean of 3, 4, 5, 6
    assert interquartile_means(np.array([[1.0, 2, 3, 10]])).tolist() == [2.5]
    assert interquartile_means(np.array([[1.0, 2, 9]])).tolist() == [4.0]
    assert means(np.array([[1.0, 2, 3, 10]])).tolist() == [4.0]


def test_the_bootstrap_interval_is_seeded_and_its_percentiles_are_those_of_the_resampled_statistic() -> None:
    # two runs: a resample's mean is 0, 0.5 or 1 (probability 1/4, 1/2, 1/4); the 95% interval spans them all
    assert interval_estimate(np.array([0.0, 1.0]), means) == interval_estimate(np.array([1.0, 0.0]), means, seed=0)
    estimate = interval_estimate(np.array([0.0, 1.0]), means, reps=4000)
    assert (estimate.value, estimate.low, estimate.high) == (0.5, 0.0, 1.0)
    assert interval_estimate(np.array([3.0, 3.0, 3.0]), interquartile_means).low == 3.0
    scores = np.array([1.0, 5.0, 2.0, 8.0, 3.0])
    assert interval_estimate(scores, means, reps=100, seed=1) == interval_estimate(scores, means, reps=100, seed=1)
    assert interval_estimate(scores, means, reps=100, seed=1) != interval_estimate(scores, means, reps=100, seed=2)


def test_the_bootstrap_is_stratified_each_task_draws_from_its_own_runs() -> None:
    # task 0 always scores 0 and task 1 always 10: every stratified resample holds 3 of each, so its mean is 5;
    # drawing from all six scores at once would give means from 0 to 10
    scores = np.array([[0.0, 10.0], [0.0, 10.0], [0.0, 10.0]])
    estimate = interval_estimate(scores, means)
    assert (estimate.value, estimate.low, estimate.high) == (5.0, 5.0, 5.0)


def test_the_performance_profile_is_the_share_of_runs_above_each_threshold() -> None:
    profile, low, high = performance_profile(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.5, 4.0]))
    assert profile.tolist() == [1.0, 0.5, 0.0]
    assert (low[0], high[0], low[2], high[2]) == (1.0, 1.0, 0.0, 0.0)  # above all, below all: no uncertainty
    assert 0.0 <= low[1] < 0.5 < high[1] <= 1.0


def test_a_run_that_ended_before_another_first_reported_is_read_at_that_first_report() -> None:
    """Wall time of runs that ran at very different speeds: the one time all have a score, each run's last one."""
    from mazerun.training.report import Run, wall_time_curve

    quick = Run(Path("quick"), "finished", {}, 0, None, steps=[10, 20], wall_seconds=[0.1, 0.2], values=[1.0, 2.0])
    slow = Run(Path("slow"), "finished", {}, 1, None, steps=[10, 20], wall_seconds=[0.5, 0.9], values=[5.0, 7.0])
    times, estimates = wall_time_curve([quick, slow], reps=200)
    assert times.tolist() == [0.5]
    assert estimates[0].value == pytest.approx((2.0 + 5.0) / 2)  # the IQM of two scores is their mean
