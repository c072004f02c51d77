"""Datasets to and from the real Minari and d3rlpy packages: the same transitions both ways, and training on theirs.

d3rlpy 2.8 pins gymnasium==1.0.0 but runs on ours: the README's test line installs it with
``--no-deps`` after the test extra, which holds its other dependencies, so CI runs its tests. Where
it is not installed they are skipped; the d3rlpy file format itself (read and written with h5py) is
tested everywhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from conftest import DATASETS, run_cli, run_ok

from mazerun.core.errors import MazerunError
from mazerun.data.formats import load_dataset_records, read_d3rlpy, write_d3rlpy
from mazerun.data.records import StateTrajectoryRecord, load_records

TINY_BC = ["-cn", "conf_train", "algorithm=bc", "algorithm.n_updates=4", "algorithm.eval_every=4",
           "algorithm.validation_percentage=0", "runner.eval_repeats=1", "runner.max_episode_steps=20",
           "model.hidden_sizes=[8]", "device=cpu"]
needs_d3rlpy = pytest.mark.skipif(importlib.util.find_spec("d3rlpy") is None,
                                  reason="d3rlpy is not installed: pip install --no-deps 'd3rlpy==2.8.1' after the "
                                         "test extra, as the README's test line does")


@pytest.fixture(scope="module")
def cartpole_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 random CartPole episodes cut at 15 steps: some end in a terminal state, some at the time limit."""
    root = tmp_path_factory.mktemp("cartpole")
    run_ok("env=CartPole-v1", "policy=random", "runner=sequential", "runner.n_episodes=8",
           "runner.max_episode_steps=15", "hydra.run.dir=recorded", cwd=root)
    records = load_records(root / "recorded" / "trajectory_data")
    assert {record.terminated for record in records} == {True, False}
    return root / "recorded" / "trajectory_data"


def transitions(records: list[StateTrajectoryRecord]) -> list[tuple]:
    """(observation, action, reward, next observation, terminal) of every step, in order.

    The observation after a terminal step is zeros, as d3rlpy gives it (no bootstrap reads it).
    """
    steps = []
    for record in records:
        observations = np.asarray(record.observations)
        for index in range(len(record)):
            terminal = record.terminated and index == len(record) - 1
            following = np.zeros_like(observations[index]) if terminal else observations[index + 1]
            steps.append((observations[index], np.asarray(record.actions)[index], float(record.rewards[index]),
                          following, terminal))
    return steps


def assert_same_transitions(ours: list[tuple], theirs: list[tuple]) -> None:
    assert len(ours) == len(theirs)
    for index, (mine, reference) in enumerate(zip(ours, theirs)):
        observation, action, reward, following, terminal = mine
        assert np.array_equal(observation, reference[0]) and observation.dtype == reference[0].dtype, index
        assert np.array_equal(np.ravel(action), np.ravel(reference[1])), index
        assert reward == reference[2] and terminal == reference[4], index
        assert np.array_equal(following, reference[3]), index


def simulate_cartpole(episodes: int, max_steps: int) -> list[dict[str, np.ndarray]]:
    """Seeded random episodes of the real CartPole: every observation (T + 1), action, reward and how it ended."""
    env = gym.make("CartPole-v1", max_episode_steps=max_steps)
    rng = np.random.default_rng(0)
    played = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=episode)
        observations, actions, rewards = [observation], [], []
        while True:
            action = int(rng.integers(2))
            observation, reward, terminated, truncated, _ = env.step(action)
            observations.append(observation)
            actions.append(action)
            rewards.append(reward)
            if terminated or truncated:
                break
        played.append({"observations": np.array(observations), "actions": np.array(actions),
                       "rewards": np.array(rewards, dtype=np.float64), "terminated": terminated})
    env.close()
    assert {episode["terminated"] for episode in played} == {True, False}
    return played


# --- Minari ------------------------------------------------------------------------------------------------

def test_a_recording_exported_to_minari_loads_with_minari_as_the_same_steps(
    cartpole_records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    exported = run_cli("export", str(cartpole_records), "minari:mazerun/cartpole-v0", program=DATASETS, cwd=tmp_path,
                       env={"MINARI_DATASETS_PATH": str(tmp_path / "minari")})
    assert exported.returncode == 0, exported.stderr
    records = load_records(cartpole_records)
    dataset = minari.load_dataset("mazerun/cartpole-v0")
    assert dataset.spec.env_spec.id == "CartPole-v1" and dataset.total_episodes == len(records)
    assert dataset.total_steps == sum(len(record) for record in records)
    for record, episode in zip(records, dataset.iterate_episodes()):
        assert np.array_equal(episode.observations, record.observations)
        assert episode.observations.dtype == np.asarray(record.observations).dtype
        assert np.array_equal(episode.actions, record.actions) and np.array_equal(episode.rewards, record.rewards)
        ends = np.zeros(len(record), dtype=bool)
        ends[-1] = True
        assert np.array_equal(episode.terminations, ends & record.terminated)
        assert np.array_equal(episode.truncations, ends & record.truncated)  # both, where the limit hit a terminal
    assert any(record.terminated and record.truncated for record in records)
    assert [(record.terminated, record.truncated) for record in load_dataset_records(["minari:mazerun/cartpole-v0"])] \
        == [(record.terminated, record.truncated) for record in records]


def test_a_dataset_minari_s_data_collector_recorded_reads_as_its_steps_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import minari

    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    env = minari.DataCollector(gym.make("CartPole-v1", max_episode_steps=15))
    rng = np.random.default_rng(0)
    for episode in range(8):
        env.reset(seed=episode)
        while True:
            _, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
            if terminated or truncated:
                break
    env.create_dataset(dataset_id="collected/cartpole-v0", algorithm_name="random", author="mazerun's tests",
                       author_email="tests@mazerun.invalid", code_permalink="https://mazerun.invalid/tests",
                       description="8 seeded random CartPole episodes cut at 15 steps", eval_env="CartPole-v1")
    env.close()

    records = load_dataset_records(["minari:collected/cartpole-v0"])
    collected = list(minari.load_dataset("collected/cartpole-v0").iterate_episodes())
    assert [record.env_id for record in records] == ["CartPole-v1"] * 8
    assert {record.terminated for record in records} == {True, False}
    for record, episode in zip(records, collected, strict=True):
        assert np.array_equal(record.observations, episode.observations)
        assert np.array_equal(record.actions, episode.actions) and np.array_equal(record.rewards, episode.rewards)
        assert record.terminated == bool(episode.terminations[-1]) and record.truncated == bool(episode.truncations[-1])

    steps = sum(len(episode.actions) for episode in collected)
    result = run_ok(*TINY_BC, "runner.dataset.dir_or_file=minari:collected/cartpole-v0", cwd=tmp_path,
                    env={"MINARI_DATASETS_PATH": str(root)})
    assert f"dataset: 8 episodes ({steps} transitions)" in result.stderr


# --- d3rlpy ------------------------------------------------------------------------------------------------

@needs_d3rlpy
def test_a_recording_exported_for_d3rlpy_loads_in_d3rlpy_as_the_same_transitions(
    cartpole_records: Path, tmp_path: Path
) -> None:
    from d3rlpy.dataset import BasicTransitionPicker, InfiniteBuffer, ReplayBuffer

    exported = run_cli("export", str(cartpole_records), f"d3rlpy:{tmp_path / 'cartpole.h5'}", program=DATASETS,
                       cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    with open(tmp_path / "cartpole.h5", "rb") as file:
        buffer = ReplayBuffer.load(file, InfiniteBuffer())
    records = load_records(cartpole_records)
    assert buffer.transition_count == sum(len(record) for record in records)  # a time limit's last step is kept too
    picker = BasicTransitionPicker()
    theirs = [(step.observation, step.action, float(step.reward[0]), step.next_observation, bool(step.terminal))
              for episode in buffer.episodes for step in map(lambda index: picker(episode, index),
                                                            range(episode.transition_count))]
    assert_same_transitions(transitions(records), theirs)


@needs_d3rlpy
def test_a_d3rlpy_mdp_dataset_reads_as_d3rlpy_s_own_transitions_and_trains(tmp_path: Path) -> None:
    from d3rlpy.dataset import BasicTransitionPicker, MDPDataset

    played = simulate_cartpole(episodes=8, max_steps=15)
    # D4RL's flat layout, as d3rlpy builds an MDPDataset from it: one row per step, the observation it acted on
    dataset = MDPDataset(
        observations=np.concatenate([episode["observations"][:-1] for episode in played]),
        actions=np.concatenate([episode["actions"] for episode in played]),
        rewards=np.concatenate([episode["rewards"] for episode in played]),
        terminals=np.concatenate([np.eye(len(episode["actions"]))[-1] * episode["terminated"] for episode in played]),
        timeouts=np.concatenate([np.eye(len(episode["actions"]))[-1] * (not episode["terminated"])
                                 for episode in played]),
    )
    with open(tmp_path / "collected.h5", "w+b") as file:  # as d3rlpy's documentation opens it: h5py reads too
        dataset.dump(file)

    records = load_dataset_records([f"d3rlpy:{tmp_path / 'collected.h5'}"], env_id="CartPole-v1")
    picker = BasicTransitionPicker()
    theirs = [(step.observation, step.action, float(step.reward[0]), step.next_observation, bool(step.terminal))
              for episode in dataset.episodes for step in map(lambda index: picker(episode, index),
                                                             range(episode.transition_count))]
    assert_same_transitions(transitions(records), theirs)

    result = run_ok(*TINY_BC, "env=CartPole-v1", f"runner.dataset.dir_or_file=d3rlpy:{tmp_path / 'collected.h5'}",
                    cwd=tmp_path)
    assert f"dataset: {len(records)} episodes ({dataset.transition_count} transitions)" in result.stderr


def test_the_d3rlpy_file_holds_every_step_and_reads_back_without_d3rlpy(cartpole_records: Path, tmp_path: Path) -> None:
    records = load_records(cartpole_records)
    exported = run_cli("export", str(cartpole_records), f"d3rlpy:{tmp_path / 'data' / 'cartpole.h5'}",
                       program=DATASETS, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert f"wrote 8 episodes ({sum(map(len, records))} steps) of CartPole-v1" in exported.stdout
    back = read_d3rlpy(tmp_path / "data" / "cartpole.h5")
    assert [len(record) for record in back] == [len(record) for record in records]
    assert_same_transitions(transitions(back), transitions(records))
    result = run_ok(*TINY_BC, f"runner.dataset.dir_or_file=d3rlpy:{tmp_path / 'data' / 'cartpole.h5'}", cwd=tmp_path)
    assert f"dataset: 8 episodes ({sum(map(len, records))} transitions)" in result.stderr


def test_a_d3rlpy_file_without_an_env_other_files_and_dict_observations_are_one_line(
    cartpole_records: Path, tmp_path: Path
) -> None:
    import h5py

    records = load_records(cartpole_records)
    write_d3rlpy(records, tmp_path / "plain.h5")
    with h5py.File(tmp_path / "plain.h5", "r+") as file:
        del file.attrs["env_id"]
    with pytest.raises(MazerunError, match=r"does not say which env recorded it .*add env=<id>"):
        read_d3rlpy(tmp_path / "plain.h5")
    assert read_d3rlpy(tmp_path / "plain.h5", env_id="CartPole-v1")[0].env_id == "CartPole-v1"

    assert run_cli("export", str(cartpole_records), str(tmp_path / "d4rl.h5"), program=DATASETS, cwd=tmp_path).returncode == 0
    result = run_cli(*TINY_BC, f"runner.dataset.dir_or_file=d3rlpy:{tmp_path / 'd4rl.h5'}", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "is not a d3rlpy 2.1 dataset of episodes (version None, columns none" in errors[0]

    with pytest.raises(MazerunError, match="d3rlpy export writes vector observations"):
        write_d3rlpy([StateTrajectoryRecord(observations={"image": np.zeros((2, 3))}, actions=np.zeros(1, int),
                                            rewards=np.zeros(1), terminated=True, truncated=False,
                                            env_id="BabyAI-GoToLocal-v0", seed=0, policy="bot")], tmp_path / "x.h5")


class Throttles(gym.ActionWrapper):
    """LunarLander driven through two throttles, as a user's own wrapper might: the dataset keeps the env's id."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def action(self, action: np.ndarray) -> int:
        return int(action[0] > 0) * 2  # the main engine, or nothing


def test_a_minari_dataset_whose_actions_the_env_cannot_take_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import minari

    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    env = minari.DataCollector(Throttles(gym.make("LunarLander-v3", max_episode_steps=10)))
    env.action_space.seed(0)
    for episode in range(2):
        env.reset(seed=episode)
        while not any(env.step(env.action_space.sample())[2:4]):
            pass
    env.create_dataset(dataset_id="collected/throttles-v0", algorithm_name="random", author="mazerun's tests",
                       author_email="tests@mazerun.invalid", code_permalink="https://mazerun.invalid/tests",
                       description="2 random LunarLander episodes through two throttles")
    env.close()

    result = run_cli(*TINY_BC, "runner.dataset.dir_or_file=minari:collected/throttles-v0", cwd=tmp_path,
                     env={"MINARI_DATASETS_PATH": str(root)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and "action" in result.stderr, result.stderr
    assert not list(tmp_path.glob("outputs/*/*/*.pt"))  # nothing trained, nothing kept
