"""SAC: its losses against hand-computed numbers, the replay loop's truncation handling, exact resume, and the
commands a user types (train on Pendulum, roll the run out, fine-tune a clone, be refused on CartPole)."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok

from mazerun.acting.envs import make_env
from mazerun.acting.rollout import rollout
from mazerun.algorithms import build_algorithm
from mazerun.algorithms.bc import BCConfig
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.algorithms.sac import (
    SACConfig,
    soft_q_target,
    temperature,
    temperature_loss,
)
from mazerun.config.schemas import (
    DatasetConfig,
    EnvConfig,
    PolicyConfig,
    RunConfig,
    RunnerConfig,
)
from mazerun.core.errors import MazerunError
from mazerun.data.records import load_records
from mazerun.data.tensors import TransitionBatch
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.nn.models import ModelConfig, SquashedGaussianPolicy, squashed_log_prob
from mazerun.training.loops import offpolicy
from mazerun.training.metrics import read_metrics_csv
from mazerun.training.train import train

TINY = ("env.name=Pendulum-v1", "algorithm=sac", "algorithm.total_steps=48", "algorithm.learning_starts=16",
        "algorithm.batch_size=16", "algorithm.eval_every=24", "runner.n_envs=2", "runner.max_episode_steps=10",
        "runner.eval_repeats=1", "model.hidden_sizes=[16,16]", "device=cpu")
"""`run` on Pendulum with a budget of seconds: 48 steps of 2 env copies, updates from step 16."""


def tiny_config(input_dir: Path | None = None, total_steps: int = 48, max_episode_steps: int = 10,
                learning_starts: int = 16) -> RunConfig:
    """The in-process equivalent of `run <TINY>`."""
    return RunConfig(
        algorithm=SACConfig(total_steps=total_steps, learning_starts=learning_starts, batch_size=16, eval_every=24,
                            buffer_size=1000),
        env=EnvConfig(name="Pendulum-v1"),
        runner=RunnerConfig(n_envs=2, max_episode_steps=max_episode_steps, eval_repeats=1),
        input_dir=None if input_dir is None else str(input_dir), model={"hidden_sizes": [16, 16]}, device="cpu",
    )


# ------------------------------------------------------------------------------------------------- losses


def test_the_squashed_log_prob_is_the_gaussian_density_corrected_through_tanh() -> None:
    # u = 0.5 under N(0, 1): log N = -0.5 * 0.25 - log(sqrt(2 pi)) = -1.0439385; log(1 - tanh(0.5)^2) = -0.2402290
    # u = -1 under N(0.5, e^-1): z = -1.5 / e^-1 = -4.0774227, log N = -0.5 z^2 + 1 - 0.9189385 = -8.2316266;
    # log(1 - tanh(1)^2) = -0.8675616. The row's log-prob is the sum over both dimensions.
    mean, log_std, u = torch.tensor([[0.0, 0.5]]), torch.tensor([[0.0, -1.0]]), torch.tensor([[0.5, -1.0]])
    expected = (-1.0439385 + 0.2402290) + (-8.2316266 + 0.8675617)
    assert squashed_log_prob(mean, log_std, u).item() == pytest.approx(expected, abs=1e-5)
    # torch's own tanh-transformed Normal agrees (its rounding is coarser)
    squashed = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.transforms.TanhTransform()])
    assert squashed_log_prob(mean, log_std, u).item() == pytest.approx(
        squashed.log_prob(torch.tanh(u)).sum().item(), abs=1e-4)


def test_the_squashed_log_prob_stays_finite_where_tanh_rounds_to_one() -> None:
    # tanh(20) is 1.0 in float32: the naive log(1 - tanh(u)^2) is -inf; exactly it is 2 (log 2 - 20 - softplus(-40))
    log_prob = squashed_log_prob(torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), 20.0))
    assert log_prob.item() == pytest.approx(-0.5 * 400 - 0.9189385 - 2 * (math.log(2) - 20), rel=1e-6)


def test_sb3_s_epsilon_caps_the_correction_where_tanh_rounds_to_one() -> None:
    # tanh(20) is 1.0 in float32: log(1 - 1 + 1e-6) = -13.815511; log N(20; 0, 1) = -200 - 0.9189385
    log_prob = squashed_log_prob(torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), 20.0), epsilon=1e-6)
    assert log_prob.item() == pytest.approx(-200.9189385 + 13.815511, rel=1e-6)
    # where 1 - tanh(u)^2 is far above epsilon the two forms agree: u = 0.5, 1 - tanh^2 = 0.7864477
    u = torch.tensor([[0.5]])
    assert squashed_log_prob(torch.zeros(1, 1), torch.zeros(1, 1), u, epsilon=1e-6).item() == pytest.approx(
        squashed_log_prob(torch.zeros(1, 1), torch.zeros(1, 1), u).item(), abs=2e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_an_update_is_sb3_s_sac_train_on_the_same_weights_batches_and_noise(fused: bool, monkeypatch) -> None:
    """SB3's ``SAC.train`` and our update, from the same weights, on the same batches and Gaussian draws, end at the
    same weights; with the exact tanh correction (``log_prob_epsilon=0``) they part."""
    sb3 = pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.type_aliases import ReplayBufferSamples

    steps, rows = 30, 64
    env = gym.wrappers.RescaleAction(gym.make("Pendulum-v1"), np.float32(-1.0), np.float32(1.0))  # SB3's critics
    # see actions scaled into [-1, 1], ours the env's: on a [-1, 1] box the two are the same
    data = torch.Generator().manual_seed(1)
    batches = [TransitionBatch(torch.rand(rows, 3, generator=data) * 2 - 1,
                               torch.rand(rows, 1, generator=data) * 2 - 1, torch.randn(rows, generator=data),
                               torch.rand(rows, 3, generator=data) * 2 - 1,
                               (torch.rand(rows, generator=data) < 0.2).float()) for _ in range(steps)]

    def trained(epsilon: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Our weights and SB3's after ``steps`` updates from SB3's start, ours with ``log_prob_epsilon``."""
        peer = sb3.SAC("MlpPolicy", env, seed=0, batch_size=rows, buffer_size=rows,
                       policy_kwargs={"net_arch": [16, 16]})
        peer.set_logger(configure(None, []))
        with torch.no_grad():  # a wide Gaussian (sigma e^1.5): many draws land where tanh saturates and the forms part
            peer.actor.log_std.bias.fill_(1.5)
        spec = AlgorithmSpec(env.observation_space, env.action_space,
                             ModelConfig(kind="vector_obs", hidden_sizes=(16, 16), activation="relu"))
        ours = build_algorithm(SACConfig(fused=fused, log_prob_epsilon=epsilon, batch_size=rows), spec,
                               torch.Generator().manual_seed(2))
        actor = ours.network
        pairs = [(actor.actor_trunk[0], peer.actor.latent_pi[0]), (actor.actor_trunk[2], peer.actor.latent_pi[2]),
                 (actor.policy_head, peer.actor.mu), (actor.log_std_head, peer.actor.log_std)]
        for critic, peer_critic in ((ours.critic, peer.critic), (ours.critic_target, peer.critic_target)):
            for j, q in enumerate((peer_critic.qf0, peer_critic.qf1)):
                pairs += [(critic.trunks[j][0], q[0]), (critic.trunks[j][2], q[2]), (critic.heads[j], q[4])]
        with torch.no_grad():  # in place: on the fused path the parameters are views of the stacks' storage
            for layer, peer_layer in pairs:
                layer.weight.copy_(peer_layer.weight)
                layer.bias.copy_(peer_layer.bias)

        # our update draws the next states' noise, then the states'; SB3's actor samples the states' first
        replay = torch.Generator().manual_seed(2)  # our generator's draws, in their order
        ours_noise = [torch.randn(rows, 1, generator=replay) for _ in range(2 * steps)]
        peer_noise = [ours_noise[k + 1 - 2 * (k % 2)] for k in range(2 * steps)]
        monkeypatch.setattr(torch.distributions.Normal, "rsample",
                            lambda self, sample_shape=torch.Size(): self.loc + self.scale * peer_noise.pop(0))
        peer_batches = iter(batches)

        def peer_sample(batch_size: int, env: object = None) -> ReplayBufferSamples:
            batch = next(peer_batches)
            return ReplayBufferSamples(batch.observations, batch.actions, batch.next_observations,
                                       batch.dones[:, None], batch.rewards[:, None])

        monkeypatch.setattr(peer.replay_buffer, "sample", peer_sample)
        for batch in batches:
            ours.update(batch)
        peer.train(gradient_steps=steps, batch_size=rows)
        assert peer_noise == []
        ours_weights = [layer.weight.detach().clone() for layer, _ in pairs] + [ours.temperature.log_alpha.detach()]
        return ours_weights, [peer_layer.weight.detach() for _, peer_layer in pairs] + [peer.log_ent_coef.detach()[0]]

    ours_weights, peer_weights = trained(1e-6)
    for ours_weight, peer_weight in zip(ours_weights, peer_weights):
        torch.testing.assert_close(ours_weight, peer_weight, rtol=1e-5, atol=1e-6)
    exact, peer_weights = trained(0.0)
    assert max((a - b).abs().max().item() for a, b in zip(exact, peer_weights)) > 1e-4


def test_acting_samples_what_sample_draws_without_the_log_probability() -> None:
    policy = SquashedGaussianPolicy(ModelConfig(kind="vector_obs", hidden_sizes=(8,)), gym.spaces.Box(-1, 1, (3,)),
                                    gym.spaces.Box(-2.0, 0.5, (2,)))
    observations = torch.randn(5, 3)
    acted = policy.act(observations, deterministic=False, generator=torch.Generator().manual_seed(7))
    sampled, _ = policy.sample(observations, torch.Generator().manual_seed(7))
    assert torch.equal(acted, sampled)
    assert torch.equal(policy.act(observations, deterministic=True), policy.to_env(torch.tanh(policy.gaussian(observations)[0])))


def test_the_temperature_loss_and_its_gradient_by_hand() -> None:
    # log alpha = log 0.5; log pi = (-1, 0.5); target entropy -2: mean(log pi + target) = (-3 - 1.5) / 2 = -2.25,
    # loss = -log(0.5) * -2.25 = -1.5595812; d loss / d log alpha = 2.25 = entropy (0.25) - target (-2) > 0:
    # the entropy is above the target, so a gradient step lowers alpha.
    log_alpha = torch.tensor(math.log(0.5), requires_grad=True)
    loss = temperature_loss(log_alpha, torch.tensor([-1.0, 0.5], requires_grad=True), target_entropy=-2.0)
    assert loss.item() == pytest.approx(-1.5595812, abs=1e-6)
    loss.backward()
    assert log_alpha.grad.item() == pytest.approx(2.25)


def test_the_soft_q_target_by_hand() -> None:
    # row 0: min(1, 2) = 1, minus alpha * log pi = 0.2 * -1 -> 1.2; y = 0.5 + 0.9 * 1.2 = 1.58
    # row 1: terminated, so y = r = 1 (a cut episode is not done: its row bootstraps like row 0)
    next_q = torch.tensor([[1.0, 3.0], [2.0, 0.5]])
    targets = soft_q_target(next_q, torch.tensor([-1.0, 2.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.0, 1.0]),
                            gamma=0.9, alpha=torch.tensor(0.2))
    torch.testing.assert_close(targets, torch.tensor([1.58, 1.0]))


def test_ent_coef_is_auto_auto_with_a_start_or_a_fixed_number() -> None:
    assert temperature("auto") == (1.0, True)
    assert temperature("auto_0.1") == (0.1, True)
    assert temperature("0.2") == (0.2, False)
    for bad in ("automatic", "auto_-1", "0", "nan"):
        with pytest.raises(MazerunError, match=r"^algorithm\.ent_coef="):
            temperature(bad)


def test_a_fixed_ent_coef_stays_fixed_and_auto_moves_towards_the_target_entropy() -> None:
    env = make_env("Pendulum-v1")
    spec = AlgorithmSpec(env.observation_space, env.action_space, ModelConfig(kind="vector_obs", hidden_sizes=(16,)))
    batch = TransitionBatch(torch.randn(32, 3), torch.rand(32, 1) * 4 - 2, torch.randn(32), torch.randn(32, 3),
                            torch.zeros(32))
    fixed = build_algorithm(SACConfig(ent_coef="0.2"), spec, torch.Generator().manual_seed(0))
    learned = build_algorithm(SACConfig(), spec, torch.Generator().manual_seed(0))
    for _ in range(3):
        fixed_metrics, learned_metrics = fixed.update(batch), learned.update(batch)
    assert fixed.temperature.alpha.item() == pytest.approx(0.2) and "temperature_loss" not in fixed_metrics
    # a fresh policy's entropy (about 0.5 nats of tanh(u) in [-1, 1]) lies above the target -1: alpha falls from 1
    assert learned_metrics["entropy"] > -1.0 and learned.temperature.alpha.item() < 1.0


def test_an_action_space_the_policy_cannot_act_in_is_refused_in_one_line() -> None:
    with pytest.raises(MazerunError, match=r"^algorithm=sac acts in 1-D Box .* Box\(-1\.0, 1\.0, \(2, 2\)"):
        SACConfig().check_spaces(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2, 2)))


# ------------------------------------------------------------------------------------------------ the loop


def test_a_cut_episode_keeps_its_final_observation_and_bootstraps(tmp_path: Path) -> None:
    """Episodes of 5 steps, cut by the time limit: each copy's 5th transition ends in the episode's own last
    observation (replayed here from its seed and the stored actions), not the next episode's first."""
    train(tiny_config(total_steps=12, max_episode_steps=5, learning_starts=100), tmp_path / "run")
    buffer = load_checkpoint(tmp_path / "run" / "last.pt").extra["training_state"]["buffer"]
    assert buffer["size"] == 12 and not buffer["dones"].any()  # Pendulum never terminates
    env = make_env("Pendulum-v1", max_episode_steps=5)
    for copy in range(2):  # copy i plays seeds i, i + 2, ...; its rows are i, i + 2, ...
        observation, _ = env.reset(seed=copy)
        for step in range(5):
            row = 2 * step + copy
            torch.testing.assert_close(buffer["observations"][row], torch.as_tensor(observation))
            observation, _, terminated, truncated, _ = env.step(buffer["actions"][row].numpy())
            torch.testing.assert_close(buffer["next_observations"][row], torch.as_tensor(observation))
        assert truncated and not terminated
        torch.testing.assert_close(buffer["observations"][10 + copy], torch.as_tensor(env.reset(seed=copy + 2)[0]))


def metric_rows(run: Path) -> list[dict]:
    """metrics.csv without the wall clock's numbers (steps per second)."""
    return [row for row in read_metrics_csv(run / "metrics.csv") if row["metric"] != "sps"]


def assert_same_run(whole: Path, resumed: Path) -> None:
    first, second = load_checkpoint(whole / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert first.extra["step"] == second.extra["step"]
    for name, value in first.model_state.items():
        assert torch.equal(value, second.model_state[name]), name
    state, other = first.extra["training_state"], second.extra["training_state"]
    for name in ("critic", "critic_target", "temperature"):
        for key, value in state["algorithm"][name].items():
            assert torch.equal(value, other["algorithm"][name][key]), f"{name}.{key}"
    for key, value in state["buffer"].items():
        found = other["buffer"][key]
        assert torch.equal(value, found) if isinstance(value, torch.Tensor) else value == found, key
    assert torch.equal(state["generator"], other["generator"])
    assert metric_rows(resumed) == metric_rows(whole)


def test_a_run_continued_with_a_larger_budget_equals_the_run_that_never_stopped(tmp_path: Path) -> None:
    train(tiny_config(total_steps=72), tmp_path / "whole")
    train(tiny_config(total_steps=24), tmp_path / "first")  # ends inside episodes, buffer partly filled
    train(tiny_config(tmp_path / "first", total_steps=72), tmp_path / "continued")
    assert_same_run(tmp_path / "whole", tmp_path / "continued")


def test_a_run_stopped_between_two_steps_and_continued_equals_the_run_that_never_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop where the loop checks for one (a signal is deferred to there): mid-report-window, mid-episode."""
    train(tiny_config(total_steps=72), tmp_path / "whole")

    class StopAtTheSeventeenthStep:
        calls = 0

        @classmethod
        def check(cls) -> None:
            cls.calls += 1
            if cls.calls == 17:
                raise KeyboardInterrupt

    monkeypatch.setattr(offpolicy, "interrupts", StopAtTheSeventeenthStep)
    with pytest.raises(KeyboardInterrupt, match="at step 32; .*last.pt holds step 32"):
        train(tiny_config(total_steps=72), tmp_path / "stopped")
    monkeypatch.undo()
    train(tiny_config(tmp_path / "stopped", total_steps=72), tmp_path / "continued")
    assert_same_run(tmp_path / "whole", tmp_path / "continued")


def test_a_continued_run_must_step_as_many_env_copies_into_as_large_a_buffer_as_it_saved(tmp_path: Path) -> None:
    train(tiny_config(total_steps=24), tmp_path / "first")
    config = tiny_config(tmp_path / "first", total_steps=48)
    config.runner.n_envs = 4
    with pytest.raises(MazerunError, match=r"^runner\.n_envs=4 differs from the 2 env copies .*; continue with "
                                           r"runner\.n_envs=2$"):
        train(config, tmp_path / "continued")
    config = tiny_config(tmp_path / "first", total_steps=48)
    config.algorithm.buffer_size = 500
    with pytest.raises(MazerunError, match=r"^algorithm\.buffer_size=500 differs from the 1000 of .*; continue with "
                                           r"algorithm\.buffer_size=1000$"):
        train(config, tmp_path / "continued")


# ---------------------------------------------------------------------------------------------- the CLI


def test_run_trains_sac_on_pendulum_and_torch_policy_rolls_it_out(workdir: Path) -> None:
    run_ok(*TINY, cwd=workdir)
    run = newest_run_dir(workdir)
    payload = torch.load(run / "last.pt", weights_only=True)  # the replay buffer and optimisers are plain tensors
    state = payload["extra"]["training_state"]
    assert payload["algorithm"] == "sac" and payload["model_config"]["network"] == "squashed_gaussian"
    assert payload["model_config"]["activation"] == "relu"  # model=auto takes SAC's own, SB3's ReLU
    assert state["buffer"]["size"] == 48 and state["buffer"]["observations"].shape == (48, 3)
    assert {"critic_optimizer", "actor_optimizer", "critic_target", "temperature"} <= set(state["algorithm"])
    rows = read_metrics_csv(run / "metrics.csv")
    assert [row["step"] for row in rows if row["metric"] == "mean_return"] == [0, 24, 48]
    assert {"critic_loss", "actor_loss", "alpha", "entropy", "episode_return"} <= {row["metric"] for row in rows}

    run_ok("policy=torch_policy", f"input_dir={run}", "runner=sequential", "runner.n_episodes=2",
           "runner.max_episode_steps=10", cwd=workdir)
    records = load_records(newest_run_dir(workdir) / "trajectory_data")
    assert [record.policy for record in records] == ["torch_policy:sac"] * 2
    assert all(len(record.actions) == 10 and (abs(record.actions) <= 2).all() for record in records)


def test_run_trains_sac_with_bfloat16_products_past_the_fast_path_s_check(workdir: Path) -> None:
    """``algorithm.matmul_dtype=bfloat16`` through `run`: the check of its float32 twin passes, so the run keeps its
    stacks (no line about autograd), and what it saves stays float32."""
    result = run_ok(*TINY, "algorithm.matmul_dtype=bfloat16", cwd=workdir)
    assert "differs from autograd" not in result.stderr
    payload = torch.load(newest_run_dir(workdir) / "last.pt", weights_only=True)
    assert {value.dtype for value in payload["model_state"].values()} == {torch.float32}


def test_sac_in_a_discrete_env_is_refused_in_one_line(workdir: Path) -> None:
    result = run_cli("algorithm=sac", "env=CartPole-v1", cwd=workdir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "algorithm=sac acts in 1-D Box" in errors[0] and "Discrete(2)" in errors[0]


def test_sac_fine_tunes_a_continuous_clone_from_its_policy_weights(tmp_path: Path) -> None:
    rollout("LunarLanderContinuous-v3", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=2,
                                                                     max_episode_steps=30),
            tmp_path / "records", print_fn=lambda _: None)
    torch.manual_seed(0)
    train(RunConfig(algorithm=BCConfig(n_updates=10, eval_every=10, batch_size=16),
                    runner=RunnerConfig(eval_repeats=1, max_episode_steps=10, dataset=DatasetConfig(
                        dir_or_file=str(tmp_path / "records" / "trajectory_data"))),
                    model={"hidden_sizes": [16, 16]}, device="cpu"), tmp_path / "bc")
    no_update = SACConfig(total_steps=8, learning_starts=100, eval_every=8, buffer_size=100)
    config = RunConfig(algorithm=no_update,
                       runner=RunnerConfig(n_envs=2, max_episode_steps=10, eval_repeats=1),
                       input_dir=str(tmp_path / "bc"), device="cpu")
    train(config, tmp_path / "sac")
    clone, sac = load_checkpoint(tmp_path / "bc" / "best.pt"), load_checkpoint(tmp_path / "sac" / "last.pt")
    copied = [name for name in sac.model_state if name.startswith(("actor_encoder", "actor_trunk", "policy_head"))]
    assert "actor_encoder.obs_mean" in copied and "policy_head.weight" in copied
    for name in copied:
        assert torch.equal(sac.model_state[name], clone.model_state[name]), name
    critic = sac.extra["training_state"]["algorithm"]["critic"]
    assert torch.equal(critic["encoders.0.obs_std"], clone.model_state["actor_encoder.obs_std"])
    assert clone.model_config["activation"] == sac.model_config["activation"] == "tanh"  # the clone's network, kept


def test_dagger_learns_from_a_sac_teacher(tmp_path: Path, workdir: Path) -> None:
    """A trained SAC run labels every state a DAgger learner visits (a continuous teacher, issue 27's imitation)."""
    train(tiny_config(), tmp_path / "sac")
    run_ok("algorithm=dagger", "env=Pendulum-v1", "expert=torch_policy", f"expert.input_dir={tmp_path / 'sac'}",
           "algorithm.total_steps=32", "algorithm.n_steps=8", "algorithm.n_updates=4", "algorithm.eval_every=32",
           "runner.n_envs=2", "runner.max_episode_steps=8", "runner.eval_repeats=1", "model.hidden_sizes=[16,16]",
           "device=cpu", cwd=workdir)
    rows = read_metrics_csv(newest_run_dir(workdir) / "metrics.csv")
    assert {"action_error", "labels"} <= {row["metric"] for row in rows}


@pytest.mark.parametrize(("gradient_steps", "updates"), [(-1, 34), (1, 17), (3, 51)])
def test_gradient_steps_default_to_one_per_transition_whatever_the_env_copies(tmp_path: Path, gradient_steps: int,
                                                                                updates: int) -> None:
    """48 steps over 2 copies, learning from step 16: 17 trainings (steps 16, 18, ..., 48), 2 new transitions each."""
    config = tiny_config()
    config.algorithm.gradient_steps = gradient_steps
    train(config, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "last.pt").extra["training_state"]["algorithm"]["updates"] == updates
