"""PPO: GAE, episode boundaries, critic burn-in, fine-tuning, continuing, bad input, and the real `run` command."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok, save_network, svg_polylines, synthetic_batch

from mazerun.acting.envs import make_env
from mazerun.acting.evaluation import evaluate
from mazerun.acting.rollout import rollout
from mazerun.acting.vector import make_vector_env
from mazerun.algorithms.bc import BCConfig
from mazerun.algorithms.ppo import PPO, PPOConfig, log_prob_and_entropy
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.algorithms.rollouts import compute_gae
from mazerun.cli import execute
from mazerun.compose.validation import validate
from mazerun.config.schemas import DatasetConfig, PolicyConfig, RunConfig, RunnerConfig
from mazerun.core.errors import MazerunError
from mazerun.nn.checkpoint import load_checkpoint, network_from_checkpoint
from mazerun.nn.models import CRITIC_PREFIXES, ModelConfig, build_actor_critic, build_q_network, obs_to_tensor
from mazerun.training.loops.onpolicy import RolloutBuffer, RolloutCollector
from mazerun.training.metrics import read_metrics_csv
from mazerun.training.train import train

TINY = ["algorithm.n_steps=32", "algorithm.batch_size=32", "runner.n_envs=2", "runner.max_episode_steps=50",
        "runner.eval_repeats=2", "model.hidden_sizes=[16,16]"]
"""Two iterations of 64 steps per 128 env steps; 50-step episodes keep evaluations short."""


def tiny_config(input_dir: Path | None = None, total_steps: int = 128, burn_in: int = 0) -> RunConfig:
    """The in-process equivalent of `run algorithm=ppo <TINY> algorithm.total_steps=128 algorithm.eval_every=64`."""
    return RunConfig(
        algorithm=PPOConfig(n_steps=32, batch_size=32, total_steps=total_steps, eval_every=64,
                            critic_burn_in_epochs=burn_in),
        runner=RunnerConfig(n_envs=2, max_episode_steps=50, eval_repeats=2),
        input_dir=None if input_dir is None else str(input_dir), model={"hidden_sizes": [16, 16]}, device="cpu",
    )


def policy_state(path: Path) -> dict[str, torch.Tensor]:
    """Every weight and buffer of a checkpoint but the value function's parameters."""
    state = load_checkpoint(path).model_state
    return {name: value for name, value in state.items() if not name.startswith(CRITIC_PREFIXES)}


@pytest.fixture(scope="module")
def bc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BC clone of two short LunarLander heuristic episodes (in-process; seconds)."""
    root = tmp_path_factory.mktemp("bc")
    rollout("LunarLander-v3", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=2, max_episode_steps=60),
            root / "records", print_fn=lambda _: None)
    config = RunConfig(
        algorithm=BCConfig(n_updates=20, eval_every=20, batch_size=32, validation_percentage=0),
        runner=RunnerConfig(eval_repeats=1, max_episode_steps=20,
                            dataset=DatasetConfig(dir_or_file=str(root / "records" / "trajectory_data"))),
        model={"hidden_sizes": [16, 16]}, device="cpu",
    )
    torch.manual_seed(0)
    train(config, root / "run")
    return root / "run"


# ------------------------------------------------------------------------------------------------ GAE


def test_gae_matches_a_hand_computed_example_with_truncation_and_termination() -> None:
    # env 0: truncated after t=1 (its reward 2 carries the bootstrap 0.5 * V(final obs) = 0.5 * 4),
    # terminated after t=3, a new episode from t=4 on. env 1: one unfinished episode.
    gamma, lam = 0.5, 0.5  # gamma * lambda = 0.25
    rewards = torch.tensor([[1.0, 1.0], [2.0 + 0.5 * 4.0, 1.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    values = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    last_values = torch.tensor([2.0, 0.0])
    advantages, returns = compute_gae(rewards, values, dones, last_values, gamma, lam)
    # env 0 deltas: t4 2+0.5*2-1 = 2; t3 1-0 = 1 (done); t2 0+0.5*0-3 = -3; t1 4-1 = 3 (done); t0 1+0.5*1-2 = -0.5
    # advantages:   A4 = 2; A3 = 1; A2 = -3+0.25*1 = -2.75; A1 = 3; A0 = -0.5+0.25*3 = 0.25
    # env 1: every delta is 1, so A_t = 1 + 0.25 * A_t+1 from A4 = 1.
    expected = torch.tensor([[0.25, 1.33203125], [3.0, 1.328125], [-2.75, 1.3125], [1.0, 1.25], [2.0, 1.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values)


# -------------------------------------------------------------------------------------- episode ends


def linear_critic_network(env: gym.vector.VectorEnv) -> torch.nn.Module:
    """No hidden layers: V(s) = w.s + b, so a bootstrap from the wrong observation shows in the reward."""
    torch.manual_seed(0)
    network = build_actor_critic(ModelConfig(kind="vector_obs", hidden_sizes=()), env.single_observation_space,
                                 env.single_action_space)
    with torch.no_grad():
        network.value_head.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        network.value_head.bias.fill_(0.5)
        network.policy_head.bias.copy_(torch.tensor([2.0, 0.0]))  # mostly push left: some poles fall
    return network


@pytest.mark.parametrize("vector", ["sync", "async"])
def test_rollout_marks_episode_ends_and_bootstraps_truncation_from_the_final_observation(vector: str) -> None:
    n_envs, n_steps, limit, gamma, seed = 2, 40, 9, 0.9, 3
    envs = make_vector_env("CartPole-v1", n_envs, vector, limit, seed=seed)
    network = linear_critic_network(envs)
    buffer = RolloutBuffer(n_steps, n_envs, envs.single_observation_space, envs.single_action_space, torch.device("cpu"))
    try:
        collector = RolloutCollector(envs, network, envs.single_observation_space, None, torch.device("cpu"), gamma,
                                     torch.Generator().manual_seed(0))
        collector.collect(buffer)
    finally:
        envs.close()

    counts = {"terminated": 0, "truncated": 0}
    for index in range(n_envs):  # replay each env alone with the same seeds and actions
        env = make_env("CartPole-v1", max_episode_steps=limit)
        episode = 0
        observation, _ = env.reset(seed=seed + index)
        for t in range(n_steps):
            np.testing.assert_allclose(buffer.observations[t, index].numpy(), observation, rtol=0, atol=0)
            observation, reward, terminated, truncated, _ = env.step(int(buffer.actions[t, index]))
            expected = reward
            if truncated and not terminated:
                final = obs_to_tensor(observation, env.observation_space, None, "cpu")
                expected += gamma * float(network.value(final).detach())
            assert buffer.rewards[t, index] == pytest.approx(expected, abs=1e-5)
            assert buffer.dones[t, index] == float(terminated or truncated)
            if terminated or truncated:
                counts["terminated" if terminated else "truncated"] += 1
                episode += 1  # copy i plays its episodes on seeds seed + i, seed + i + n_envs, ...
                observation, _ = env.reset(seed=seed + index + episode * n_envs)
        env.close()
    assert counts["terminated"] > 0 and counts["truncated"] > 0, counts
    metrics = collector.episodes.episode_metrics()
    assert metrics["episodes"] == counts["terminated"] + counts["truncated"]
    assert metrics["episode_length"] <= limit


def test_continuous_actions_are_clipped_for_the_env_but_stored_as_sampled() -> None:
    envs = make_vector_env("LunarLanderContinuous-v3", 2, "sync", 20)
    torch.manual_seed(0)
    network = build_actor_critic(ModelConfig(kind="vector_obs", hidden_sizes=(8,)), envs.single_observation_space,
                                 envs.single_action_space)
    with torch.no_grad():
        network.log_std.fill_(1.0)  # std e: many samples fall outside [-1, 1]
    buffer = RolloutBuffer(16, 2, envs.single_observation_space, envs.single_action_space, torch.device("cpu"))
    try:
        RolloutCollector(envs, network, envs.single_observation_space, None, torch.device("cpu"), 0.99,
                         torch.Generator().manual_seed(0)).collect(buffer)
    finally:
        envs.close()
    assert buffer.actions.shape == (16, 2, 2)
    assert buffer.actions.abs().max() > 1.0
    expected = network.distribution(buffer.observations.flatten(0, 1)).log_prob(buffer.actions.flatten(0, 1))
    torch.testing.assert_close(buffer.log_probs.flatten(), expected.detach())


# ------------------------------------------------------------------------------------------- update


def test_critic_burn_in_update_leaves_every_policy_weight_bit_identical() -> None:
    space, actions = gym.spaces.Box(-1, 1, (8,)), gym.spaces.Discrete(4)
    ppo = PPO(PPOConfig(batch_size=16, n_epochs=2, critic_burn_in_epochs=1),
              AlgorithmSpec(space, actions, ModelConfig(kind="vector_obs", hidden_sizes=(16, 16))))
    network = ppo.network
    before = {name: value.clone() for name, value in network.state_dict().items()}
    metrics = ppo.update(synthetic_batch(network))  # the first update: critic burn-in
    after = network.state_dict()
    for name, value in before.items():
        if name.startswith(CRITIC_PREFIXES) and name.endswith(("weight", "bias")):
            assert not torch.equal(value, after[name]), f"{name} should have learned"
        elif not name.startswith(CRITIC_PREFIXES):
            assert torch.equal(value, after[name]), f"{name} changed during critic burn-in"
    assert metrics["approx_kl"] == 0.0 and metrics["clip_fraction"] == 0.0
    ppo.update(synthetic_batch(network))
    assert not torch.equal(before["policy_head.weight"], network.state_dict()["policy_head.weight"])


def test_log_prob_and_entropy_match_the_distribution_methods() -> None:
    torch.manual_seed(0)
    categorical = torch.distributions.Categorical(logits=3 * torch.randn(6, 4))
    normal = torch.distributions.Independent(torch.distributions.Normal(torch.randn(6, 2), torch.rand(6, 2) + 0.1), 1)
    for distribution in (categorical, normal):
        actions = distribution.sample()
        log_probs, entropy = log_prob_and_entropy(distribution, actions)
        torch.testing.assert_close(log_probs, distribution.log_prob(actions))
        torch.testing.assert_close(entropy, distribution.entropy().mean())


def test_linear_learning_rate_decays_to_zero_at_total_steps() -> None:
    spec = AlgorithmSpec(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(2), ModelConfig(kind="vector_obs",
                                                                                          hidden_sizes=(4,)))
    ppo = PPO(PPOConfig(lr=1e-3, lr_schedule="linear", total_steps=1000), spec)
    assert [ppo.learning_rate(step) for step in (0, 250, 1000)] == pytest.approx([1e-3, 7.5e-4, 0.0])
    assert PPO(PPOConfig(lr=1e-3), spec).learning_rate(999) == 1e-3


# -------------------------------------------------------------------------------------- end to end


def test_scratch_run_through_the_cli_writes_checkpoints_metrics_and_curve(workdir: Path) -> None:
    result = run_ok("algorithm=ppo", "algorithm.total_steps=100", "algorithm.eval_every=64", *TINY, cwd=workdir)
    assert "not a multiple of the rollout size 64" in result.stderr and "training for 128 steps" in result.stderr
    run_dir = newest_run_dir(workdir)
    names = {path.name for path in run_dir.iterdir()}
    assert {"best.pt", "last.pt", "metrics.csv", "learning_curve.svg"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)
    evaluations = [row for row in read_metrics_csv(run_dir / "metrics.csv") if row["metric"] == "mean_return"]
    assert len(evaluations) == 3  # steps 0, 64 and 128
    assert [len(line) for line in svg_polylines(run_dir / "learning_curve.svg")] == [3]  # a point each
    rows = read_metrics_csv(run_dir / "metrics.csv")
    logged = {(row["group"], row["metric"]) for row in rows}
    for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "explained_variance",
                 "learning_rate", "sps"):
        assert ("train", name) in logged
    assert {("rollout", "episode_return"), ("rollout", "episode_length"), ("eval", "mean_return")} <= logged
    assert [row["step"] for row in rows if row["metric"] == "mean_return"] == [0, 64, 128]
    last = load_checkpoint(run_dir / "last.pt")
    assert last.algorithm == "ppo" and last.env_id == "LunarLander-v3"
    assert last.model_config["network"] == "actor_critic" and last.model_config["hidden_sizes"] == [16, 16]
    assert last.extra["step"] == 128 and last.extra["training_state"]["iteration"] == 2
    # the scratch network keeps the identity normalisation (rl-zoo does not normalise LunarLander)
    assert torch.equal(last.model_state["actor_encoder.obs_std"], torch.ones(8))

    # watch it: the torch_policy rollout of the PPO run
    stats = rollout("LunarLander-v3", PolicyConfig(name="torch_policy"),
                    RunnerConfig(type="sequential", n_episodes=1, max_episode_steps=30),
                    workdir / "watch", input_dir=str(run_dir), print_fn=lambda _: None)
    assert stats["episode_count"] == 1 and 0 < stats["total_step_count"] <= 30


def test_fine_tune_through_the_cli_starts_from_the_clone(workdir: Path, bc_run: Path) -> None:
    result = run_ok("algorithm=ppo", f"input_dir={bc_run}", "algorithm.total_steps=128", "algorithm.eval_every=64",
                    "runner.critic_burn_in_epochs=1", "algorithm.n_steps=32", "algorithm.batch_size=32", "runner.n_envs=2",
                    "runner.max_episode_steps=50", "runner.eval_repeats=3", cwd=workdir)
    assert "fine-tuning the bc policy" in result.stderr and "critic burn-in" in result.stderr
    run_dir = newest_run_dir(workdir)
    assert {"best.pt", "last.pt", "metrics.csv", "learning_curve.svg"} <= {path.name for path in run_dir.iterdir()}
    first = next(row for row in read_metrics_csv(run_dir / "metrics.csv") if row["metric"] == "mean_return")
    assert first["step"] == 0

    # the first evaluation is the clone's own, on the same seeds
    checkpoint = load_checkpoint(bc_run)
    clone = network_from_checkpoint(checkpoint)
    own = evaluate(lambda obs: clone.act(obs, deterministic=True), "LunarLander-v3", 3,
                   observation_space=checkpoint.observation_space, vocabulary=None, device="cpu", max_episode_steps=50)
    assert first["value"] == own.metrics()["mean_return"]
    assert load_checkpoint(run_dir / "last.pt").model_config == checkpoint.model_config


def test_critic_burn_in_keeps_the_clone_bit_identical_and_its_normalisation(tmp_path: Path, bc_run: Path) -> None:
    train(tiny_config(bc_run, burn_in=2), tmp_path)
    clone, tuned = policy_state(bc_run / "best.pt"), policy_state(tmp_path / "last.pt")
    assert clone.keys() == tuned.keys()
    for name, value in clone.items():
        assert torch.equal(value, tuned[name]), name
    assert not torch.equal(clone["actor_encoder.obs_std"], torch.ones(8))  # the clone's statistics, kept


def test_continuing_a_run_restores_optimizer_state_and_step_count(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    train(tiny_config(), first)
    # a continued run goes on from step 128 to 256 with the first run's Adam moments
    train(tiny_config(first, total_steps=256), second)
    before, after = load_checkpoint(first / "last.pt").extra, load_checkpoint(second / "last.pt").extra
    assert (before["step"], before["training_state"]["iteration"]) == (128, 2)
    assert (after["step"], after["training_state"]["iteration"]) == (256, 4)
    updates_per_run = 2 * 4 * (64 // 32)  # iterations * epochs * minibatches
    adam_steps = [float(state["step"]) for state in after["training_state"]["algorithm"]["optimizer"]["state"].values()]
    assert adam_steps and all(step == 2 * updates_per_run for step in adam_steps)
    # the continued run's metrics.csv holds the whole history, evaluated once per step
    steps = [row["step"] for row in read_metrics_csv(second / "metrics.csv") if row["metric"] == "mean_return"]
    assert steps == [0, 64, 128, 192, 256]


def test_a_run_split_by_ctrl_c_and_continued_equals_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(tiny_config(total_steps=192), tmp_path / "whole")
    calls = {"n": 0}
    update = PPO.update

    def interrupted(self: PPO, *args: object, **kwargs: object) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return update(self, *args, **kwargs)

    monkeypatch.setattr(PPO, "update", interrupted)
    with pytest.raises(KeyboardInterrupt, match="at step 64; .*last.pt holds step 64"):
        train(tiny_config(total_steps=192), tmp_path / "stopped")
    assert load_checkpoint(tmp_path / "stopped" / "last.pt").extra["step"] == 64
    assert (tmp_path / "stopped" / "learning_curve.svg").is_file()
    monkeypatch.setattr(PPO, "update", update)
    train(tiny_config(tmp_path / "stopped", total_steps=192), tmp_path / "resumed")

    whole, resumed = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed.extra["step"] == 192
    for name, value in whole.model_state.items():
        assert torch.equal(value, resumed.model_state[name]), name

    def rows(run: str) -> list[dict]:  # speeds and phase times are the wall clock's, not the run's
        wall_clock = {"sps", "rollout_seconds", "update_seconds"}
        return [row for row in read_metrics_csv(tmp_path / run / "metrics.csv") if row["metric"] not in wall_clock]

    assert rows("resumed") == rows("whole")


# ---------------------------------------------------------------------------------------- bad input


def q_network_run(directory: Path) -> Path:
    """A run directory holding a CQL-style Q-network checkpoint."""
    env = make_env("LunarLander-v3")
    config = ModelConfig(kind="vector_obs", hidden_sizes=(4,))
    network = build_q_network(config, env.observation_space, env.action_space)
    save_network(directory / "best.pt", network, "q_network", config, "LunarLander-v3", env.observation_space,
                 env.action_space, "cql")
    return directory


BAD_INPUT = [
    ({"input_dir": "no/such/run"}, "does not exist"),
    ({"input_dir": "{empty}"}, "no checkpoint"),
    ({"env": {"name": "CartPole-v1"}, "input_dir": "{bc}"}, "differs from LunarLander-v3"),
    ({"env": {"name": "LunarLanderContinuous-v3"}, "input_dir": "{bc}"}, "discrete actions"),
    ({"input_dir": "{cql}"}, "holds a q_network (cql) and ppo trains an actor_critic"),
    ({"algorithm": {"total_steps": 0}}, "algorithm.total_steps=0 must be > 0"),
    ({"algorithm": {"batch_size": 64}, "runner": {"n_envs": 3}}, "use algorithm.batch_size=48 or 96"),
    ({"algorithm": {"gamma": 1.5}}, "algorithm.gamma=1.5 must lie in [0, 1]"),
    ({"algorithm": {"gae_lambda": -0.1}}, "algorithm.gae_lambda=-0.1 must lie in [0, 1]"),
    ({"algorithm": {"clip_range": 0}}, "algorithm.clip_range=0"),
    ({"algorithm": {"clip_vf": -1.0}}, "algorithm.clip_vf=-1.0 must be > 0"),
    ({"algorithm": {"lr_schedule": "cosine"}}, "use constant or linear"),
    ({"algorithm": {"ent_coef": -0.1}}, "algorithm.ent_coef=-0.1 must be >= 0"),
    ({"algorithm": {"n_steps": "many"}}, "algorithm.n_steps"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUT, ids=[message for _, message in BAD_INPUT])
def test_bad_input_is_a_one_line_error_and_writes_nothing(
    tmp_path: Path, bc_run: Path, overrides: dict, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    places = {"{empty}": str(tmp_path / "empty"), "{bc}": str(bc_run), "{cql}": str(q_network_run(tmp_path))}
    values = {key: places.get(value, value) if isinstance(value, str) else value for key, value in overrides.items()}
    algorithm = {"name": "ppo", "n_steps": 32, "batch_size": 32, **values.pop("algorithm", {})}
    runner = {"n_envs": 2, **values.pop("runner", {})}
    run_dir = tmp_path / "run"
    with pytest.raises(MazerunError) as error:
        execute(validate({"algorithm": algorithm, "runner": runner, "device": "cpu", **values}), run_dir)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not run_dir.exists()


def test_continuing_a_finished_run_says_to_raise_total_steps(tmp_path: Path) -> None:
    train(tiny_config(), tmp_path / "done")
    with pytest.raises(MazerunError, match="raise algorithm.total_steps"):
        train(tiny_config(tmp_path / "done"), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_cli_bad_input_exits_non_zero_with_one_line(workdir: Path) -> None:
    result = run_cli("algorithm=ppo", "input_dir=outputs/missing", cwd=workdir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "outputs/missing does not exist" in errors[0]

