"""CQL and IQL: transitions, the loss formulas by hand, tiny end-to-end runs through `run`, bad input.

What every algorithm must do (update, checkpoints, exact resume, every kind of env) is tests/test_algorithm_protocol.py's.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok
from torch import nn

from mazerun.acting.envs import make_env
from mazerun.algorithms import ALGORITHMS, algorithm_module
from mazerun.algorithms.base import ValueLearningConfig, follow_target, frozen_copy
from mazerun.algorithms.cql import CQLConfig, conservative_loss, double_dqn_target, td_error_loss
from mazerun.algorithms.iql import advantage_weights, expectile_loss, weighted_log_likelihood_loss
from mazerun.compose.validation import validate
from mazerun.core.errors import MazerunError
from mazerun.data.records import StateTrajectoryRecord, load_records
from mazerun.data.tensors import records_to_dataset
from mazerun.nn.checkpoint import load_checkpoint

TINY = ("model.hidden_sizes=[32,32]", "runner.max_episode_steps=100", "runner.eval_repeats=2")
"""Small networks and short evaluation episodes: the runs check the wiring, not the learning."""


# -- transitions -----------------------------------------------------------------------------


def hand_episode(observations: list[float], *, terminated: bool) -> StateTrajectoryRecord:
    steps = len(observations) - 1
    return StateTrajectoryRecord(
        observations=np.array([[value, 2 * value] for value in observations], dtype=np.float32),
        actions=np.arange(steps, dtype=np.int64) % 4,
        rewards=np.arange(1, steps + 1, dtype=np.float64),
        terminated=terminated,
        truncated=not terminated,
        env_id="LunarLander-v3",
        seed=0,
        policy="hand",
    )


def test_transitions_stay_in_their_episode_and_only_termination_is_done() -> None:
    terminated = hand_episode([0.0, 1.0, 2.0], terminated=True)
    truncated = hand_episode([10.0, 11.0, 12.0, 13.0], terminated=False)
    data = records_to_dataset([terminated, truncated])

    assert data.observations[:, 0].tolist() == [0.0, 1.0, 10.0, 11.0, 12.0]
    # The truncated episode's last step bootstraps from its final observation (13), never from
    # the next episode; the terminated one's last next-observation is its terminal state.
    assert data.next_observations[:, 0].tolist() == [1.0, 2.0, 11.0, 12.0, 13.0]
    assert data.next_observations[:, 1].tolist() == [2.0, 4.0, 22.0, 24.0, 26.0]
    assert data.dones.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert data.actions.tolist() == [0, 1, 0, 1, 2]
    assert data.rewards.tolist() == [1.0, 2.0, 1.0, 2.0, 3.0]


# -- loss formulas ---------------------------------------------------------------------------


def test_conservative_term_is_log_n_actions_when_q_is_flat() -> None:
    q_values = torch.full((5, 4), 3.7)
    actions = torch.tensor([0, 1, 2, 3, 1])
    assert conservative_loss(q_values, actions).item() == pytest.approx(math.log(4), abs=1e-6)


def test_conservative_term_by_hand() -> None:
    q_values = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    actions = torch.tensor([1, 0])
    row0 = math.log(math.e**1 + math.e**2 + 1.0) - 2.0
    row1 = math.log(2.0 + math.e**5) - 0.0
    assert conservative_loss(q_values, actions).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_double_dqn_target_chooses_online_values_target() -> None:
    next_online = torch.tensor([[1.0, 5.0, 2.0], [9.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    next_target = torch.tensor([[10.0, 20.0, 30.0], [-1.0, 7.0, 8.0], [4.0, 5.0, 6.0]])
    rewards = torch.tensor([1.0, 2.0, 3.0])
    dones = torch.tensor([0.0, 0.0, 1.0])
    targets = double_dqn_target(next_online, next_target, rewards, dones, gamma=0.9)
    # argmax online: 1, 0, 2 -> target values 20, -1, (6, masked by done)
    assert targets.tolist() == pytest.approx([1.0 + 0.9 * 20.0, 2.0 + 0.9 * -1.0, 3.0])


def test_td_error_loss_huber_and_mse() -> None:
    q_data, targets = torch.tensor([0.0, 0.0]), torch.tensor([0.5, 3.0])
    assert td_error_loss(q_data, targets, "mse").item() == pytest.approx((0.25 + 9.0) / 2)
    assert td_error_loss(q_data, targets, "huber").item() == pytest.approx((0.5 * 0.25 + (3.0 - 0.5)) / 2)


def test_expectile_loss_by_hand() -> None:
    differences = torch.tensor([2.0, -1.0, 0.5, -3.0])  # Q_target(s, a) - V(s)
    expected = (0.7 * 4.0 + 0.3 * 1.0 + 0.7 * 0.25 + 0.3 * 9.0) / 4
    assert expectile_loss(differences, 0.7).item() == pytest.approx(expected)
    assert expectile_loss(differences, 0.5).item() == pytest.approx(0.5 * differences.square().mean().item())


def test_advantage_weights_are_capped_without_overflow() -> None:
    weights = advantage_weights(torch.tensor([0.0, -1.0, 1.0, 1e6]), beta=2.0, max_weight=100.0)
    assert weights.tolist() == pytest.approx([1.0, math.exp(-2.0), math.exp(2.0), 100.0], rel=1e-5)
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
    distribution = torch.distributions.Categorical(logits=logits)
    loss = weighted_log_likelihood_loss(distribution, torch.tensor([0, 1]), torch.tensor([2.0, 1.0]))
    assert loss.item() == pytest.approx(-(2.0 * math.log(0.5) + math.log(0.8)) / 2, rel=1e-6)


def test_target_follows_by_hard_copy_on_schedule_or_by_polyak() -> None:
    online = nn.Linear(2, 1)
    target = frozen_copy(online)
    assert not any(parameter.requires_grad for parameter in target.parameters())
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
    hard = CQLConfig(tau=1.0, target_update_interval=3)
    follow_target(target, online, update=2, config=hard)
    assert target.weight.tolist() == [[0.0, 0.0]]
    follow_target(target, online, update=3, config=hard)
    assert target.weight.tolist() == [[1.0, 1.0]]
    with torch.no_grad():
        target.weight.fill_(0.0)
    follow_target(target, online, update=1, config=CQLConfig(tau=0.25, target_update_interval=1))
    assert target.weight.tolist() == [[0.25, 0.25]]


# -- end to end through `run` ----------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A scratch directory with two tiny noisy LunarLander recordings (3 episodes each)."""
    root = tmp_path_factory.mktemp("offline_rl")
    recorded = []
    for seed in (0, 3):
        run_ok("runner.n_episodes=3", "policy.epsilon=0.3", "runner.max_episode_steps=100", f"runner.seed={seed}",
               "runner.n_workers=1", cwd=root)
        recorded.append(newest_run_dir(root) / "trajectory_data")
    return root, recorded[0], recorded[1]


def metrics_of(run_dir: Path) -> set[tuple[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return {(row["group"], row["metric"]) for row in csv.DictReader(handle)}


def roll_out(root: Path, run_dir: Path, algorithm: str) -> None:
    run_ok("policy=torch_policy", f"input_dir={run_dir}", "runner.n_episodes=2", "runner.max_episode_steps=50",
           "runner.n_workers=1", cwd=root)
    records = load_records(newest_run_dir(root) / "trajectory_data")
    assert len(records) == 2 and all(record.policy == f"torch_policy:{algorithm}" for record in records)


def test_cql_trains_on_the_newest_recording_and_its_q_network_rolls_out(datasets: tuple[Path, Path, Path]) -> None:
    root, _, newest = datasets
    result = run_ok("-cn", "conf_train", "algorithm=cql", "algorithm.n_updates=50", "algorithm.eval_every=25",
                    *TINY, cwd=root)
    assert f"training on the newest finished recording: {newest.relative_to(root)}" in result.stderr
    run_dir = newest_run_dir(root)
    assert {("train", "td_loss"), ("train", "conservative_loss"), ("train", "mean_q"),
            ("eval", "mean_return")} <= metrics_of(run_dir)
    assert list(run_dir.glob("events.out.tfevents.*"))
    best, last = load_checkpoint(run_dir / "best.pt"), load_checkpoint(run_dir / "last.pt")
    assert best.algorithm == "cql" and best.model_config["network"] == "q_network"
    assert last.extra["step"] == 50
    roll_out(root, run_dir, "cql")


def test_iql_trains_on_two_dataset_dirs_and_its_policy_rolls_out(datasets: tuple[Path, Path, Path]) -> None:
    root, first, second = datasets
    result = run_ok("-cn", "conf_train", "algorithm=iql", "algorithm.n_updates=50", "algorithm.eval_every=25",
                    "algorithm.expectile=0.8", f"runner.dataset.dir_or_file=[{first},{second}]", *TINY, cwd=root)
    assert "dataset: 6 episodes" in result.stderr
    run_dir = newest_run_dir(root)
    assert {("train", "td_loss"), ("train", "expectile_loss"), ("train", "policy_loss"), ("train", "mean_q"),
            ("eval", "mean_return")} <= metrics_of(run_dir)
    best = load_checkpoint(run_dir / "best.pt")
    assert best.algorithm == "iql" and best.model_config["network"] == "actor_critic"
    assert best.extra["dataset"] == [str(first), str(second)]
    roll_out(root, run_dir, "iql")


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "override", "message"),
    [
        ("cql", {"alpha": -0.1}, "algorithm.alpha=-0.1 must be >= 0"),
        ("cql", {"td_loss": "l1"}, "algorithm.td_loss='l1' is unknown"),
        ("cql", {"gamma": 1.5}, "algorithm.gamma=1.5 must lie in [0, 1]"),
        ("cql", {"tau": 0.0}, "algorithm.tau=0.0 must lie in (0, 1]"),
        ("cql", {"tau": 1.5}, "algorithm.tau=1.5 must lie in (0, 1]"),
        ("cql", {"target_update_interval": 0}, "algorithm.target_update_interval=0 must be > 0"),
        ("iql", {"expectile": 0.0}, "algorithm.expectile=0.0 must lie in (0, 1)"),
        ("iql", {"expectile": 1.0}, "algorithm.expectile=1.0 must lie in (0, 1)"),
        ("iql", {"gamma": -0.01}, "algorithm.gamma=-0.01 must lie in [0, 1]"),
        ("iql", {"beta": 0.0}, "algorithm.beta=0.0 must be > 0"),
        ("iql", {"max_weight": -1.0}, "algorithm.max_weight=-1.0 must be > 0"),
        ("iql", {"target_update_interval": -2}, "algorithm.target_update_interval=-2 must be > 0"),
    ],
)
def test_out_of_range_settings_are_one_line_errors(algorithm: str, override: dict, message: str) -> None:
    with pytest.raises(MazerunError) as error:
        validate({"algorithm": {"name": algorithm, **override}})
    assert message in str(error.value) and "\n" not in str(error.value)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def refusal_of_continuous_actions(name: str) -> str | None:
    """What algorithm ``name`` says of LunarLanderContinuous's actions, or None where it learns them."""
    env = make_env("LunarLanderContinuous-v3")
    env.close()
    try:
        algorithm_module(name).Config().check_spaces(env.observation_space, env.action_space)
    except MazerunError as error:
        return str(error)
    return None


VALUE_LEARNERS = [name for name in ALGORITHMS if issubclass(algorithm_module(name).Config, ValueLearningConfig)]


@pytest.mark.parametrize("algorithm", VALUE_LEARNERS)
def test_a_value_learner_learns_box_actions_and_refuses_a_box_of_several_dimensions(algorithm: str) -> None:
    """Discrete and 1-D Box actions are learnt (the Box variant: tests/test_continuous_offline.py); the rest is
    refused in one line that says how to fix it."""
    assert refusal_of_continuous_actions(algorithm) is None
    config = algorithm_module(algorithm).Config()
    with pytest.raises(MazerunError) as error:
        config.check_spaces(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2, 2)))
    refusal = str(error.value)
    assert f"algorithm={algorithm} learns Q-values of Discrete or 1-D Box actions" in refusal and "\n" not in refusal
    assert "Box(-1.0, 1.0, (2, 2), float32)" in refusal and "flatten a Box of several dimensions" in refusal


@pytest.mark.parametrize("algorithm", VALUE_LEARNERS)
def test_continuous_actions_pass_the_check_made_before_any_record_is_read(algorithm: str, tmp_path: Path) -> None:
    missing = tmp_path / "nothing_here"
    result = run_cli("-cn", "conf_train", f"algorithm={algorithm}", "env=LunarLanderContinuous-v3",
                     f"runner.dataset.dir_or_file={missing}", cwd=tmp_path)
    assert "nothing_here" in one_line_error(result)  # the records are what is missing, not a way to learn Box actions


def test_a_missing_dataset_is_a_one_line_error(tmp_path: Path) -> None:
    line = one_line_error(run_cli("-cn", "conf_train", "algorithm=iql",
                                  f"runner.dataset.dir_or_file={tmp_path / 'no_such_dir'}", cwd=tmp_path))
    assert "no_such_dir" in line
