"""IQL and CQL on 1-D Box actions (their continuous variants): the loss terms by hand, exact resume, the commands a
user types (learn from Pendulum records, continue the run, roll it out) and the refusal of other action spaces.

What every algorithm must do on a continuous env (update, checkpoints, exact resume) is also checked by
tests/test_algorithm_protocol.py, which builds ``iql`` and ``cql`` for LunarLanderContinuous.
"""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok

from mazerun.acting.rollout import rollout
from mazerun.algorithms import build_algorithm
from mazerun.algorithms.cql import CQLBoxConfig, CQLConfig
from mazerun.algorithms.cql_continuous import ContinuousConservativeQLearning, conservative_term
from mazerun.algorithms.iql import IQLBoxConfig, IQLConfig, advantage_weights, expectile_loss
from mazerun.algorithms.iql_continuous import ContinuousImplicitQLearning
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.config.schemas import DatasetConfig, PolicyConfig, RunConfig, RunnerConfig
from mazerun.core.errors import MazerunError
from mazerun.data.records import load_records
from mazerun.data.tensors import TransitionBatch
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.nn.models import ModelConfig
from mazerun.training.metrics import read_metrics_csv
from mazerun.training.train import train

PENDULUM = AlgorithmSpec(gym.spaces.Box(-8.0, 8.0, (3,)), gym.spaces.Box(-2.0, 2.0, (1,)),
                         ModelConfig(kind="vector_obs", hidden_sizes=(16, 16)))
"""Pendulum-v1's spaces: actions are torques in [-2, 2]."""
CONFIGS = {"iql": IQLConfig, "cql": CQLConfig}
TRAINED = {"iql": ("critic", "critic_target", "value_network", "optimizer"),
           "cql": ("critic", "critic_target", "temperature", "critic_optimizer", "actor_optimizer")}
"""What each Box variant keeps besides its policy: every one must come back for an exact resume."""


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two episodes of random torques on Pendulum-v1, cut at 30 steps."""
    root = tmp_path_factory.mktemp("records")
    rollout("Pendulum-v1", PolicyConfig(name="random"), RunnerConfig(type="sequential", n_episodes=2,
                                                                      max_episode_steps=30),
            root, print_fn=lambda _: None)
    return root / "trajectory_data"


def random_batch(rows: int = 8) -> TransitionBatch:
    generator = torch.Generator().manual_seed(0)
    return TransitionBatch(torch.randn(rows, 3, generator=generator), 4 * torch.rand(rows, 1, generator=generator) - 2,
                           torch.randn(rows, generator=generator), torch.randn(rows, 3, generator=generator),
                           torch.zeros(rows), None)


# -------------------------------------------------------------------------------------------- IQL's losses


def test_the_expectile_loss_and_the_advantage_weights_by_hand() -> None:
    # u = (2, -1, 0.5, -3), expectile 0.7: weights (0.7, 0.3, 0.7, 0.3) on u^2 = (4, 1, 0.25, 9):
    # (2.8 + 0.3 + 0.175 + 2.7) / 4 = 1.49375
    assert expectile_loss(torch.tensor([2.0, -1.0, 0.5, -3.0]), 0.7).item() == pytest.approx(1.49375)
    # beta 3, A = (0, 0.5, -1, 2): exp(0) = 1, exp(1.5) = 4.4817, exp(-3) = 0.049787, exp(6) = 403.4 capped at 100
    weights = advantage_weights(torch.tensor([0.0, 0.5, -1.0, 2.0]), beta=3.0, max_weight=100.0)
    torch.testing.assert_close(weights, torch.tensor([1.0, 4.481689, 0.049787, 100.0]))


def test_the_box_iql_losses_are_the_formulas_of_its_docstring() -> None:
    """The metrics of one loss evaluation, recomputed from the networks' outputs: min over the target critics, V's
    expectile, both critics' TD errors to r + gamma V(s'), and the policy's Gaussian log-density of the data's
    actions weighted by exp(beta * A) with the Box variant's beta."""
    config = IQLConfig(expectile=0.8, box=IQLBoxConfig(beta=2.0))
    algorithm = build_algorithm(config, PENDULUM)
    assert isinstance(algorithm, ContinuousImplicitQLearning)
    batch = random_batch()
    with torch.no_grad():
        for parameter in algorithm.critic.parameters():  # the targets now differ from the critics
            parameter.add_(0.1)
        _, metrics = algorithm.losses(batch)
        advantages = algorithm.critic_target(batch.observations, batch.actions).min(dim=0).values - \
            algorithm.value_network(batch.observations)
        targets = batch.rewards + 0.99 * algorithm.value_network(batch.next_observations)
        td = sum(((q - targets) ** 2).mean() for q in algorithm.critic(batch.observations, batch.actions))
        mean = -2.0 + 2.0 * (torch.tanh(algorithm.network.policy_head(algorithm.network.features(
            batch.observations))) + 1.0)
        log_density = torch.distributions.Normal(mean, algorithm.network.log_std.exp()).log_prob(batch.actions).sum(-1)
        policy_loss = -(torch.exp(2.0 * advantages).clamp(max=100.0) * log_density).mean()
    torch.testing.assert_close(metrics["expectile_loss"], expectile_loss(advantages, 0.8))
    torch.testing.assert_close(metrics["td_loss"], td)
    torch.testing.assert_close(metrics["policy_loss"], policy_loss)


def test_the_box_iql_policy_starts_at_its_configured_log_std_and_refuses_one_outside_the_sigmoid_s_range() -> None:
    policy = build_algorithm(IQLConfig(), PENDULUM).network
    assert torch.equal(policy.log_std_logit.detach(), torch.tensor([0.0]))  # sigmoid 1/2: -5 + 7 / 2 = -1.5
    assert torch.equal(policy.log_std.detach(), torch.tensor([-1.5]))
    torch.testing.assert_close(build_algorithm(IQLConfig(box=IQLBoxConfig(log_std_init=0.0)), PENDULUM)
                               .network.log_std.detach(), torch.tensor([0.0]))
    for outside in (2.0, -5.0, 3.0):
        with pytest.raises(MazerunError, match=rf"^algorithm.box.log_std_init={outside} must lie strictly inside "
                                               r"\(-5, 2\)"):
            IQLConfig(box=IQLBoxConfig(log_std_init=outside)).check()


def test_the_box_iql_log_std_moves_through_a_sigmoid_into_minus_5_to_2() -> None:
    policy = build_algorithm(IQLConfig(), PENDULUM).network
    with torch.no_grad():
        policy.log_std_logit.fill_(math.log(3.0))  # sigmoid 3/4: -5 + 7 * 3/4 = 0.25
    torch.testing.assert_close(policy.log_std.detach(), torch.tensor([0.25]))
    policy.log_std.sum().backward()  # d log_std / d logit = 7 * 3/4 * 1/4
    torch.testing.assert_close(policy.log_std_logit.grad, torch.tensor([21.0 / 16.0]))
    with torch.no_grad():
        policy.log_std_logit.fill_(-100.0)
    assert policy.log_std.item() == -5.0


def test_a_box_iql_checkpoint_from_before_the_sigmoid_loads_its_log_std() -> None:
    policy = build_algorithm(IQLConfig(), PENDULUM).network
    legacy = {name: value for name, value in policy.state_dict().items() if name != "log_std_logit"}
    policy.load_state_dict({**legacy, "log_std": torch.tensor([-0.5])})
    torch.testing.assert_close(policy.log_std.detach(), torch.tensor([-0.5]))
    policy.load_state_dict({**legacy, "log_std": torch.tensor([-9.0])})  # below the range: its floor, just inside
    assert -5.0 < policy.log_std.item() < -4.99


# --------------------------------------------------------------------------------------------- CQL's term


def test_the_conservative_term_by_hand() -> None:
    # One state, three sampled actions with log-densities (1, 2, 0.5 - ln 2) and a data action.
    # Critic 1: Q = (1, 2, 0.5), so Q - log q = (0, 0, ln 2): logsumexp = ln(1 + 1 + 2) = ln 4; Q(s, a_data) = 1:
    #   ln 4 - 1 = 0.386294
    # Critic 2: Q = (2, 1, 0.5): Q - log q = (1, -1, ln 2): ln(e + 1/e + 2) = 1.626523; Q(s, a_data) = 0: 1.626523
    # The term sums the critics: 2.012818. Its gradient in critic 2's sampled Q is softmax(1, -1, ln 2) =
    # (e, 1/e, 2) / (e + 1/e + 2) = (0.534447, 0.072329, 0.393224), and -1 in each Q(s, a_data).
    sampled_q = torch.tensor([[[1.0, 2.0, 0.5]], [[2.0, 1.0, 0.5]]], requires_grad=True)
    data_q = torch.tensor([[1.0], [0.0]], requires_grad=True)
    log_densities = torch.tensor([[1.0, 2.0, 0.5 - math.log(2.0)]])
    term = conservative_term(sampled_q, log_densities, data_q)
    assert term.item() == pytest.approx(2.012818, abs=1e-6)
    term.backward()
    torch.testing.assert_close(sampled_q.grad[1, 0], torch.tensor([0.534447, 0.072329, 0.393224]))
    torch.testing.assert_close(data_q.grad, torch.full((2, 1), -1.0))


@pytest.mark.parametrize("threshold, moves", [(1e6, -0.1), (-1e6, 0.1)], ids=["gap-below", "gap-above"])
def test_the_conservative_multiplier_steps_against_the_gap_to_its_threshold(threshold: float, moves: float) -> None:
    """d3rlpy's Lagrangian CQL: L_lambda = -lambda * alpha_cql * (gap - threshold). Its gradient in log lambda is
    -lambda * alpha_cql * (gap - threshold), and Adam's first step moves log lambda by its learning rate against
    that gradient's sign: down by 0.1 where the gap lies below the threshold, up where above. The critics' loss
    of that update read lambda = 1, so it is the fixed-weight loss; the next one reads exp(-+0.1)."""
    box = CQLBoxConfig(multiplier_lr=0.1, gap_threshold=threshold)
    algorithm = build_algorithm(CQLConfig(box=box, fused=False), PENDULUM, torch.Generator().manual_seed(0))
    loss, metrics = algorithm.losses(random_batch())
    expected_loss = metrics["td_loss"] + 5.0 * metrics["conservative_loss"]
    torch.testing.assert_close(loss.detach(), expected_loss)
    assert metrics["conservative_gap"] == pytest.approx(metrics["conservative_loss"].item() / 2)
    algorithm.update(random_batch())
    assert algorithm.multiplier.log_alpha.item() == pytest.approx(moves, abs=1e-6)
    _, metrics = algorithm.losses(random_batch())
    assert metrics["multiplier"].item() == pytest.approx(math.exp(moves), rel=1e-6)


def test_without_its_learning_rate_the_conservative_multiplier_holds_at_one() -> None:
    algorithm = build_algorithm(CQLConfig(box=CQLBoxConfig(multiplier_lr=0.0)), PENDULUM, torch.Generator().manual_seed(0))
    for _ in range(3):
        algorithm.update(random_batch())
    assert algorithm.multiplier.log_alpha.item() == 0.0


def test_the_proposals_lie_in_the_box_with_the_uniform_density_of_the_unit_box() -> None:
    """N uniform actions, then N of the policy at s and N at s', per state: all in Pendulum's [-2, 2]; the
    uniform's log-density is that of [-1, 1] (where the policy's log-probabilities are measured), ln(1/2)."""
    algorithm = build_algorithm(CQLConfig(), PENDULUM, torch.Generator().manual_seed(0))
    assert isinstance(algorithm, ContinuousConservativeQLearning)
    actions, log_densities = algorithm.proposals(random_batch(), n=10)
    assert actions.shape == (30, 8, 1) and log_densities.shape == (30, 8)
    assert (actions.abs() <= 2.0).all() and actions[:10].abs().max() > 1.0  # the uniform ones span the env's box
    torch.testing.assert_close(log_densities[:10], torch.full((10, 8), -math.log(2.0)))


# ------------------------------------------------------------------------------------------------ resume


def tiny_config(name: str, records: Path, n_updates: int, input_dir: Path | None = None) -> RunConfig:
    """The in-process equivalent of `run -cn conf_train algorithm=<name>` with a budget of seconds."""
    return RunConfig(
        algorithm=CONFIGS[name](n_updates=n_updates, eval_every=1, batch_size=16),
        runner=RunnerConfig(eval_repeats=1, max_episode_steps=10, dataset=DatasetConfig(dir_or_file=str(records))),
        input_dir=None if input_dir is None else str(input_dir), model={"hidden_sizes": [16, 16]}, device="cpu",
    )


@pytest.mark.parametrize("name", ["iql", "cql"])
def test_a_run_stopped_part_way_and_continued_equals_the_run_that_never_stopped(
    name: str, records: Path, tmp_path: Path
) -> None:
    train(tiny_config(name, records, 5), tmp_path / "whole")
    train(tiny_config(name, records, 2), tmp_path / "first")
    train(tiny_config(name, records, 5, tmp_path / "first"), tmp_path / "continued")
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    continued = load_checkpoint(tmp_path / "continued" / "last.pt")
    for key, value in whole.model_state.items():
        assert torch.equal(value, continued.model_state[key]), key
    state, other = whole.extra["training_state"], continued.extra["training_state"]
    for part in TRAINED[name]:
        assert_equal_states(state["algorithm"][part], other["algorithm"][part], part)
    assert torch.equal(state["sampler"], other["sampler"])  # it draws the batches and every sampled action
    assert read_metrics_csv(tmp_path / "continued" / "metrics.csv") == read_metrics_csv(
        tmp_path / "whole" / "metrics.csv")


def assert_equal_states(ours: object, theirs: object, where: str) -> None:
    """Two state dicts (an optimiser's nests lists and numbers) equal to the bit."""
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key, value in ours.items():
            assert_equal_states(value, theirs[key], f"{where}.{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for index, (value, other) in enumerate(zip(ours, theirs)):
            assert_equal_states(value, other, f"{where}[{index}]")
    elif isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs), where
    else:
        assert ours == theirs, where


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(("name", "network", "losses"), [
    ("iql", "tanh_mean_gaussian", {"td_loss", "expectile_loss", "policy_loss", "mean_weight"}),
    ("cql", "squashed_gaussian", {"td_loss", "conservative_loss", "actor_loss", "alpha"}),
])
def test_run_learns_from_pendulum_records_continues_and_rolls_out(
    name: str, network: str, losses: set[str], records: Path, workdir: Path
) -> None:
    tiny = ("algorithm.eval_every=2", "algorithm.batch_size=16", "runner.eval_repeats=1", "runner.max_episode_steps=10",
            "device=cpu")
    run_ok("-cn", "conf_train", f"algorithm={name}", f"runner.dataset.dir_or_file={records}", "algorithm.n_updates=2",
           "model.hidden_sizes=[16,16]", *tiny, cwd=workdir)
    first = newest_run_dir(workdir)
    payload = torch.load(first / "last.pt", weights_only=True)
    assert payload["algorithm"] == name and payload["model_config"]["network"] == network
    assert payload["model_config"]["activation"] == "relu"  # model=auto: d3rlpy's and CORL's networks

    run_ok("-cn", "conf_train", f"algorithm={name}", f"input_dir={first}", "algorithm.n_updates=4", *tiny,
           cwd=workdir)
    continued = newest_run_dir(workdir)
    metrics = read_metrics_csv(continued / "metrics.csv")
    assert losses | {"mean_return"} <= {row["metric"] for row in metrics}
    assert max(int(row["step"]) for row in metrics) == 4

    run_ok("policy=torch_policy", f"input_dir={continued}", "runner=sequential", "runner.n_episodes=1",
           "runner.max_episode_steps=10", cwd=workdir)
    (record,) = load_records(newest_run_dir(workdir) / "trajectory_data")
    assert record.policy == f"torch_policy:{name}" and (abs(record.actions) <= 2).all()


@pytest.mark.parametrize("name", ["td3_bc", "iql", "cql"])
def test_run_learns_with_bfloat16_products_past_the_fast_path_s_check(name: str, records: Path, workdir: Path) -> None:
    result = run_ok("-cn", "conf_train", f"algorithm={name}", f"runner.dataset.dir_or_file={records}",
                    "algorithm.n_updates=4", "algorithm.eval_every=4", "algorithm.batch_size=16",
                    "algorithm.matmul_dtype=bfloat16", "runner.eval_repeats=1", "runner.max_episode_steps=10",
                    "model.hidden_sizes=[16,16]", "device=cpu", cwd=workdir)
    assert "differs from autograd" not in result.stderr
    payload = torch.load(newest_run_dir(workdir) / "last.pt", weights_only=True)
    assert {value.dtype for value in payload["model_state"].values()} == {torch.float32}


@pytest.mark.parametrize("name", ["iql", "cql"])
def test_a_box_of_several_dimensions_is_refused_in_one_line(name: str) -> None:
    with pytest.raises(MazerunError) as error:
        CONFIGS[name]().check_spaces(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2, 2)))
    assert str(error.value).startswith(f"algorithm={name} learns Q-values of Discrete or 1-D Box actions")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["iql", "cql"])
def test_memory_on_box_actions_is_refused_in_one_line(name: str, records: Path, workdir: Path) -> None:
    result = run_cli("-cn", "conf_train", f"algorithm={name}", f"runner.dataset.dir_or_file={records}",
                     "model.memory=gru", "device=cpu", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "have no memory; use model.memory=none" in errors[0]


@pytest.mark.parametrize("name", ["iql", "cql"])
def test_an_evolution_search_on_box_actions_is_refused_in_one_line(name: str, records: Path, workdir: Path) -> None:
    result = run_cli("-cn", "conf_train", f"algorithm={name}", "hpo=evolution", f"runner.dataset.dir_or_file={records}",
                     "device=cpu", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hpo=evolution searches learners of Discrete actions" in errors[0]
    assert not list(workdir.rglob("*.pt"))


def test_sac_goes_on_online_from_a_box_cql_run(records: Path, workdir: Path) -> None:
    """CQL's Box policy is SAC's network: SAC fine-tunes it with every weight it has."""
    run_ok("-cn", "conf_train", "algorithm=cql", f"runner.dataset.dir_or_file={records}", "algorithm.n_updates=2",
           "algorithm.eval_every=2", "algorithm.batch_size=16", "runner.eval_repeats=1", "runner.max_episode_steps=10",
           "model.hidden_sizes=[16,16]", "device=cpu", cwd=workdir)
    cql_run = newest_run_dir(workdir)
    result = run_ok("algorithm=sac", f"input_dir={cql_run}", "algorithm.total_steps=8", "algorithm.learning_starts=100",
                    "algorithm.eval_every=8", "algorithm.buffer_size=100", "runner.n_envs=2", "runner.eval_repeats=1",
                    "runner.max_episode_steps=10", "device=cpu", cwd=workdir)
    assert "fine-tuning the cql policy" in result.stderr
    sac = load_checkpoint(newest_run_dir(workdir) / "last.pt").model_state
    policy = load_checkpoint(cql_run / "best.pt").model_state
    assert sac.keys() == policy.keys() and all(torch.equal(sac[name], value) for name, value in policy.items())
