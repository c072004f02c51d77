"""Memory: sequence sampling by hand, state resets, recurrent runs through `run`, round trips, bad input."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok

from mazerun.acting.envs import make_env
from mazerun.acting.evaluation import EVAL_SEED_OFFSET, evaluate
from mazerun.acting.policies.torch_policy import TorchPolicy
from mazerun.acting.rollout import rollout
from mazerun.acting.vector import make_vector_env
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.data.records import StateTrajectoryRecord, load_records
from mazerun.data.tensors import SequenceSampler, records_to_dataset
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.nn.models import Memory, ModelConfig, build_actor_critic, build_q_network
from mazerun.training.loops.onpolicy import RolloutBuffer, RolloutCollector, whole_sequence_batch_size

MEMORY = ["model.memory=gru", "model.memory_size=16", "model.hidden_sizes=[16,16]"]


def episode(first: float, steps: int) -> StateTrajectoryRecord:
    """Observations first, first + 1, ... (T + 1 of them), actions 0, 1, 0, 1, ..."""
    return StateTrajectoryRecord(
        observations=np.arange(first, first + steps + 1, dtype=np.float32)[:, None].repeat(2, axis=1),
        actions=np.arange(steps) % 2, rewards=np.ones(steps), terminated=True, truncated=False,
        env_id="LunarLander-v3", seed=0, policy="hand",
    )


# --------------------------------------------------------------------------------- sequence sampler


def test_chunks_cross_episode_boundaries_with_masks_and_burn_in_by_hand() -> None:
    # rows 0-2: episode A (observations 0, 1, 2), rows 3-6: episode B (observations 10 .. 13)
    data = records_to_dataset([episode(0.0, 3), episode(10.0, 4)])
    sampler = SequenceSampler(data, rollout_len=3, nrollouts=2, burn_in=2, seed=0)
    assert len(sampler) == 5  # chunk starts 0 .. 4
    batch = sampler.batch(torch.tensor([1, 4]))
    assert batch.observations[:, :, 0].T.tolist() == [[1.0, 2.0, 10.0], [11.0, 12.0, 13.0]]
    assert batch.next_observations[:, :, 0].T.tolist() == [[2.0, 3.0, 11.0], [12.0, 13.0, 14.0]]
    assert batch.starts.T.tolist() == [[False, False, True], [False, False, False]]
    assert batch.dones.T.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    # burn-in: the two steps before each chunk; before row 0 the first row repeats (an episode start)
    assert batch.burn_in_observations[:, :, 0].T.tolist() == [[0.0, 0.0], [2.0, 10.0]]
    assert batch.burn_in_starts.T.tolist() == [[True, True], [False, True]]
    # an epoch lays chunks side by side over every row
    firsts = [chunk.observations[0, :, 0].tolist() for chunk in sampler.epoch()]
    assert firsts == [[0.0, 10.0]]


def test_a_strided_sampler_follows_one_env_copy_through_interleaved_rows() -> None:
    # two env copies interleaved: rows 0, 2, 4 are copy 0's steps, rows 1, 3, 5 copy 1's
    data = records_to_dataset([episode(0.0, 6)])
    starts = torch.tensor([True, True, False, False, True, False])
    sampler = SequenceSampler(data, rollout_len=2, nrollouts=2, burn_in=1, seed=0, stride=2, starts=starts)
    batch = sampler.batch(torch.tensor([2, 3]))
    assert batch.observations[:, :, 0].T.tolist() == [[2.0, 4.0], [3.0, 5.0]]
    assert batch.starts.T.tolist() == [[False, True], [False, False]]
    assert batch.burn_in_observations[:, :, 0].T.tolist() == [[0.0], [1.0]]


# ------------------------------------------------------------------------------------------ resets


def test_memory_restarts_at_episode_starts() -> None:
    torch.manual_seed(0)
    memory = Memory("lstm", 3, 4)
    features = torch.randn(5, 2, 3)
    starts = torch.tensor([[True, True], [False, False], [False, True], [False, False], [False, False]])
    outputs, states = memory(features, starts, torch.randn(2, memory.state_size))
    assert states.shape == (5, 2, 8)
    fresh, _ = memory(features[2:, 1:], starts[2:, 1:], torch.randn(1, memory.state_size))
    torch.testing.assert_close(outputs[2:, 1:], fresh)  # what came before the start does not matter


def test_next_observation_values_read_from_the_transition_state_match_the_sequence() -> None:
    torch.manual_seed(0)
    space, actions = gym.spaces.Box(-1, 1, (2,)), gym.spaces.Discrete(2)
    network = build_q_network(ModelConfig(kind="vector_obs", hidden_sizes=(8,), memory="gru", memory_size=4), space,
                              actions)
    observations = torch.randn(6, 3, 2)
    starts = torch.zeros(6, 3, dtype=torch.bool)
    starts[0] = True
    q, states = network.q_sequence(observations[:-1], starts[:-1], network.initial_state(3, "cpu"))
    next_q = network.next_q(observations[1:], states)
    whole, _ = network.q_sequence(observations, starts, network.initial_state(3, "cpu"))
    torch.testing.assert_close(next_q, whole[1:])


def recurrent_network(space: gym.Space, actions: gym.Space) -> torch.nn.Module:
    torch.manual_seed(3)
    network = build_actor_critic(ModelConfig(kind="vector_obs", hidden_sizes=(8,), memory="gru", memory_size=8), space,
                                 actions)
    with torch.no_grad():
        for parameter in network.actor_memory.parameters():
            parameter.mul_(4.0)  # a memory loud enough that a state carried over would change the actions
    return network


def test_evaluation_restarts_the_state_of_every_episode() -> None:
    env = make_env("CartPole-v1")
    network = recurrent_network(env.observation_space, env.action_space)
    together = evaluate(network, "CartPole-v1", 20, observation_space=env.observation_space, vocabulary=None,
                        device="cpu")  # 16 slots: four of them play a second episode after a first
    alone = [evaluate(network, "CartPole-v1", 1, observation_space=env.observation_space, vocabulary=None,
                      device="cpu", seed_offset=EVAL_SEED_OFFSET + index).lengths[0] for index in range(20)]
    assert sorted(together.lengths) == sorted(alone)


def test_the_rollout_collector_restarts_states_and_replays_to_the_same_log_probs() -> None:
    envs = make_vector_env("CartPole-v1", 3, "sync", 12, seed=5)
    network = recurrent_network(envs.single_observation_space, envs.single_action_space)
    buffer = RolloutBuffer(30, 3, envs.single_observation_space, envs.single_action_space, torch.device("cpu"),
                           state_size=network.state_size)
    try:
        collector = RolloutCollector(envs, network, envs.single_observation_space, None, torch.device("cpu"), 0.99,
                                     torch.Generator().manual_seed(0))
        collector.collect(buffer)
    finally:
        envs.close()
    assert buffer.starts[0].all() and buffer.starts[12].all() and not buffer.starts[1:12].any()  # 12-step episodes
    with torch.no_grad():
        distribution, _ = network.distribution_sequence(buffer.observations, buffer.starts, buffer.initial_state)
        values, _ = network.value_sequence(buffer.observations, buffer.starts, buffer.initial_state)
    torch.testing.assert_close(distribution.log_prob(buffer.actions), buffer.log_probs)
    torch.testing.assert_close(values, buffer.values)


# -------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bot_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bot")
    rollout("BabyAI-GoToLocal-v0", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=12), directory,
            print_fn=lambda _: None)
    return directory / "trajectory_data"


def test_recurrent_bc_on_babyai_and_its_policy_round_trips(workdir: Path, bot_records: Path) -> None:
    run_ok("-cn", "conf_train", "env=BabyAI-GoToLocal-v0", "model.memory=lstm", "model.memory_size=16",
           "algorithm=bc", "algorithm.rollout_len=4", "algorithm.nrollouts=8", "algorithm.burn_in=2",
           "runner.dataset.max_episodes=10", f"runner.dataset.dir_or_file={bot_records}", "algorithm.n_updates=10",
           "algorithm.eval_every=5", "runner.eval_repeats=2", "algorithm.validation_percentage=20", cwd=workdir)
    run_dir = newest_run_dir(workdir)
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.model_config["memory"] == "lstm" and "actor_memory.cell.weight_hh" in checkpoint.model_state
    assert "dataset: 8 episodes" in (run_dir / "run.log").read_text()  # max_episodes=10, 2 held out

    # parallel workers replay exactly what one process does: each episode restarts the policy's state
    records = {}
    for runner in ("sequential", "parallel"):
        rollout("BabyAI-GoToLocal-v0", PolicyConfig(name="torch_policy"),
                RunnerConfig(type=runner, n_episodes=4, n_workers=2), workdir / runner, input_dir=str(run_dir),
                print_fn=lambda _: None)
        records[runner] = load_records(workdir / runner / "trajectory_data")
    for one, other in zip(records["sequential"], records["parallel"]):
        assert one.seed == other.seed and np.array_equal(one.actions, other.actions)

    policy = TorchPolicy(str(run_dir), "BabyAI-GoToLocal-v0", checkpoint.action_space)
    env = make_env("BabyAI-GoToLocal-v0")
    observation, _ = env.reset(seed=0)
    policy.reset(env, 0)
    policy.act(observation)
    assert policy.state.abs().sum() > 0
    policy.reset(env, 1)
    assert policy.state.abs().sum() == 0


def test_recurrent_ppo_on_cartpole_with_masked_velocities(workdir: Path) -> None:
    run_ok("env=CartPole-v1", "wrappers=mask_velocity", "algorithm=ppo", *MEMORY, "algorithm.n_steps=32",
           "algorithm.batch_size=32", "runner.n_envs=2", "algorithm.total_steps=128", "algorithm.eval_every=64",
           "runner.eval_repeats=2", cwd=workdir)
    last = load_checkpoint(newest_run_dir(workdir) / "last.pt")
    assert last.env_id == "CartPole-v1+mask_velocity" and last.observation_space.shape == (2,)
    assert last.extra["training_state"]["envs"]["memory"].shape == (2, 32)  # actor + critic state per env copy


def test_recurrent_dagger_trains(workdir: Path) -> None:
    """The interactive loop's chunks of interleaved env copies; every algorithm's update on chunks is
    tests/test_algorithm_protocol.py's."""
    run_ok("algorithm=dagger", "env=BabyAI-GoToLocal-v0", *MEMORY, "algorithm.rollout_len=8", "algorithm.nrollouts=4",
           "algorithm.total_steps=128", "algorithm.n_steps=16", "runner.n_envs=4", "algorithm.n_updates=5",
           "algorithm.refit_updates=3", "algorithm.eval_every=128", "runner.eval_repeats=1", cwd=workdir)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.memory=transformer"], "unknown model.memory 'transformer'; use one of none, gru, lstm"),
    (["model.memory=gru", "algorithm.rollout_len=0"], "algorithm.rollout_len=0 must be > 0"),
    (["model.memory=gru", "algorithm=dagger", "algorithm.total_steps=64", "runner.n_envs=8", "algorithm.rollout_len=16"],
     "algorithm.total_steps=64 over runner.n_envs=8 copies labels 8 each: nothing could train"),
    (["model.memory=gru", "algorithm.nrollouts=-1"], "algorithm.nrollouts=-1 must be > 0"),
    (["model.memory=gru", "algorithm.rollout_len=100000", "algorithm.validation_percentage=10"],
     "algorithm.rollout_len=100000 is longer than the whole"),
    (["env=gym_env", "env.name=Acrobot-v1", "wrappers=mask_velocity"], "mask_velocity does not know"),
    (["model.memory=gru", "hpo=evolution"], "hpo=evolution trains agents without memory"),
])
def test_bad_memory_input_is_one_line(workdir: Path, bot_records: Path, overrides: list[str], message: str) -> None:
    """Including a model with memory given to the population search, whose batched update carries no state."""
    result = run_cli("-cn", "conf_train", f"runner.dataset.dir_or_file={bot_records}", "algorithm.n_updates=2",
                     *overrides, cwd=workdir)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not list(workdir.glob("outputs/*/*/best.pt"))
    if "longer than the whole" in message:  # the training set: the records less the episodes held out
        steps = int(errors[0].split("training set (")[1].split(" steps")[0])
        assert 0 < steps < sum(len(record) for record in load_records(bot_records))
        assert f"use algorithm.rollout_len={steps} or less" in errors[0]


@pytest.mark.parametrize(("batch_size", "n_steps", "n_envs", "resolved"), [
    (64, 1024, 16, 1024),   # PPO's default batch with memory: one env's whole sequence
    (100, 32, 4, 128),      # 32, 64 or 128 fit: 128 is nearest
    (96, 32, 4, 64),        # a tie between 64 and 128: the smaller
    (256, 32, 16, 256),     # already whole sequences of 8 envs, which divides 16
    (96, 32, 6, 96),        # 3 envs divide 6
])
def test_recurrent_ppo_takes_the_nearest_whole_sequence_batch(batch_size: int, n_steps: int, n_envs: int,
                                                               resolved: int) -> None:
    assert whole_sequence_batch_size(batch_size, n_steps, n_envs) == resolved


def test_recurrent_ppo_says_which_batch_size_it_took(workdir: Path) -> None:
    result = run_ok("env=CartPole-v1", "wrappers=mask_velocity", "algorithm=ppo", *MEMORY, "algorithm.n_steps=16",
                    "algorithm.batch_size=40", "runner.n_envs=4", "algorithm.total_steps=64", "algorithm.eval_every=64",
                    "runner.eval_repeats=1", cwd=workdir)
    assert "algorithm.batch_size=40 becomes 32: with model.memory a minibatch is whole env sequences" in result.stderr


def test_a_chunk_longer_than_every_episode_crosses_their_ends(workdir: Path, bot_records: Path) -> None:
    longest = max(len(record) for record in load_records(bot_records))
    run_ok("-cn", "conf_train", "env=BabyAI-GoToLocal-v0", *MEMORY, f"algorithm.rollout_len={longest + 5}",
           "algorithm.nrollouts=2", f"runner.dataset.dir_or_file={bot_records}", "algorithm.n_updates=2",
           "algorithm.eval_every=2", "runner.eval_repeats=1", cwd=workdir)
