"""How PPO's and DAgger's env copies step: the same trajectories and metrics in every mode, exact resume, and a
worker process that never outlives the run, whether it dies, the run stops, or the user presses Ctrl-C."""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import group_members, run_cli, run_ok, spawn_cli

from mazerun.acting import vector
from mazerun.acting.copies import EnvCopies
from mazerun.acting.envs import SeededEpisodes, make_env
from mazerun.acting.vector import make_vector_env
from mazerun.acting.workers import WorkerCopies
from mazerun.config import schemas
from mazerun.core.errors import MazerunError
from mazerun.data.records import load_records
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.nn.models import ModelConfig, build_actor_critic
from mazerun.training.loops.onpolicy import RolloutBuffer, RolloutCollector
from mazerun.training.metrics import read_metrics_csv

MODES = ("sync", "worker")
"""The two modes the auto choice picks from; async (gymnasium's, one process per copy) is checked beside them."""
WALL_CLOCK = {"sps", "rollout_seconds", "update_seconds"}
"""Metrics that are the wall clock's, not the run's."""
PPO = ["algorithm=ppo", "env=CartPole-v1", "algorithm.n_steps=32", "algorithm.batch_size=64", "runner.n_envs=4",
       "runner.max_episode_steps=40", "runner.eval_repeats=2", "model.hidden_sizes=[16,16]", "algorithm.eval_every=128"]
"""Two iterations of 128 steps per 256 env steps; 40-step episodes end by the time limit as well as by falling."""


def play(mode: str, env_id: str, steps: int, n_envs: int = 5, limit: int = 50) -> list[tuple[np.ndarray, ...]]:
    """``steps`` steps of seeded random actions sent half by half: each step's observations, rewards, end flags and
    the final observations of the episodes that ended."""
    envs = make_vector_env(env_id, n_envs, mode, limit, seed=11)
    rng = np.random.default_rng(0)
    trajectory = []
    try:
        envs.reset()
        trajectory.append((np.array(envs.observations),))
        for _ in range(steps):
            actions = rng.integers(0, envs.single_action_space.n, size=n_envs)
            for half, rows in enumerate(envs.halves):
                envs.send(half, actions[rows])
            rewards, terminated, truncated = (np.concatenate(parts) for parts in
                                              zip(*(envs.receive(half) for half in range(len(envs.halves)))))
            ended = np.flatnonzero(terminated | truncated)
            finals = np.array([envs.infos["final_obs"][index] for index in ended])
            finals = finals.reshape(len(ended), *envs.single_observation_space.shape)
            trajectory.append((np.array(envs.observations), rewards, terminated, truncated, finals))
    finally:
        envs.close()
    return trajectory


@pytest.mark.parametrize(("env_id", "limit"), [("CartPole-v1", 50), ("LunarLander-v3", 120)])
def test_every_mode_steps_the_same_trajectories_as_gymnasium(env_id: str, limit: int) -> None:
    """Random landers crash after about 100 steps: the limits leave room for both ends of an episode."""
    steps = 300
    sync, worker, gymnasium_async = (play(mode, env_id, steps, limit=limit) for mode in ("sync", "worker", "async"))
    for t, (ours, theirs, reference) in enumerate(zip(sync, worker, gymnasium_async)):
        for field, (a, b, c) in enumerate(zip(ours, theirs, reference)):
            assert np.array_equal(a, b), f"step {t}, field {field}: sync and worker differ"
            assert np.array_equal(a, c), f"step {t}, field {field}: sync and gymnasium's async differ"
    terminated = sum(int(step[2].sum()) for step in sync[1:])
    truncated = sum(int((step[3] & ~step[2]).sum()) for step in sync[1:])
    assert terminated > 0 and truncated > 0, (terminated, truncated)


def test_each_copy_plays_its_own_seeds_as_a_lone_env_does() -> None:
    """The arrays hold what copy i's own env returns on seeds seed + i, seed + i + n_envs, ... (reset in place)."""
    n_envs, limit, steps = 3, 20, 120
    trajectory = play("worker", "CartPole-v1", steps, n_envs=n_envs, limit=limit)
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 2, size=n_envs) for _ in range(steps)]
    for index in range(n_envs):
        env = make_env("CartPole-v1", max_episode_steps=limit)
        episode = 0
        observation, _ = env.reset(seed=11 + index)
        assert np.array_equal(trajectory[0][0][index], observation)
        for t in range(steps):
            observation, reward, terminated, truncated, _ = env.step(int(actions[t][index]))
            _, rewards, terminated_flags, truncated_flags, finals = trajectory[t + 1]
            assert (rewards[index], terminated_flags[index], truncated_flags[index]) == (reward, terminated, truncated)
            if terminated or truncated:
                ended = np.flatnonzero(terminated_flags | truncated_flags)
                assert np.array_equal(finals[list(ended).index(index)], observation)
                episode += 1
                observation, _ = env.reset(seed=11 + index + episode * n_envs)
            assert np.array_equal(trajectory[t + 1][0][index], observation)
        env.close()


@pytest.mark.parametrize("mode", MODES)
def test_steps_land_in_arrays_allocated_once(mode: str) -> None:
    """Nothing is built per step between the envs and the policy: the same arrays and infos every step."""
    envs = make_vector_env("LunarLander-v3", 4, mode, 30, seed=0)
    try:
        envs.reset()
        observations, infos = envs.observations, envs.infos
        rewards = envs.step(np.zeros(4, dtype=np.int64))[1]
        for _ in range(40):  # past the time limit: resets happen in place too
            stepped, stepped_rewards, _, _, stepped_infos = envs.step(np.zeros(4, dtype=np.int64))
            assert stepped is observations and stepped_rewards is rewards and stepped_infos is infos
        assert envs.observations is observations and infos["final_obs"].shape == observations.shape
    finally:
        envs.close()


def linear_network(envs: vector.VectorSteps) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_actor_critic(ModelConfig(kind="vector_obs", hidden_sizes=(8,)), envs.single_observation_space,
                              envs.single_action_space)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "LunarLander-v3"])
def test_rollouts_are_identical_in_every_mode(env_id: str) -> None:
    """The policy acts on the same halves in the same order, drawing from the generator in that order, everywhere."""
    buffers = {}
    for mode in (*MODES, "async"):
        envs = make_vector_env(env_id, 4, mode, 30, seed=2)
        try:
            buffer = RolloutBuffer(50, 4, envs.single_observation_space, envs.single_action_space, torch.device("cpu"))
            collector = RolloutCollector(envs, linear_network(envs), envs.single_observation_space, None,
                                         torch.device("cpu"), 0.99, torch.Generator().manual_seed(0))
            for _ in range(3):  # 150 steps, across rollouts
                collector.collect(buffer)
            buffers[mode] = (buffer, collector.last_values(), collector.episodes.episode_metrics())
        finally:
            envs.close()
    sync, *others = buffers.values()
    for other in others:
        for name in ("observations", "actions", "log_probs", "values"):
            assert torch.equal(getattr(sync[0], name), getattr(other[0], name)), name
        assert np.array_equal(sync[0].rewards, other[0].rewards) and np.array_equal(sync[0].dones, other[0].dones)
        assert torch.equal(sync[1], other[1]) and sync[2] == other[2]
    assert sync[2]["episodes"] > 0


def test_auto_steps_in_a_worker_where_two_cpus_are_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    for cpus, part in ((1, EnvCopies), (2, WorkerCopies)):
        monkeypatch.setattr(schemas, "usable_cpus", lambda _: cpus)
        envs = make_vector_env("CartPole-v1", 4, "auto", None)
        try:
            assert isinstance(envs.parts[-1], part)
        finally:
            envs.close()
    one = make_vector_env("CartPole-v1", 1, "auto", None)  # nothing to split
    assert [type(part) for part in one.parts] == [EnvCopies]
    one.close()


def test_a_worker_for_dict_observations_is_refused_in_one_line() -> None:
    with pytest.raises(MazerunError, match=r"^runner.vector=worker steps Box or Discrete observations .* observes a "
                                           r"Dict; use runner.vector=sync or async$"):
        make_vector_env("MiniGrid-DoorKey-5x5-v0", 2, "worker", None)


@pytest.mark.parametrize(("overrides", "message"), [
    (["runner.vector=threads"], "runner.vector='threads' is unknown; use auto, sync, worker, async"),
    (["runner.vector=worker", "runner.n_envs=1"], "runner.vector=worker steps half of the env copies in a worker and "
                                                  "runner.n_envs=1; use runner.n_envs >= 2 or runner.vector=sync"),
])
def test_a_bad_vector_mode_is_one_line(workdir: Path, overrides: list[str], message: str) -> None:
    result = run_cli(*PPO, *overrides, cwd=workdir)
    assert result.returncode != 0 and f"error: {message}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def metrics(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics_csv(run_dir / "metrics.csv") if row["metric"] not in WALL_CLOCK]


def test_ppo_through_the_cli_gives_the_same_metrics_in_every_mode(workdir: Path) -> None:
    for mode in MODES:
        run_ok(*PPO, "algorithm.total_steps=256", f"runner.vector={mode}", f"hydra.run.dir={mode}", cwd=workdir)
    assert metrics(workdir / "sync") == metrics(workdir / "worker")
    assert any(row["metric"] == "episode_return" for row in metrics(workdir / "sync"))
    sync, worker = (load_checkpoint(workdir / mode / "last.pt") for mode in MODES)
    for name, value in sync.model_state.items():
        assert torch.equal(value, worker.model_state[name]), name


def test_dagger_through_the_cli_gives_the_same_metrics_and_records_in_every_mode(workdir: Path) -> None:
    """The expert labels in the worker beside its copies, as it does in the main process."""
    for mode in MODES:
        run_ok("algorithm=dagger", "algorithm.n_steps=16", "runner.n_envs=4", "runner.eval_repeats=2",
               "model.hidden_sizes=[16,16]", "algorithm.total_steps=128", "algorithm.n_updates=20",
               "algorithm.eval_every=64", "runner.max_episode_steps=20", f"runner.vector={mode}",
               f"hydra.run.dir={mode}", cwd=workdir)
    assert metrics(workdir / "sync") == metrics(workdir / "worker")
    sync, worker = (load_records(workdir / mode / "trajectory_data") for mode in MODES)
    assert sync and [record.seed for record in sync] == [record.seed for record in worker]
    for ours, theirs in zip(sync, worker):
        assert np.array_equal(ours.actions, theirs.actions) and np.array_equal(ours.expert_actions,
                                                                               theirs.expert_actions)


@pytest.mark.parametrize("mode", MODES)
def test_a_run_stopped_and_continued_equals_the_whole_run(workdir: Path, mode: str) -> None:
    """A run of 128 steps continued to 256 is the run of 256 (constant schedules: theirs end at total_steps)."""
    common = [*PPO, f"runner.vector={mode}", "algorithm.lr_schedule=constant", "algorithm.clip_schedule=constant"]
    run_ok(*common, "algorithm.total_steps=256", "hydra.run.dir=whole", cwd=workdir)
    run_ok(*common, "algorithm.total_steps=128", "hydra.run.dir=first", cwd=workdir)
    state = load_checkpoint(workdir / "first" / "last.pt").extra["training_state"]["envs"]
    assert any(len(actions) for actions in state["actions"])  # episodes were running: the replay has work to do
    run_ok(*common, "algorithm.total_steps=256", "input_dir=first", "hydra.run.dir=continued", cwd=workdir)
    assert metrics(workdir / "continued") == metrics(workdir / "whole")
    whole, continued = (load_checkpoint(workdir / run / "last.pt") for run in ("whole", "continued"))
    for name, value in whole.model_state.items():
        assert torch.equal(value, continued.model_state[name]), name


def _workers_of(pid: int) -> list[int]:
    """The env workers ``pid`` started (their command line runs mazerun.acting.workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    workers = []
    for child in map(int, children):
        try:
            if b"mazerun.acting.workers" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:
            pass  # it just ended
    return workers


def _wait_for(path: Path, process: object) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not path.exists():
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    assert path.exists(), f"{path} was never written"


LONG = [*PPO, "runner.vector=worker", "algorithm.total_steps=10000000", "hydra.run.dir=run"]


def test_a_killed_worker_ends_the_run_in_one_line_and_keeps_last_pt(workdir: Path) -> None:
    with spawn_cli(*LONG, cwd=workdir) as process:
        _wait_for(workdir / "run" / "last.pt", process)
        workers = _workers_of(process.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert not group_members(process.pid), "a process of the run outlived it"
    assert process.returncode not in (0, None) and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert "the env worker stepping env copies 2 to 3 was killed by SIGKILL; the run cannot go on without them; " \
           in errors[0]
    kept = load_checkpoint(workdir / "run" / "last.pt")
    assert f"run/last.pt holds step {kept.extra['step']} (continue with input_dir=" in errors[0]


LONG_DAGGER = ["algorithm=dagger", "algorithm.n_steps=16", "runner.n_envs=4", "runner.eval_repeats=1",
               "model.hidden_sizes=[16,16]", "algorithm.total_steps=10000000", "algorithm.eval_every=64",
               "runner.max_episode_steps=20", "runner.vector=worker", "hydra.run.dir=run"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("command", [LONG, LONG_DAGGER], ids=["ppo", "dagger"])
def test_a_stop_sent_to_the_whole_group_ends_the_run_quietly_and_leaves_no_process(
    workdir: Path, stop: signal.Signals, command: list[str]
) -> None:
    """Ctrl-C in a terminal signals the whole process group, the worker with it; so may a scheduler's SIGTERM.
    DAgger saves where it stopped, with the episodes of the copies the worker steps."""
    with spawn_cli(*command, cwd=workdir) as process:
        _wait_for(workdir / "run" / "last.pt", process)
        assert _workers_of(process.pid)
        time.sleep(0.3)  # into an iteration: the worker is stepping
        os.killpg(process.pid, stop)
        _, stderr = process.communicate(timeout=60)
        assert not group_members(process.pid), "a process of the run outlived it"
    assert process.returncode == 128 + stop, stderr
    assert "Traceback" not in stderr and f"stopped by {stop.name} at step" in stderr, stderr
    kept = load_checkpoint(workdir / "run" / "last.pt")
    assert f"last.pt holds step {kept.extra['step']}" in stderr
    assert len(kept.extra["training_state"]["envs"]["episodes"]) == 4


def test_a_worker_that_cannot_build_its_envs_says_why() -> None:
    envs = make_vector_env("CartPole-v1", 2, "worker", None, make_expert=partial(expert_only_in, os.getpid()))
    try:
        envs.reset()
        with pytest.raises(MazerunError, match=r"^the env worker could not build its env copies: RuntimeError: no "
                                               r"expert in a worker$"):
            envs.observations
    finally:
        envs.close()
    assert envs.parts[-1].process.poll() is not None


def expert_only_in(process: int, env: gym.Env) -> Labeller:
    """An expert that labels every state 0, and cannot be built outside ``process``."""
    if os.getpid() != process:
        raise RuntimeError("no expert in a worker")
    return Labeller()


class Labeller:
    def reset(self, env: gym.Env, seed: int | None) -> None:
        pass

    def act(self, observation: np.ndarray) -> int:
        return 0

    def took(self, action: int) -> None:
        pass


def test_replay_rebuilds_the_running_episodes_in_a_fresh_worker() -> None:
    envs = make_vector_env("LunarLander-v3", 4, "worker", 60, seed=5)
    rng = np.random.default_rng(1)
    try:
        envs.reset()
        for _ in range(45):
            envs.step(rng.integers(0, 4, size=4))
        states, observations = envs.episode_states(), np.array(envs.observations)
    finally:
        envs.close()
    again = make_vector_env("LunarLander-v3", 4, "worker", 60, seed=5)
    try:
        replays = again.replay(states)
        assert np.array_equal(again.observations, observations)
        assert [len(rewards) for _, rewards, _ in replays] == [len(actions) for _, actions in states]
        assert isinstance(again.parts[0].envs[0], SeededEpisodes)
    finally:
        again.close()
