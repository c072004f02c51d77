"""D4RL-style datasets from a SAC run: the replay cut into episodes, the medium policy's pick, the command end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import newest_run_dir, run_ok
from test_sac import TINY

from mazerun.compose.d4rl import DATASETS, normalized_score, pick_medium, replay_episodes
from mazerun.data.formats import read_hdf5
from mazerun.data.records import finished_recording, load_records
from mazerun.nn.checkpoint import snapshot_path, snapshots


def test_the_normalised_score_is_0_at_random_and_100_at_expert() -> None:
    assert normalized_score(-1200.0, -1200.0, -200.0) == 0.0
    assert normalized_score(-200.0, -1200.0, -200.0) == 100.0
    assert normalized_score(1000.0, 20.0, 2960.0) == pytest.approx(100 * 980 / 2940)


def test_the_replay_is_cut_where_an_episode_terminated_reset_or_the_cut_fell() -> None:
    # two env copies, rows interleaved: copy 0 at rows 0, 2, 4, 6; copy 1 at rows 1, 3, 5, 7.
    # copy 0: s=0 -> 1 -> 2 (terminated), then a new episode 10 -> 11 that the cut at 8 rows leaves open;
    # copy 1: s=20 -> 21, then reset (row 3 starts at 30, not 21: a time limit), 30 -> 31 -> 32 -> 33 (open).
    starts = [0, 20, 1, 30, 10, 31, 11, 32]
    ends = [1, 21, 2, 31, 11, 32, 12, 33]
    dones = [0, 0, 1, 0, 0, 0, 0, 0]
    buffer = {"observations": torch.tensor(starts, dtype=torch.float32)[:, None],
              "next_observations": torch.tensor(ends, dtype=torch.float32)[:, None],
              "actions": torch.arange(8, dtype=torch.float32)[:, None], "rewards": torch.ones(8),
              "dones": torch.tensor(dones, dtype=torch.float32)}
    records = replay_episodes(buffer, n_envs=2, transitions=8, env_id="Pendulum-v1")
    assert [record.observations[:, 0].tolist() for record in records] == [
        [0, 1, 2], [20, 21], [30, 31, 32, 33], [10, 11, 12]]  # in the order they began: rows 0, 1, 3, 4
    assert [record.actions[:, 0].tolist() for record in records] == [[0, 2], [1], [3, 5, 7], [4, 6]]
    assert [(record.terminated, record.truncated) for record in records] == [
        (True, False), (False, True), (False, True), (False, True)]
    assert sum(len(record) for record in records) == 8


def test_the_medium_policy_is_the_snapshot_a_third_of_the_way_from_random_to_the_best(tmp_path: Path) -> None:
    rows = [(0, -880.0), (100, -1000.0), (200, -850.0), (300, -700.0), (400, -150.0)]
    (tmp_path / "metrics.csv").write_text("step,group,metric,value,wall_seconds\n" + "".join(
        f"{step},eval,mean_return,{value},\n" for step, value in rows))
    for step, _ in rows:
        snapshot_path(tmp_path, step).parent.mkdir(exist_ok=True)
        snapshot_path(tmp_path, step).write_bytes(b"")
    assert list(snapshots(tmp_path)) == [0, 100, 200, 300, 400]
    # random -1250, best -150: the target is -1250 + (1100 / 3) = -883.3; -880 at step 0 is nearer, but untrained
    assert pick_medium(tmp_path, random_return=-1250.0) == (200, snapshot_path(tmp_path, 200), -850.0)


def datasets_command(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mazerun.datasets", *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_a_sac_run_becomes_four_datasets_that_train_and_export(workdir: Path) -> None:
    run_ok(*TINY, cwd=workdir)
    sac_run = newest_run_dir(workdir)
    assert list(snapshots(sac_run)) == [0, 24, 48]  # the policy at every report

    made = datasets_command("d4rl", str(sac_run), "--out", "sets", "--episodes", "2", cwd=workdir)
    assert made.returncode == 0, made.stderr
    references = json.loads((workdir / "sets" / "references.json").read_text())
    assert set(references["datasets"]) == set(DATASETS)
    assert references["datasets"]["random"]["normalized_score"] == 0.0
    assert references["datasets"]["expert"]["normalized_score"] == pytest.approx(100.0)
    medium_step = references["medium_policy"]["step"]
    assert medium_step in (24, 48)
    for name in DATASETS:  # each is a finished recording, as `run` would find one
        assert finished_recording(workdir / "sets" / name / "trajectory_data")["env_id"] == "Pendulum-v1"
    replay = load_records(workdir / "sets" / "medium-replay" / "trajectory_data")
    assert sum(len(record) for record in replay) == medium_step == references["datasets"]["medium-replay"][
        "transitions"]
    for name in ("random", "medium", "expert"):  # whole episodes, at Pendulum's own time limit
        assert [len(record) for record in load_records(workdir / "sets" / name / "trajectory_data")] == [200, 200]

    # a dataset directory trains as it is, and exports
    run_ok("-cn", "conf_train", "algorithm=td3_bc", "env.name=Pendulum-v1", "runner.dataset.dir_or_file=sets/expert",
           "algorithm.n_updates=4", "algorithm.eval_every=4", "algorithm.batch_size=8", "runner.eval_repeats=1",
           "runner.max_episode_steps=10", "model.hidden_sizes=[16,16]", cwd=workdir)
    exported = datasets_command("export", "sets/expert/trajectory_data", "expert.h5", cwd=workdir)
    assert exported.returncode == 0, exported.stderr
    assert np.allclose(read_hdf5(workdir / "expert.h5")[0].rewards,
                       load_records(workdir / "sets" / "expert" / "trajectory_data")[0].rewards)

    again = datasets_command("d4rl", str(sac_run), "--out", "sets", cwd=workdir)
    assert again.returncode == 2 and again.stderr.strip() == "error: sets is not empty; choose a new --out for the datasets"


def test_a_run_that_is_not_sac_is_refused_in_one_line_and_writes_nothing(workdir: Path) -> None:
    run_ok("env.name=Pendulum-v1", "algorithm=ppo", "algorithm.total_steps=64", "algorithm.n_steps=32",
           "algorithm.batch_size=32", "algorithm.eval_every=64", "runner.n_envs=2", "runner.eval_repeats=1",
           "runner.max_episode_steps=10", "model.hidden_sizes=[16,16]", cwd=workdir)
    made = datasets_command("d4rl", str(newest_run_dir(workdir)), "--out", "sets", cwd=workdir)
    assert made.returncode == 2
    assert made.stderr.strip().endswith("is a ppo run without a replay buffer; make the datasets from a run of "
                                        "`run algorithm=sac`")
    assert not (workdir / "sets").exists()
