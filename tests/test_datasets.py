"""HDF5 and Minari datasets: round trips to the records' own tensors, AgileRL's layout by hand, training on them, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, newest_run_dir, run_cli, run_ok

from mazerun.acting.envs import make_env
from mazerun.acting.rollout import rollout
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.core.errors import MazerunError
from mazerun.data.formats import load_dataset_records, read_hdf5, write_hdf5, write_minari
from mazerun.data.records import StateTrajectoryRecord, load_records
from mazerun.data.tensors import records_to_dataset


def hand_episode(steps: int, *, terminated: bool, seed: int, labels: bool = False) -> StateTrajectoryRecord:
    rng = np.random.default_rng(seed)
    return StateTrajectoryRecord(
        observations=rng.normal(size=(steps + 1, 8)).astype(np.float32), actions=rng.integers(0, 4, steps),
        rewards=rng.normal(size=steps), terminated=terminated, truncated=not terminated, env_id="LunarLander-v3",
        seed=seed, policy="hand", expert_actions=rng.integers(0, 4, steps) if labels else None,
    )


RECORDS = [hand_episode(5, terminated=True, seed=0), hand_episode(3, terminated=False, seed=1),
           hand_episode(1, terminated=True, seed=2)]


def assert_same_tensors(records: list[StateTrajectoryRecord], expected: list[StateTrajectoryRecord]) -> None:
    ours, theirs = records_to_dataset(records), records_to_dataset(expected)
    for name in ("observations", "actions", "rewards", "next_observations", "dones", "episode_ids"):
        mine, reference = getattr(ours, name), getattr(theirs, name)
        assert mine.dtype == reference.dtype and torch.equal(mine, reference), name


@pytest.fixture
def minari_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "minari_datasets"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


# -- round trips -----------------------------------------------------------------------------


def test_hdf5_round_trip_gives_the_records_own_tensors(tmp_path: Path) -> None:
    path = tmp_path / "data" / "lunar.h5"
    write_hdf5(RECORDS, path)
    with h5py.File(path, "r") as file:
        assert {"observations", "next_observations", "actions", "rewards", "terminals", "timeouts"} <= set(file)
        assert file["terminals"][()].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 1]
        assert file["timeouts"][()].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0]
        assert file.attrs["env_id"] == "LunarLander-v3"
    records = load_dataset_records([path])
    assert [len(record) for record in records] == [5, 3, 1]
    assert [record.terminated for record in records] == [True, False, True]
    assert_same_tensors(records, RECORDS)
    labelled = [hand_episode(4, terminated=True, seed=3, labels=True)]
    write_hdf5(labelled, tmp_path / "labelled.h5")
    assert torch.equal(records_to_dataset(read_hdf5(tmp_path / "labelled.h5")).expert_actions,
                       records_to_dataset(labelled).expert_actions)


def test_minari_round_trip_gives_the_records_own_tensors(minari_root: Path) -> None:
    write_minari(RECORDS, "mazerun/hand-v0", make_env(RECORDS[0].env_id))
    assert (minari_root / "mazerun" / "hand-v0" / "data").is_dir()
    assert not [path for path in minari_root.iterdir() if path.name.startswith(".")]  # no scratch left behind
    records = load_dataset_records(["minari:mazerun/hand-v0"])
    assert [record.env_id for record in records] == ["LunarLander-v3"] * 3
    assert_same_tensors(records, RECORDS)
    with pytest.raises(MazerunError, match="already exists"):
        write_minari(RECORDS, "mazerun/hand-v0", make_env(RECORDS[0].env_id))


def test_agilerl_layout_splits_at_terminals_and_timeouts_and_never_pairs_across_episodes(tmp_path: Path) -> None:
    path = tmp_path / "agilerl.h5"
    observations = np.arange(7, dtype=np.float32)[:, None].repeat(2, axis=1)
    with h5py.File(path, "w") as file:
        file["observations"] = observations
        file["actions"] = np.array([0, 1, 0, 1, 0, 1, 0], dtype=np.float32)  # discrete actions stored as floats
        file["rewards"] = np.arange(1, 8, dtype=np.float32)
        file["terminals"] = np.array([0, 0, 1, 0, 0, 0, 0])
        file["timeouts"] = np.array([0, 0, 0, 0, 1, 0, 0])
    records = read_hdf5(path, env_id="CartPole-v1")
    # [0 1 2] ends terminal: kept whole; [3 4] is cut by a timeout and [5 6] by the end of the
    # file: the cut step's next observation is unknown, so that step is left out.
    assert [len(record) for record in records] == [3, 1, 1]
    assert [record.terminated for record in records] == [True, False, False]
    data = records_to_dataset(records)
    assert data.observations[:, 0].tolist() == [0, 1, 2, 3, 5]
    assert data.next_observations[:, 0].tolist() == [1, 2, 2, 4, 6]  # 2 -> 2: masked by done
    assert data.dones.tolist() == [0, 0, 1, 0, 0]
    assert data.actions.dtype == torch.int64 and data.actions.tolist() == [0, 1, 0, 1, 1]
    assert data.rewards.tolist() == [1, 2, 3, 4, 6]
    assert records[0].env_id == "CartPole-v1"

    with h5py.File(path, "a") as file:
        file["next_observations"] = observations + 100
    exact = read_hdf5(path, env_id="CartPole-v1")
    assert [len(record) for record in exact] == [3, 2, 2]
    assert records_to_dataset(exact).next_observations[:, 0].tolist() == [1, 2, 102, 4, 104, 6, 106]


# -- training on them through `run` -----------------------------------------------------------


@pytest.fixture(scope="module")
def cartpole_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CartPole records as an HDF5 file that does not name its env, as AgileRL's files do not."""
    directory = tmp_path_factory.mktemp("cartpole")
    rollout("CartPole-v1", PolicyConfig(epsilon=0.3), RunnerConfig(type="sequential", n_episodes=3, max_episode_steps=50),
            directory, print_fn=lambda _: None)
    path = directory / "cartpole.h5"
    write_hdf5(load_records(directory / "trajectory_data"), path)
    with h5py.File(path, "a") as file:
        del file.attrs["env_id"]
    return path


def test_the_issue_s_cartpole_search_trains_on_an_hdf5_file(workdir: Path, cartpole_h5: Path) -> None:
    result = run_ok("-cn", "conf_train", "env=CartPole-v1", "algorithm=cql", "hpo=evolution",
                    f"runner.dataset.dir_or_file={cartpole_h5}", "hpo.max_steps=10", "hpo.evo_steps=5",
                    "runner.eval_repeats=1", "runner.max_episode_steps=30", "model.hidden_sizes=[8]", cwd=workdir)
    assert "dataset: 3 episodes" in result.stderr
    assert load_checkpoint_env(newest_run_dir(workdir)) == "CartPole-v1"
    line = one_line_error(run_cli("-cn", "conf_train", "algorithm=cql", f"runner.dataset.dir_or_file={cartpole_h5}",
                                  cwd=workdir))
    assert "does not say which env recorded it" in line and "env=CartPole-v1" in line


def load_checkpoint_env(run_dir: Path) -> str:
    from mazerun.nn.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "best.pt").env_id


def test_export_command_then_training_by_minari_id(workdir: Path, minari_root: Path) -> None:
    rollout("LunarLander-v3", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=2, max_episode_steps=40),
            workdir / "recorded", print_fn=lambda _: None)
    source = workdir / "recorded" / "trajectory_data"
    exported = subprocess.run([sys.executable, "-m", "mazerun.datasets", "export", str(source),
                               "minari:mazerun/lunar-v0"], cwd=REPO, capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    assert "wrote 2 episodes (80 steps) of LunarLander-v3" in exported.stdout
    assert_same_tensors(load_dataset_records(["minari:mazerun/lunar-v0"]), load_records(source))
    result = run_ok("-cn", "conf_train", "algorithm=bc", "runner.dataset.dir_or_file=minari:mazerun/lunar-v0",
                    "algorithm.n_updates=4", "algorithm.eval_every=4", "algorithm.validation_percentage=0",
                    "runner.eval_repeats=1", "runner.max_episode_steps=20", "model.hidden_sizes=[8]", cwd=workdir)
    assert "dataset: 2 episodes (80 transitions)" in result.stderr


# -- bad input -------------------------------------------------------------------------------


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_an_hdf5_file_without_the_needed_datasets_names_missing_and_present(tmp_path: Path) -> None:
    path = tmp_path / "partial.h5"
    with h5py.File(path, "w") as file:
        file["observations"] = np.zeros((3, 2))
        file["rewards"] = np.zeros(3)
        file["infos"] = np.zeros(3)
    with pytest.raises(MazerunError) as error:
        read_hdf5(path, "CartPole-v1")
    message = str(error.value)
    assert "lacks the datasets actions, terminals" in message and "(it has: infos, observations, rewards)" in message


def test_hdf5_columns_of_unequal_length_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ragged.h5"
    with h5py.File(path, "w") as file:
        file["observations"] = np.zeros((4, 2))
        file["actions"] = np.zeros(3, dtype=np.int64)
        file["rewards"] = np.zeros(4)
        file["terminals"] = np.zeros(4)
    with pytest.raises(MazerunError, match=r"unequal length \(observations 4, actions 3, rewards 4, terminals 4\)"):
        read_hdf5(path, "CartPole-v1")


def test_a_file_that_is_not_hdf5_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "text.h5"
    path.write_text("not hdf5")
    with pytest.raises(MazerunError, match=r"text.h5 is not readable HDF5 .*python -m mazerun.datasets export"):
        read_hdf5(path, "CartPole-v1")


def test_a_minari_id_not_found_locally_says_where_it_looked(workdir: Path, minari_root: Path) -> None:
    line = one_line_error(run_cli("-cn", "conf_train", "algorithm=cql", "runner.dataset.dir_or_file=minari:nope/none-v0",
                                  "hydra.run.dir=outputs/bad", cwd=workdir,
                                  env={"MINARI_DATASETS_PATH": str(minari_root)}))
    assert "'nope/none-v0' is not found locally in" in line and str(minari_root) in line and "never downloads" in line
    assert not {"best.pt", "last.pt", "metrics.csv"} & {path.name for path in (workdir / "outputs" / "bad").glob("*")}


def test_export_refuses_an_unknown_destination(tmp_path: Path) -> None:
    write_hdf5(RECORDS, tmp_path / "lunar.h5")
    exported = subprocess.run([sys.executable, "-m", "mazerun.datasets", "export", str(tmp_path / "lunar.h5"),
                               str(tmp_path / "lunar.csv")], capture_output=True, text=True)
    assert exported.returncode == 2 and exported.stderr.startswith("error: ") and "minari:<id>" in exported.stderr
    assert not (tmp_path / "lunar.csv").exists()
