"""Behavioural cloning from records, rollouts of the clone, metrics and checkpoints, through `run`."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok, save_network, spawn_cli

from mazerun.acting.policies.torch_policy import TorchPolicy
from mazerun.acting.rollout import rollout
from mazerun.algorithms.bc import BCConfig, BehaviouralCloning
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.data.records import EpisodeBuilder, load_records, write_record
from mazerun.data.tensors import BatchSampler, records_to_dataset
from mazerun.nn.checkpoint import load_checkpoint, save_checkpoint
from mazerun.nn.models import ModelConfig
from mazerun.training.metrics import read_metrics_csv

QUICK = ["algorithm.n_updates=20", "algorithm.eval_every=10", "runner.eval_repeats=2"]


def record(directory: Path, env_id: str = "LunarLander-v3", episodes: int = 4, **runner) -> Path:
    rollout(env_id, PolicyConfig(), RunnerConfig(type="sequential", n_episodes=episodes, **runner),
            directory, print_fn=lambda _: None)
    return directory / "trajectory_data"


@pytest.fixture(scope="module")
def lunar_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record(tmp_path_factory.mktemp("lunar"), episodes=4, max_episode_steps=150)


def test_seed_004_clone_and_watch_commands_work_as_written(workdir: Path, lunar_records: Path) -> None:
    result = run_ok("-cn", "conf_train", "env.name=LunarLander-v2", "model=vector_obs", "wrappers=vector_obs",
                    "algorithm=bc", "algorithm.validation_percentage=50",
                    f"runner.dataset.dir_or_file={lunar_records}", *QUICK, cwd=workdir)
    assert "new best model" in result.stderr
    assert "discrete_accuracy" in result.stdout and "policy_l2_norm" in result.stdout
    bc_run = newest_run_dir(workdir)
    assert {"best.pt", "last.pt", "metrics.csv"} <= {path.name for path in bc_run.iterdir()}
    assert list(bc_run.glob("events.out.tfevents.*"))
    logged = {(row["group"], row["metric"]) for row in read_metrics_csv(bc_run / "metrics.csv")}
    for name in ("discrete_accuracy", "policy_loss", "policy_entropy", "policy_l2_norm", "policy_grad_norm"):
        assert ("train", name) in logged
    for name in ("discrete_accuracy", "policy_loss", "policy_entropy"):
        assert ("validation", name) in logged
    assert ("eval", "mean_return") in logged
    checkpoint = torch.load(bc_run / "best.pt", weights_only=True)
    assert checkpoint["env_id"] == "LunarLander-v3" and checkpoint["format_version"] == 1
    assert "actor_encoder.obs_mean" in checkpoint["model_state"]

    run_ok("env.name=LunarLander-v2", "model=vector_obs", "wrappers=vector_obs", "policy=torch_policy",
           f"input_dir={bc_run.relative_to(workdir)}", "runner.n_episodes=2", "runner.max_episode_steps=50", cwd=workdir)
    watched = load_records(newest_run_dir(workdir) / "trajectory_data")
    assert len(watched) == 2 and watched[0].policy == "torch_policy:bc"


def test_without_a_dataset_the_newest_recording_is_used(workdir: Path) -> None:
    run_ok("runner.n_episodes=2", "runner.max_episode_steps=60", cwd=workdir)
    recording = newest_run_dir(workdir)
    result = run_ok("-cn", "conf_train", "algorithm=bc", "algorithm.validation_percentage=0", *QUICK, cwd=workdir)
    assert str(recording.relative_to(workdir) / "trajectory_data") in result.stderr
    assert load_checkpoint(newest_run_dir(workdir)).extra["dataset"] == [str(recording.relative_to(workdir) / "trajectory_data")]


def test_babyai_bot_clone_trains_and_rolls_out(workdir: Path) -> None:
    bot_records = record(workdir / "bot", env_id="BabyAI-GoToLocal-v0", episodes=6)
    run_ok("-cn", "conf_train", "env=BabyAI-GoToLocal-v0", "algorithm=bc",
           f"runner.dataset.dir_or_file={bot_records}", *QUICK, cwd=workdir)
    bc_run = newest_run_dir(workdir)
    checkpoint = load_checkpoint(bc_run)
    assert checkpoint.model_config["kind"] == "minigrid" and "go" in checkpoint.vocabulary
    assert ("eval", "success_rate") in {(row["group"], row["metric"]) for row in read_metrics_csv(bc_run / "metrics.csv")}
    run_ok("policy=torch_policy", f"input_dir={bc_run}", "runner.n_episodes=2", cwd=workdir)
    assert newest_run_dir(workdir) != bc_run


def test_continuous_actions_clone_with_a_gaussian_head(workdir: Path) -> None:
    data = record(workdir / "cont", env_id="LunarLanderContinuous-v3", episodes=2, max_episode_steps=80)
    run_ok("-cn", "conf_train", "algorithm.validation_percentage=0", f"runner.dataset.dir_or_file={data}", *QUICK, cwd=workdir)
    logged = {row["metric"] for row in read_metrics_csv(newest_run_dir(workdir) / "metrics.csv")}
    assert "policy_loss" in logged and "discrete_accuracy" not in logged


def test_checkpoint_round_trip_gives_identical_actions(tmp_path: Path, lunar_records: Path) -> None:
    env = gym.make("LunarLander-v3")
    records = load_records(lunar_records)
    dataset = records_to_dataset(records)
    bc = BehaviouralCloning(BCConfig(), AlgorithmSpec(env.observation_space, env.action_space, ModelConfig(kind="vector_obs")))
    sampler = BatchSampler(dataset, 64, seed=0)
    for _ in range(30):
        bc.update(sampler.sample())
    save_network(tmp_path / "last.pt", bc.network, "actor_critic", ModelConfig(kind="vector_obs"), "LunarLander-v3",
                 env.observation_space, env.action_space, "bc")
    policy = TorchPolicy(str(tmp_path), "LunarLander-v3", env.action_space)
    observations = np.concatenate([record.observations for record in records])
    expected = bc.network.act(torch.as_tensor(observations), deterministic=True).numpy()
    assert [policy.act(observation) for observation in observations] == expected.tolist()


def test_a_linear_learning_rate_decays_to_zero_and_a_raised_budget_continues_it(lunar_records: Path) -> None:
    env = gym.make("LunarLander-v3")
    sampler = BatchSampler(records_to_dataset(load_records(lunar_records)), 32, seed=0)
    config = BCConfig(n_updates=10, lr=1e-3, lr_schedule="linear")
    bc = BehaviouralCloning(config, AlgorithmSpec(env.observation_space, env.action_space, ModelConfig(kind="vector_obs")))
    used = []
    for _ in range(10):
        bc.update(sampler.sample())
        used.append(bc.optimizer.param_groups[0]["lr"])
    assert used == pytest.approx([1e-3 * (1 - k / 10) for k in range(10)])  # 1e-3 at step 0, 1e-4 at step 9
    saved = bc.training_state()
    continued = BehaviouralCloning(BCConfig(n_updates=20, lr=1e-3, lr_schedule="linear"),
                                   AlgorithmSpec(env.observation_space, env.action_space, ModelConfig(kind="vector_obs")))
    continued.load_training_state(saved)
    assert continued.lr_schedule(10) == 0.0 and continued.lr_schedule(15) == 0.0  # ended at 0: it stays there
    saved["updates"] = 5  # as if stopped halfway: from 5e-4 at update 5 down to 0 at 20
    continued.load_training_state(saved)
    assert [continued.lr_schedule(step) for step in (5, 10, 20)] == pytest.approx([5e-4, 5e-4 * 10 / 15, 0.0])


def test_a_short_clone_beats_random_clearly(workdir: Path) -> None:
    data = record(workdir / "expert", episodes=10)
    run_ok("-cn", "conf_train", f"runner.dataset.dir_or_file={data}", "algorithm.n_updates=1500",
           "algorithm.eval_every=1500", "algorithm.validation_percentage=0", "runner.eval_repeats=10", cwd=workdir)
    clone = [row["value"] for row in read_metrics_csv(newest_run_dir(workdir) / "metrics.csv")
             if (row["group"], row["metric"]) == ("eval", "mean_return")][-1]
    random_stats = rollout("LunarLander-v3", PolicyConfig(name="random"), RunnerConfig(type="sequential", n_episodes=10),
                           workdir / "random", print_fn=lambda _: None)
    assert clone > random_stats["mean"] + 150


def _mixed_records(directory: Path) -> list[str]:
    return [str(record(directory / "cart", env_id="CartPole-v1", episodes=1, max_episode_steps=20)),
            str(record(directory / "lunar", episodes=1, max_episode_steps=20))]


@pytest.mark.parametrize("case, message", [
    ("nothing_recorded", "no finished expert recording under"),
    ("empty_dir", "no trajectory records (*.pkl) in"),
    ("corrupt_pickle", "bad.pkl"),
    ("two_envs", "CartPole-v1"),
    ("wrong_spaces", "observation"),
    ("validation_100", "algorithm.validation_percentage=100.0 is outside [0, 100)"),
    ("zero_updates", "algorithm.n_updates=0 must be > 0"),
    ("zero_batch", "algorithm.batch_size=0 must be > 0"),
    ("zero_lr", "algorithm.lr=0.0 must be > 0"),
    ("unknown_lr_schedule", "algorithm.lr_schedule='cosine' is unknown; use constant or linear"),
    ("missing_input_dir", "does not exist"),
    ("input_dir_without_checkpoint", "no checkpoint (best.pt or last.pt)"),
    ("env_mismatch", "differs from LunarLander-v3"),
])
def test_bad_training_input_is_one_line_error(workdir: Path, lunar_records: Path, case: str, message: str) -> None:
    dataset = f"runner.dataset.dir_or_file={lunar_records}"
    overrides = {
        "nothing_recorded": [],
        "empty_dir": [f"runner.dataset.dir_or_file={workdir}"],
        "validation_100": [dataset, "algorithm.validation_percentage=100"],
        "zero_updates": [dataset, "algorithm.n_updates=0"],
        "zero_batch": [dataset, "algorithm.batch_size=0"],
        "zero_lr": [dataset, "algorithm.lr=0"],
        "unknown_lr_schedule": [dataset, "algorithm.lr_schedule=cosine"],
        "missing_input_dir": [dataset, "input_dir=nowhere"],
        "input_dir_without_checkpoint": [dataset, f"input_dir={workdir}"],
        "env_mismatch": [dataset, "env=CartPole-v1"],
    }.get(case)
    if case == "corrupt_pickle":
        (workdir / "data").mkdir()
        (workdir / "data" / "bad.pkl").write_bytes(b"garbage")
        overrides = [f"runner.dataset.dir_or_file={workdir / 'data'}"]
    elif case == "two_envs":
        first, second = _mixed_records(workdir)
        overrides = [f"runner.dataset.dir_or_file=[{first},{second}]"]
    elif case == "wrong_spaces":
        builder = EpisodeBuilder(np.zeros(3, dtype=np.float32))
        builder.add(0, 0.0, np.zeros(3, dtype=np.float32))
        write_record(builder.build(terminated=True, truncated=False, env_id="LunarLander-v3", seed=0, policy="x"), workdir / "odd", 0)
        overrides = [f"runner.dataset.dir_or_file={workdir / 'odd'}"]
    result = run_cli("-cn", "conf_train", *QUICK, *overrides, cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(workdir.glob("outputs/*/*/*.pt"))


def test_checkpoint_of_another_format_version_is_refused(workdir: Path) -> None:
    env = gym.make("LunarLander-v3")
    save_checkpoint(workdir / "best.pt", model_state={}, model_config={}, observation_space=env.observation_space,
                    action_space=env.action_space, env_id="LunarLander-v3", algorithm="bc")
    payload = torch.load(workdir / "best.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, workdir / "best.pt")
    result = run_cli("policy=torch_policy", f"input_dir={workdir}", "runner.n_episodes=1", cwd=workdir)
    assert result.returncode == 2 and "checkpoint format version 99" in result.stderr


def test_ctrl_c_during_training_writes_last_checkpoint(workdir: Path, lunar_records: Path) -> None:
    with spawn_cli("-cn", "conf_train", f"runner.dataset.dir_or_file={lunar_records}",
                   "algorithm.n_updates=1000000", "algorithm.eval_every=1000000", cwd=workdir) as process:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(workdir.glob("outputs/*/*/events.out.tfevents.*")):
            time.sleep(0.1)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "last.pt holds update" in stderr and "continue with input_dir=" in stderr and "Traceback" not in stderr
    checkpoint = load_checkpoint(newest_run_dir(workdir) / "last.pt")
    assert 0 < checkpoint.extra["step"] < 1000000
