"""Pipelines through `run`: stages in order, one counter, resume at the interrupted stage; PPO's imitation term."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok, spawn_cli, svg_polylines, synthetic_batch

from mazerun.algorithms.ppo import PPO, PPOConfig
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.data.tensors import TransitionBatch
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.nn.models import ModelConfig
from mazerun.training.metrics import read_metrics_csv

SMALL = ["runner.max_episode_steps=60", "runner.n_envs=2", "runner.eval_repeats=2", "model.hidden_sizes=[16,16]"]
PPO_STAGE = ["pipeline.stages.ppo.n_steps=32", "pipeline.stages.ppo.batch_size=32", "pipeline.stages.ppo.eval_every=64",
             "pipeline.stages.ppo.critic_burn_in_epochs=1"]
BC_PPO = ["pipeline=bc_ppo", "pipeline.stages.record.n_episodes=3", "pipeline.stages.bc.n_updates=20",
          "pipeline.stages.bc.eval_every=10", *PPO_STAGE, *SMALL]


def manifest(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "pipeline.json").read_text())["stages"]


def test_bc_ppo_records_clones_and_fine_tunes_in_one_run(workdir: Path) -> None:
    run_ok(*BC_PPO, "pipeline.stages.ppo.total_steps=128", cwd=workdir)
    run_dir = newest_run_dir(workdir)
    stages = manifest(run_dir)
    assert [(stage["name"], stage["finished"]) for stage in stages] == [("record", True), ("bc", True), ("ppo", True)]
    assert [Path(stage["dir"]) for stage in stages] == [run_dir / "record", run_dir / "bc", run_dir / "ppo"]
    # bc learnt from the record stage's episodes, ppo started from bc's policy
    assert load_checkpoint(run_dir / "bc").extra["dataset"] == [str(run_dir / "record" / "trajectory_data")]
    # one counter: bc's 20 updates, then ppo's 128 env steps
    bc_steps = {row["step"] for row in read_metrics_csv(run_dir / "bc" / "metrics.csv")}
    ppo_evals = [row["step"] for row in read_metrics_csv(run_dir / "ppo" / "metrics.csv") if row["metric"] == "mean_return"]
    assert max(bc_steps) == 20 and ppo_evals == [20, 84, 148]
    assert [stage["global_step"] for stage in stages] == [0, 20, 148]
    bc_evals = [row["step"] for row in read_metrics_csv(run_dir / "bc" / "metrics.csv") if row["metric"] == "mean_return"]
    # one line per training stage, a point per evaluation
    assert [len(line) for line in svg_polylines(run_dir / "learning_curve.svg")] == [len(bc_evals), len(ppo_evals)]
    # the pipeline run rolls out like any trained run: its last stage's best policy
    watch = run_ok("policy=torch_policy", f"input_dir={run_dir}", "runner.n_episodes=1", "runner.max_episode_steps=20",
                   cwd=workdir)
    assert "torch_policy:ppo" in (newest_run_dir(workdir) / "rollout_stats.json").read_text(), watch.stderr


def test_dagger_ppo_on_babyai(workdir: Path) -> None:
    run_ok("pipeline=dagger_ppo", "env=BabyAI-GoToLocal-v0", "pipeline.stages.dagger.total_steps=64",
           "pipeline.stages.dagger.n_steps=16", "pipeline.stages.dagger.n_updates=5",
           "pipeline.stages.dagger.refit_updates=3",
           "pipeline.stages.dagger.eval_every=64", "pipeline.stages.ppo.total_steps=64", *PPO_STAGE,
           "runner.n_envs=2", "runner.eval_repeats=2", cwd=workdir)
    run_dir = newest_run_dir(workdir)
    assert [stage["name"] for stage in manifest(run_dir)] == ["dagger", "ppo"]
    assert load_checkpoint(run_dir).algorithm == "ppo" and load_checkpoint(run_dir).env_id == "BabyAI-GoToLocal-v0"
    assert list((run_dir / "dagger" / "trajectory_data").glob("episode_*.pkl"))


def test_ctrl_c_in_a_stage_then_input_dir_continues_at_that_stage(workdir: Path) -> None:
    with spawn_cli(*BC_PPO, "pipeline.stages.ppo.total_steps=1000000", "hydra.run.dir=first", cwd=workdir) as process:
        deadline = time.monotonic() + 120
        last = workdir / "first" / "ppo" / "last.pt"
        while time.monotonic() < deadline and not last.exists():
            time.sleep(0.1)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "stage ppo" in stderr and f"continue with input_dir={workdir / 'first'}" in stderr
    assert "Traceback" not in stderr
    reached = load_checkpoint(last).extra["step"]
    assert [stage["finished"] for stage in manifest(workdir / "first")] == [True, True, False]

    result = run_ok(*BC_PPO, f"pipeline.stages.ppo.total_steps={reached + 64}", "input_dir=first",
                    "hydra.run.dir=second", cwd=workdir)
    assert "stage record: finished in" in result.stderr and "stage bc: finished in" in result.stderr
    assert f"at step {reached}" in result.stderr  # the ppo stage continues from its last.pt
    stages = manifest(workdir / "second")
    assert [Path(stage["dir"]) for stage in stages] == [workdir / "first" / "record", workdir / "first" / "bc",
                                                        workdir / "second" / "ppo"]
    assert all(stage["finished"] for stage in stages) and stages[2]["step"] == reached + 64

    # a finished pipeline says how to extend it, and writes nothing
    again = run_cli(*BC_PPO, f"pipeline.stages.ppo.total_steps={reached + 64}", "input_dir=second",
                    "hydra.run.dir=third", cwd=workdir)
    assert again.returncode == 2
    assert "finished all its stages" in again.stderr and "pipeline.stages.ppo.total_steps" in again.stderr
    assert not (workdir / "third" / "pipeline.json").exists() and not (workdir / "third" / "ppo").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["pipeline=nope"], "unknown pipeline 'nope'; choose one of: bc_ppo, dagger_ppo"),
    (["pipeline=bc_ppo", "pipeline.stages.cql.n_updates=5"], "unknown key pipeline.stages.cql"),
    (["pipeline=bc_ppo", "pipeline.stages.bc.n_update=5"], "did you mean n_updates"),
    (["pipeline=bc_ppo", "pipeline.stages.ppo.clip_schedule=cosine"], "pipeline.stages.ppo.clip_schedule='cosine'"),
    (["pipeline=bc_ppo", "algorithm=bc"], "choose either algorithm=<name> or pipeline=<name>"),
])
def test_bad_pipeline_input_is_one_line(workdir: Path, overrides: list[str], message: str) -> None:
    result = run_cli(*overrides, cwd=workdir)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not list(workdir.glob("outputs/*/*/pipeline.json"))


# -------------------------------------------------------------------------------- imitation in PPO


def _demonstrations() -> TransitionBatch:
    generator = torch.Generator().manual_seed(2)
    actions = torch.randint(0, 4, (32,), generator=generator)
    return TransitionBatch(torch.randn(32, 8, generator=generator), actions, None, None, None)


def _updated(coef: float, demonstrations: bool) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    torch.manual_seed(0)
    spec = AlgorithmSpec(gym.spaces.Box(-1, 1, (8,)), gym.spaces.Discrete(4),
                         ModelConfig(kind="vector_obs", hidden_sizes=(16,)))
    ppo = PPO(PPOConfig(batch_size=16, n_epochs=2, imitation_coef=coef), spec, torch.Generator().manual_seed(3))
    ppo.demonstrations = _demonstrations if demonstrations else None
    metrics = ppo.update(synthetic_batch(ppo.network))
    return ppo.network.state_dict(), metrics


def test_the_imitation_term_is_nothing_at_coefficient_zero_and_moves_the_policy_otherwise() -> None:
    plain, plain_metrics = _updated(0.0, demonstrations=False)
    zero, zero_metrics = _updated(0.0, demonstrations=True)
    imitating, imitating_metrics = _updated(1.0, demonstrations=True)
    assert all(torch.equal(plain[name], zero[name]) for name in plain)
    assert "imitation_loss" not in zero_metrics and zero_metrics == plain_metrics
    assert not torch.equal(plain["policy_head.weight"], imitating["policy_head.weight"])
    assert imitating_metrics["imitation_loss"] > 0


def test_clip_range_and_imitation_coefficient_decay_linearly() -> None:
    spec = AlgorithmSpec(gym.spaces.Box(-1, 1, (8,)), gym.spaces.Discrete(4),
                         ModelConfig(kind="vector_obs", hidden_sizes=(4,)))
    ppo = PPO(PPOConfig(total_steps=1000, clip_range=0.2, clip_schedule="linear", imitation_coef=0.5,
                        imitation_schedule="linear"), spec)
    values = ppo.set_progress(250)
    assert values["clip_range"] == pytest.approx(0.15) and values["imitation_coef"] == pytest.approx(0.375)
    assert values["learning_rate"] == pytest.approx(3e-4)  # constant unless asked
    assert ppo.clip_range == pytest.approx(0.15)


def test_ppo_with_an_imitation_loss_on_recorded_demonstrations(workdir: Path) -> None:
    run_ok("runner.n_episodes=2", "runner.max_episode_steps=60", "hydra.run.dir=demos", cwd=workdir)
    common = ["algorithm=ppo", "algorithm.total_steps=64", "algorithm.n_steps=32", "algorithm.batch_size=32",
              "algorithm.eval_every=64", *SMALL]
    run_ok(*common, "algorithm.imitation_coef=0.1", "runner.dataset.dir_or_file=demos/trajectory_data", cwd=workdir)
    logged = {row["metric"] for row in read_metrics_csv(newest_run_dir(workdir) / "metrics.csv")}
    assert {"imitation_loss", "imitation_coef", "clip_range"} <= logged

    missing = run_cli(*common, "algorithm.imitation_coef=0.1", cwd=workdir)
    assert missing.returncode == 2
    assert "algorithm.imitation_coef=0.1 needs recorded demonstrations" in missing.stderr and "runner.dataset.dir_or_file" in missing.stderr

    # fine-tuning a clone: the imitation term reads the demonstrations the clone was trained on
    run_ok("-cn", "conf_train", "runner.dataset.dir_or_file=demos/trajectory_data", "algorithm.n_updates=4",
           "algorithm.eval_every=4", "algorithm.validation_percentage=0", *SMALL, "hydra.run.dir=clone", cwd=workdir)
    result = run_ok(*common, "algorithm.imitation_coef=0.1", "input_dir=clone", cwd=workdir)
    assert "algorithm reads the data" in result.stderr and "demos/trajectory_data" in result.stderr
    logged = {row["metric"] for row in read_metrics_csv(newest_run_dir(workdir) / "metrics.csv")}
    assert "imitation_loss" in logged
