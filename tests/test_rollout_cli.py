"""Recording expert demonstrations through the real `run` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import newest_run_dir, run_cli, run_ok, spawn_cli

from mazerun.acting.policies.heuristic import LunarLanderHeuristic
from mazerun.acting.rollout import rollout
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.core.errors import MazerunError
from mazerun.data.records import StateTrajectoryRecord, load_records


def test_seed_004_record_command_works_as_written(workdir: Path) -> None:
    result = run_ok("env.name=LunarLander-v2", "policy=lunar_lander_heuristics", "runner.n_episodes=3", cwd=workdir)
    assert "LunarLander-v3" in result.stderr  # the v2 -> v3 mapping is said once
    assert "median_step_count" in result.stdout and "episode_count" in result.stdout
    run_dir = newest_run_dir(workdir)
    records = load_records(run_dir / "trajectory_data")
    assert len(records) == 3
    stats = json.loads((run_dir / "rollout_stats.json").read_text())
    returns = sorted(record.episode_return for record in records)
    assert stats["episode_count"] == 3
    assert stats["total_step_count"] == sum(len(record) for record in records)
    assert stats["mean"] == pytest.approx(np.mean(returns))
    assert stats["min"] == pytest.approx(returns[0]) and stats["max"] == pytest.approx(returns[-1])
    for record in records:
        assert record.env_id == "LunarLander-v3" and record.policy == "heuristic"
        assert record.episode_return == pytest.approx(float(np.sum(record.rewards)))
        assert record.observations.shape == (len(record) + 1, 8)


def test_babyai_bot_succeeds_and_keeps_dict_observations(workdir: Path) -> None:
    result = run_ok("env=BabyAI-GoToLocal-v0", "policy=bot", "runner.n_episodes=6", cwd=workdir)
    assert "Sampling rejected" not in result.stdout
    run_dir = newest_run_dir(workdir)
    assert json.loads((run_dir / "rollout_stats.json").read_text())["success_rate"] == 1.0
    for record in load_records(run_dir / "trajectory_data"):
        assert set(record.observations) == {"image", "direction", "mission"}
        assert record.observations["image"].shape == (len(record) + 1, 7, 7, 3)
        assert str(record.observations["mission"][0]).startswith("go to")
        assert record.terminated and record.rewards[-1] > 0


def test_render_works_with_a_dummy_video_driver(workdir: Path) -> None:
    run_ok("env.name=LunarLander-v2", "policy=lunar_lander_heuristics", "runner=sequential",
           "runner.render=true", "runner.n_episodes=1", cwd=workdir, env={"SDL_VIDEODRIVER": "dummy"})
    assert len(list(newest_run_dir(workdir).glob("trajectory_data/*.pkl"))) == 1


def test_render_without_display_says_to_record_video(workdir: Path) -> None:
    environment = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    result = subprocess.run([sys.executable, "-m", "mazerun", "runner=sequential", "runner.render=true", "runner.n_episodes=1"],
                            cwd=workdir, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "runner.record_video=true" in result.stderr
    assert "Traceback" not in result.stderr


def test_record_video_writes_mp4(workdir: Path) -> None:
    run_ok("env=CartPole-v1", "runner.n_episodes=2", "runner.max_episode_steps=20", "runner.record_video=true", cwd=workdir)
    videos = sorted((newest_run_dir(workdir) / "videos").glob("*.mp4"))
    assert [video.name for video in videos] == ["episode_00000_seed0.mp4", "episode_00001_seed1.mp4"]
    assert all(video.stat().st_size > 1000 for video in videos)


def test_hydra_multirun_sweeps_epsilon(workdir: Path) -> None:
    run_ok("-m", "policy.epsilon=0,0.3", "runner=parallel", "runner.n_episodes=2", cwd=workdir)
    jobs = sorted(workdir.glob("multirun/*/*/*/rollout_stats.json"))
    assert len(jobs) == 2
    policies = {load_records(job.parent / "trajectory_data")[0].policy for job in jobs}
    assert policies == {"heuristic", "heuristic+epsilon0.3"}


def test_a_failed_job_of_a_sweep_is_reported_and_the_sweep_goes_on(workdir: Path) -> None:
    result = run_cli("-m", "policy.epsilon=2.0,0.1,0.2", "runner.n_episodes=1", "runner.max_episode_steps=30",
                     cwd=workdir)
    assert result.returncode == 2  # decided once the sweep ended
    assert "policy.epsilon=2.0 must lie in [0, 1]" in result.stderr and "Traceback" not in result.stderr
    assert len(list(workdir.glob("multirun/*/*/*/rollout_stats.json"))) == 2  # the jobs after it ran


def _records_by_seed(directory: Path) -> list[StateTrajectoryRecord]:
    return sorted(load_records(directory), key=lambda record: record.seed)


def test_parallel_and_sequential_record_the_same_episodes(tmp_path: Path) -> None:
    policy = PolicyConfig(name="heuristic", epsilon=0.2)
    rollout("LunarLander-v3", policy, RunnerConfig(type="sequential", n_episodes=4, seed=7), tmp_path / "seq", print_fn=lambda _: None)
    rollout("LunarLander-v3", policy, RunnerConfig(type="parallel", n_episodes=4, n_workers=2, seed=7), tmp_path / "par", print_fn=lambda _: None)
    sequential = _records_by_seed(tmp_path / "seq" / "trajectory_data")
    parallel = _records_by_seed(tmp_path / "par" / "trajectory_data")
    assert [record.seed for record in sequential] == [7, 8, 9, 10]
    for a, b in zip(sequential, parallel):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)


def test_heuristic_lunar_lander_returns_above_200(tmp_path: Path) -> None:
    stats = rollout("LunarLander-v3", PolicyConfig(), RunnerConfig(n_episodes=20, n_workers=2), tmp_path, print_fn=lambda _: None)
    assert stats["episode_count"] == 20
    assert stats["mean"] > 200


def test_cartpole_controller_balances(tmp_path: Path) -> None:
    stats = rollout("CartPole-v1", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=3, record_trajectory=False), tmp_path, print_fn=lambda _: None)
    assert stats["min"] == 500
    assert not (tmp_path / "trajectory_data").exists()


def test_epsilon_one_takes_random_actions(tmp_path: Path) -> None:
    stats = rollout("LunarLander-v3", PolicyConfig(epsilon=1.0), RunnerConfig(type="sequential", n_episodes=5), tmp_path, print_fn=lambda _: None)
    assert stats["mean"] < 0  # the heuristic is never followed


def test_failing_episode_is_named_and_others_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original_reset = LunarLanderHeuristic.reset

    def reset(self, env, seed):
        if seed == 2:
            raise RuntimeError("boom")
        original_reset(self, env, seed)

    monkeypatch.setattr(LunarLanderHeuristic, "reset", reset)
    with pytest.raises(MazerunError, match=r"episode 2 \(seed 2\) failed: RuntimeError: boom"):
        rollout("LunarLander-v3", PolicyConfig(), RunnerConfig(n_episodes=4, n_workers=2), tmp_path, print_fn=lambda _: None)
    assert sorted(record.seed for record in load_records(tmp_path / "trajectory_data")) == [0, 1, 3]


@pytest.mark.parametrize("overrides, message", [
    (["env.name=LunarLandr-v3"], "did you mean LunarLander-v3"),
    (["policy=foo"], "unknown policy 'foo'; choose one of: bot, heuristic"),
    (["env=gym_env", "env.name=Acrobot-v1"], "no heuristic policy for Acrobot-v1"),  # grids have the planner
    (["env=gym_env"], "env.name must be set"),
    (["runner.n_episodes=0"], "runner.n_episodes=0 must be at least 1"),
    (["runner.n_workers=-1"], "runner.n_workers=-1 must be at least 1"),
    (["runner.n_episodes=abc"], "invalid config at runner.n_episodes"),
    (["policy.epsilon=1.5"], "policy.epsilon=1.5 must lie in [0, 1]"),
    (["runner.max_episode_steps=0"], "runner.max_episode_steps=0 must be at least 1"),
])
def test_bad_input_is_one_line_error(workdir: Path, overrides: list[str], message: str) -> None:
    result = run_cli(*overrides, cwd=workdir)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert not list(workdir.glob("outputs/*/*/trajectory_data/*.pkl"))


def test_ctrl_c_keeps_finished_records_and_no_partial_file(workdir: Path) -> None:
    with spawn_cli("runner.n_episodes=2000", "runner.n_workers=2", cwd=workdir) as process:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(workdir.glob("outputs/*/*/trajectory_data/*.pkl"))) < 3:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    data = newest_run_dir(workdir) / "trajectory_data"
    assert not [path for path in data.iterdir() if path.suffix != ".pkl"]  # no temp files left
    records = load_records(data)
    assert 3 <= len(records) < 2000
