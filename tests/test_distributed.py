"""Data-parallel training under torchrun on the CPU: 2 processes train what 1 process trains, rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _default_signals, kill_group, run_ok

from mazerun.acting.rollout import rollout
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.datasets import write_store
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.training.metrics import read_metrics_csv

TINY = ["algorithm.n_updates=30", "algorithm.eval_every=15", "runner.eval_repeats=1", "runner.max_episode_steps=40",
        "model.hidden_sizes=[16]", "algorithm.batch_size=32", "device=cpu"]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("expert")
    rollout("LunarLander-v3", PolicyConfig(epsilon=0.2), RunnerConfig(type="sequential", n_episodes=4, max_episode_steps=80),
            directory, print_fn=lambda _: None)
    write_store([str(directory / "trajectory_data")], directory / "data.store")
    return directory


def torchrun(*overrides: str, cwd: Path, processes: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=N -m mazerun <overrides>`; the launcher and its ranks are killed on every exit path."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "mazerun", *overrides]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_default_signals,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        kill_group(process.pid)
        process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize(("algorithm", "source"), [("bc", "trajectory_data"), ("cql", "data.store")])
def test_two_processes_train_the_model_one_process_trains_with_the_same_global_batch(
    workdir: Path, records: Path, algorithm: str, source: str
) -> None:
    overrides = ["-cn", "conf_train", f"algorithm={algorithm}", f"runner.dataset.dir_or_file={records / source}",
                 "algorithm.validation_percentage=25", *TINY]
    run_ok(*overrides, "hydra.run.dir=one", cwd=workdir)
    result = torchrun(*overrides, cwd=workdir)
    assert result.returncode == 0, result.stderr
    runs = list((workdir / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # rank 1 ran in rank 0's directory and made none of its own
    two, one = runs[0], workdir / "one"

    single, parallel = load_checkpoint(one / "last.pt"), load_checkpoint(two / "last.pt")
    assert single.extra["world_size"] == 1 and parallel.extra["world_size"] == 2
    assert load_checkpoint(two / "best.pt").extra["world_size"] == 2
    for name, weights in single.model_state.items():
        assert torch.allclose(parallel.model_state[name], weights, atol=1e-5, rtol=1e-5), name
    one_rows, two_rows = read_metrics_csv(one / "metrics.csv"), read_metrics_csv(two / "metrics.csv")
    key = lambda row: (row["step"], row["group"], row["metric"])  # noqa: E731
    assert sorted(map(key, one_rows)) == sorted(map(key, two_rows))  # every row once: rank 0 alone logs
    expected = {key(row): row["value"] for row in one_rows}
    for row in two_rows:
        assert row["value"] == pytest.approx(expected[key(row)], rel=1e-4, abs=1e-5), key(row)

    log = (two / "run.log").read_text()
    assert "data-parallel: world size 2 (gloo); each process samples 16 of every global batch" in log
    assert log.count("done: 30 updates") == 1
    assert len(list(two.glob("events.out.tfevents.*"))) == 1
    assert sorted(path.name for path in (two / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


def one_line(result: subprocess.CompletedProcess, message: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0, result.stderr
    assert len(errors) == 1 and message in errors[0], result.stderr  # torchrun adds its own failure report after it


@pytest.mark.parametrize(("overrides", "message"), [
    (["algorithm=ppo", "algorithm.total_steps=512"], "algorithm=ppo does not train data-parallel (torchrun started 2"),
    (["-cn", "conf_train", *TINY, "algorithm.batch_size=33"], "algorithm.batch_size=33 does not split evenly over the 2"),
    (["-m", "runner.seed=0,1", "runner.n_episodes=1"], "torchrun runs one training job: drop -m"),
])
def test_what_cannot_train_data_parallel_is_one_line_and_writes_nothing(
    workdir: Path, records: Path, overrides: list[str], message: str
) -> None:
    result = torchrun(*overrides, f"runner.dataset.dir_or_file={records / 'trajectory_data'}", cwd=workdir)
    one_line(result, message)
    written = {path.name for path in workdir.glob("outputs/*/*/*")} | {path.name for path in workdir.glob("multirun/*")}
    assert written <= {".hydra", "run.log", ".lock"}, written
