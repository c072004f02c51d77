"""Sweeps through the real `run -m`: joblib, submitit (local), Optuna, Ray; failed jobs; missing plugins."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, run_ok

from mazerun.acting.rollout import rollout
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.data.records import load_records
from mazerun.training.metrics import read_metrics_csv

TINY_ROLLOUT = ["runner.n_episodes=2", "runner.max_episode_steps=30", "runner=sequential"]
TINY_TRAINING = ["algorithm.n_updates=20", "algorithm.eval_every=10", "runner.eval_repeats=1",
                 "runner.max_episode_steps=30", "model.hidden_sizes=[16]", "algorithm.batch_size=32", "device=cpu"]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("expert")
    rollout("LunarLander-v3", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=4, max_episode_steps=60),
            directory, print_fn=lambda _: None)
    return directory / "trajectory_data"


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_launcher_sweep_keeps_each_job_self_contained_and_a_failed_job_fails_the_sweep_only_at_the_end(
    workdir: Path, launcher: str
) -> None:
    # job 0 records, job 1 has bad input; both run in processes of the launcher, not in `run` itself
    result = run_cli("-m", f"hydra/launcher={launcher}", "runner.n_episodes=2,0", "runner.seed=7",
                     "runner.max_episode_steps=30", "runner=sequential", "hydra.sweep.dir=sweep", cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert "1 job of this sweep failed" in result.stderr and "Traceback" not in result.stderr
    good, bad = workdir / "sweep" / "0", workdir / "sweep" / "1"
    assert [record.seed for record in load_records(good / "trajectory_data")] == [7, 8]
    assert {"run.log", ".hydra", "rollout_stats.json", "trajectory_data"} <= {path.name for path in good.iterdir()}
    assert (bad / "failed.txt").read_text().startswith("error: runner.n_episodes=0 must be at least 1")
    assert not (bad / "trajectory_data").exists() and not (good / "failed.txt").exists()


def test_the_issue_s_joblib_sweep_runs_as_written(workdir: Path) -> None:
    run_ok("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "runner.seed=0,1", "policy=heuristic",
           "runner.n_episodes=2", "runner.max_episode_steps=30", "hydra.sweep.dir=sweep", cwd=workdir)
    seeds = [[record.seed for record in load_records(workdir / "sweep" / job / "trajectory_data")] for job in "01"]
    assert seeds == [[0, 1], [1, 2]]


def test_an_optuna_sweep_of_three_tiny_trials_returns_their_metrics_and_goes_on_past_a_failed_one(
    workdir: Path, records: Path
) -> None:
    # the issue's order: flags between overrides. Seed 0 draws validation_percentage 100 (bad input), 20, 100.
    result = run_cli("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "-cn", "conf_train", "algorithm=bc",
                     "algorithm.validation_percentage=choice(20,100)", "hydra.sweeper.sampler.seed=0",
                     "optimized_metric=eval/mean_return", "hydra.sweeper.direction=maximize",
                     f"runner.dataset.dir_or_file={records}", *TINY_TRAINING, "hydra.sweep.dir=sweep", cwd=workdir)
    assert result.returncode == 2, result.stderr  # the failed trial is in the exit code, after the whole sweep
    jobs = sorted(path for path in (workdir / "sweep").iterdir() if path.is_dir())
    assert len(jobs) == 3
    failed = [job for job in jobs if (job / "failed.txt").is_file()]
    finished = [job for job in jobs if (job / "result.json").is_file()]
    assert failed and finished and len(failed) + len(finished) == 3
    results = yaml.safe_load((workdir / "sweep" / "optimization_results.yaml").read_text())
    last_returns = [[row for row in read_metrics_csv(job / "metrics.csv")
                     if (row["group"], row["metric"]) == ("eval", "mean_return")][-1]["value"] for job in finished]
    assert math.isclose(results["best_value"], max(last_returns), rel_tol=1e-9)
    assert results["best_params"] == {"algorithm.validation_percentage": 20}


def test_a_sweep_that_would_train_on_the_newest_recording_is_refused_per_job(workdir: Path, records: Path) -> None:
    result = run_cli("-m", "-cn", "conf_train", "algorithm.lr=1e-3,1e-4", *TINY_TRAINING, cwd=workdir)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 2
    assert "would train on the newest recording" in lines[0] and "runner.dataset.dir_or_file" in lines[0]


def _without_plugin(group: str, name: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`run` in a process where the plugin's config was never registered, as if it were not installed."""
    script = (
        "import sys\n"
        "from hydra.core.config_store import ConfigStore\n"
        "from hydra.core.plugins import Plugins\n"
        "Plugins.instance()  # imports every installed plugin, which registers its configs\n"
        f"ConfigStore.instance().repo['hydra']['{group}'].pop('{name}.yaml')\n"
        f"sys.argv = ['run', *{list(overrides)!r}]\n"
        "from mazerun.cli import main\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("group", "plugin", "extra"), [("launcher", "joblib", "launchers"),
                                                        ("launcher", "submitit_local", "launchers"),
                                                        ("sweeper", "optuna", "launchers")])
def test_a_launcher_or_sweeper_whose_plugin_is_missing_names_the_extra(
    workdir: Path, group: str, plugin: str, extra: str
) -> None:
    result = _without_plugin(group, plugin, "-m", f"hydra/{group}={plugin}", "runner.seed=0,1", cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert error_lines(result) == [f"error: hydra/{group}={plugin} needs its Hydra plugin, which is not installed: "
                                   f"pip install 'mazerun[{extra}]'"]
    assert not (workdir / "multirun").exists()


@pytest.mark.skipif(shutil.which("srun") is not None, reason="a SLURM cluster is here: the sweep would be submitted")
def test_the_slurm_launcher_off_a_cluster_is_one_line(workdir: Path) -> None:
    result = run_cli("-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=p", "runner.seed=0,1", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert "submitit_slurm" in line and "srun" in line and "hydra/launcher=submitit_local" in line


def test_flags_between_overrides_keep_their_values() -> None:
    from mazerun.cli import hydra_argv

    assert hydra_argv(["-m", "a=1", "-cn", "conf_train", "b=2", "--cfg", "job", "c=[1,2]", "--info"]) == \
        ["-m", "-cn", "conf_train", "--cfg", "job", "--info", "a=1", "b=2", "c=[1,2]"]
    assert hydra_argv(["--config-name=conf_train", "x=-1"]) == ["--config-name=conf_train", "x=-1"]


def test_the_ray_launcher_runs_a_cql_sweep_on_a_local_ray_instance(workdir: Path, records: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_ray_launcher",
                        reason="Ray is not in the test extra by design: install mazerun[ray] to run this test")
    result = run_ok("-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                    "+hydra.launcher.ray.init.include_dashboard=false", "algorithm=cql", "algorithm.alpha=0.5,1",
                    f"runner.dataset.dir_or_file={records}", *TINY_TRAINING, "hydra.sweep.dir=sweep", cwd=workdir)
    for job in ("0", "1"):
        assert (workdir / "sweep" / job / "best.pt").is_file() and (workdir / "sweep" / job / "result.json").is_file()
    assert "Ray" in result.stderr or "ray" in result.stderr


def test_optimized_metric_reads_the_last_report_and_a_misspelt_one_fails_before_the_run(workdir: Path) -> None:
    from mazerun.core.errors import MazerunError
    from mazerun.training.metrics import MetricsLogger, last_value

    with MetricsLogger(workdir / "run", tensorboard=False, console=False) as logger:
        logger.log(10, {"mean_return": 5.0}, "eval")
        logger.log(20, {"mean_return": -3.0, "mean_length": 9.0}, "eval")
    assert last_value(workdir / "run", "eval/mean_return") == -3.0
    with pytest.raises(MazerunError, match="was never logged by this run; logged metrics: eval/mean_length"):
        last_value(workdir / "run", "eval/mean_retrun")
    result = run_cli("optimized_metric=mean_return", "runner.n_episodes=1", cwd=workdir)
    assert result.returncode == 2 and error_lines(result) == [
        "error: optimized_metric=mean_return is not a statistic of a recording; choose one of: mean, std, min, max, "
        "median_step_count, mean_step_count, total_step_count, episode_count, success_rate"]
    assert not list(workdir.glob("outputs/*/*/trajectory_data"))
