"""TD3+BC: its normalised Q term and target smoothing by hand, exact resume, and the commands a user types (learn
from continuous records, roll the run out, hand it to SAC to go on online, be refused on CartPole)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok

from mazerun.acting.rollout import rollout
from mazerun.algorithms.td3_bc import TD3BCConfig, normalized_q_term, smoothed_target_actions
from mazerun.config.schemas import DatasetConfig, PolicyConfig, RunConfig, RunnerConfig
from mazerun.data.records import load_records
from mazerun.fast.fused import native_low_precision
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.training.metrics import read_metrics_csv
from mazerun.training.train import train


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three heuristic episodes of LunarLanderContinuous-v3 (Box actions), cut at 40 steps."""
    root = tmp_path_factory.mktemp("records")
    rollout("LunarLanderContinuous-v3", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=3,
                                                                     max_episode_steps=40),
            root, print_fn=lambda _: None)
    return root / "trajectory_data"


def tiny_config(records: Path, input_dir: Path | None = None, n_updates: int = 6) -> RunConfig:
    """The in-process equivalent of `run -cn conf_train algorithm=td3_bc` with a budget of seconds."""
    return RunConfig(
        algorithm=TD3BCConfig(n_updates=n_updates, eval_every=1, batch_size=16),
        runner=RunnerConfig(eval_repeats=1, max_episode_steps=10, dataset=DatasetConfig(dir_or_file=str(records))),
        input_dir=None if input_dir is None else str(input_dir), model={"hidden_sizes": [16, 16]}, device="cpu",
    )


# ------------------------------------------------------------------------------------------------- losses


def test_the_normalised_q_term_by_hand() -> None:
    # E|Q| = (1 + 3 + 4) / 3 = 8/3, lambda = 2.5 / (8/3) = 0.9375, E[Q] = 2/3: the term is -0.9375 * 2/3 = -0.625;
    # lambda is held fixed, so each Q-value's gradient is -lambda / 3 = -0.3125
    q_values = torch.tensor([1.0, -3.0, 4.0], requires_grad=True)
    term = normalized_q_term(q_values, alpha=2.5)
    assert term.item() == pytest.approx(-0.625)
    term.backward()
    torch.testing.assert_close(q_values.grad, torch.full((3,), -0.3125))


def test_the_target_actions_are_smoothed_by_clipped_noise_and_kept_in_the_unit_box() -> None:
    # sigma * eps = (0.2, -1, 0.4), clipped to +-0.5: (0.2, -0.5, 0.4); added: (1.1, -0.7, 0.4), clipped: (1, -0.7, 0.4)
    smoothed = smoothed_target_actions(torch.tensor([0.9, -0.2, 0.0]), torch.tensor([1.0, -5.0, 2.0]),
                                       policy_noise=0.2, noise_clip=0.5)
    torch.testing.assert_close(smoothed, torch.tensor([1.0, -0.7, 0.4]))


# ------------------------------------------------------------------------------------------------ resume


def test_a_run_stopped_between_the_actor_steps_and_continued_equals_the_run_that_never_stopped(
    records: Path, tmp_path: Path
) -> None:
    """3 updates, then 3 more: the continued run's first update is a critic-only one, as the whole run's 4th."""
    train(tiny_config(records, n_updates=6), tmp_path / "whole")
    train(tiny_config(records, n_updates=3), tmp_path / "first")
    train(tiny_config(records, tmp_path / "first", n_updates=6), tmp_path / "continued")
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    continued = load_checkpoint(tmp_path / "continued" / "last.pt")
    for name, value in whole.model_state.items():
        assert torch.equal(value, continued.model_state[name]), name
    state, other = whole.extra["training_state"], continued.extra["training_state"]
    for network in ("actor_target", "critic", "critic_target"):
        for key, value in state["algorithm"][network].items():
            assert torch.equal(value, other["algorithm"][network][key]), f"{network}.{key}"
    assert torch.equal(state["sampler"], other["sampler"])  # it draws the batches and the smoothing noise
    assert read_metrics_csv(tmp_path / "continued" / "metrics.csv") == read_metrics_csv(
        tmp_path / "whole" / "metrics.csv")


# ---------------------------------------------------------------------------------------------- the CLI


def test_run_learns_from_continuous_records_and_sac_goes_on_online_from_it(records: Path, workdir: Path) -> None:
    run_ok("-cn", "conf_train", "algorithm=td3_bc", f"runner.dataset.dir_or_file={records}", "algorithm.n_updates=4",
           "algorithm.eval_every=2", "algorithm.batch_size=16", "runner.eval_repeats=1", "runner.max_episode_steps=10",
           "model.hidden_sizes=[16,16]", "device=cpu", cwd=workdir)
    run = newest_run_dir(workdir)
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["algorithm"] == "td3_bc" and payload["model_config"]["network"] == "tanh_deterministic"
    metrics = {row["metric"] for row in read_metrics_csv(run / "metrics.csv")}
    assert {"critic_loss", "q_term", "cloning_loss", "mean_return"} <= metrics

    run_ok("policy=torch_policy", f"input_dir={run}", "runner=sequential", "runner.n_episodes=1",
           "runner.max_episode_steps=10", cwd=workdir)
    (record,) = load_records(newest_run_dir(workdir) / "trajectory_data")
    assert record.policy == "torch_policy:td3_bc" and (abs(record.actions) <= 1).all()

    result = run_ok("algorithm=sac", f"input_dir={run}", "algorithm.total_steps=8", "algorithm.learning_starts=100",
                    "algorithm.eval_every=8", "algorithm.buffer_size=100", "runner.n_envs=2", "runner.eval_repeats=1",
                    "runner.max_episode_steps=10", "device=cpu", cwd=workdir)
    assert "fine-tuning the td3_bc policy" in result.stderr
    sac = load_checkpoint(newest_run_dir(workdir) / "last.pt").model_state
    clone = load_checkpoint(run / "best.pt").model_state
    assert all(torch.equal(sac[name], value) for name, value in clone.items())  # every weight it has, SAC's too


def test_run_log_says_what_auto_products_ran_in_on_this_cpu(records: Path, workdir: Path) -> None:
    """The default matmul_dtype=auto is bfloat16 where this CPU multiplies it natively, else float32."""
    result = run_ok("-cn", "conf_train", "algorithm=td3_bc", f"runner.dataset.dir_or_file={records}",
                    "algorithm.n_updates=2", "algorithm.eval_every=2", "algorithm.batch_size=16",
                    "runner.eval_repeats=1", "runner.max_episode_steps=10", "model.hidden_sizes=[16,16]", "device=cpu",
                    cwd=workdir)
    expected = "bfloat16" if native_low_precision(torch.bfloat16, torch.device("cpu")) else "float32"
    assert f"algorithm.matmul_dtype=auto: {expected}" in (newest_run_dir(workdir) / "run.log").read_text()
    assert "differs from autograd" not in result.stderr


def test_td3_bc_in_a_discrete_env_is_refused_in_one_line(workdir: Path) -> None:
    result = run_cli("-cn", "conf_train", "algorithm=td3_bc", "env=CartPole-v1", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "algorithm=td3_bc acts in 1-D Box" in errors[0]
