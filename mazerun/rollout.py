"""Rolling a policy out for many episodes, sequentially or over worker processes, and recording them.

Episode ``i`` is always seeded ``seed + i`` and its policy reset with the same seed, so the
records do not depend on the runner or on the number of workers. Each worker writes its own
records atomically, so an interrupt or a failing episode never loses the finished ones.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import statistics
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from mazerun.config import DEFAULT_ENV_ID, PolicyConfig, RunConfig, RunnerConfig, worker_count
from mazerun.envs import check_display_for_human_render, is_minigrid, make_env, resolve_env_id
from mazerun.errors import MazerunError
from mazerun.policies import Policy, build_policy
from mazerun.records import STATS_FILE, TRAJECTORY_DIR, EpisodeBuilder, atomic_write_bytes, write_record

log = logging.getLogger(__name__)

VIDEO_DIR = "videos"

@dataclass(frozen=True)
class RolloutSpec:
    """Everything a worker needs to play episodes on its own."""

    env_id: str
    policy: PolicyConfig
    runner: RunnerConfig
    run_dir: Path
    input_dir: str | None = None


@dataclass
class EpisodeSummary:
    """What the parent keeps of one episode: enough for the statistics table."""

    index: int
    seed: int
    steps: int
    episode_return: float
    actions: np.ndarray
    success: bool | None
    record_path: str | None
    policy: str


class EpisodeFailed(Exception):
    """An episode raised; carries which one so the user can reproduce it."""

    def __init__(self, index: int, seed: int, cause: str) -> None:
        super().__init__(index, seed, cause)
        self.index, self.seed, self.cause = index, seed, cause

    def __str__(self) -> str:
        return f"episode {self.index} (seed {self.seed}) failed: {self.cause}"


def policy_for(spec: RolloutSpec, env: Any) -> Policy:
    return build_policy(spec.policy, spec.env_id, env.action_space, input_dir=spec.input_dir)


class EpisodePlayer:
    """One environment and one policy, playing whole episodes by index."""

    def __init__(self, spec: RolloutSpec, render_mode: str | None) -> None:
        self.spec = spec
        self.env = make_env(
            spec.env_id, max_episode_steps=spec.runner.max_episode_steps, render_mode=render_mode
        )
        self.policy = policy_for(spec, self.env)
        self.records_dir = spec.run_dir / TRAJECTORY_DIR
        self.videos_dir = spec.run_dir / VIDEO_DIR
        self.minigrid = is_minigrid(spec.env_id)

    def play(self, index: int) -> EpisodeSummary:
        seed = self.spec.runner.seed + index
        try:
            return self._play(index, seed)
        except (KeyboardInterrupt, MazerunError):
            raise
        except Exception as error:
            raise EpisodeFailed(index, seed, f"{type(error).__name__}: {error}") from error

    def _play(self, index: int, seed: int) -> EpisodeSummary:
        env, policy = self.env, self.policy
        observation, _ = env.reset(seed=seed)
        policy.reset(env, seed)
        episode = EpisodeBuilder(observation)
        frames = [env.render()] if self.spec.runner.record_video else None
        terminated = truncated = False
        reward = 0.0
        while not (terminated or truncated):
            action = policy.act(observation)
            observation, reward, terminated, truncated, _ = env.step(action)
            episode.add(action, float(reward), observation)
            if frames is not None:
                frames.append(env.render())
        record = episode.build(
            terminated=terminated, truncated=truncated, env_id=self.spec.env_id, seed=seed, policy=policy.name
        )
        record_path = None
        if self.spec.runner.record_trajectory:
            record_path = str(write_record(record, self.records_dir, index))
        if frames is not None:
            write_video(frames, self.videos_dir / f"episode_{index:05d}_seed{seed}.mp4", env.metadata)
        return EpisodeSummary(
            index=index,
            seed=seed,
            steps=len(record),
            episode_return=record.episode_return,
            actions=record.actions,
            success=bool(terminated and reward > 0) if self.minigrid else None,
            record_path=record_path,
            policy=policy.name,
        )


def write_video(frames: list[np.ndarray], path: Path, metadata: dict) -> None:
    """Encode RGB frames to MP4 (imageio's bundled ffmpeg), atomically."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    try:
        imageio.mimwrite(tmp, frames, fps=metadata.get("render_fps", 30), macro_block_size=1)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# -- parallel workers ---------------------------------------------------------------------------

_player: EpisodePlayer | None = None


def _init_worker(spec: RolloutSpec) -> None:
    # The parent handles Ctrl-C and SIGTERM: workers finish the episode in hand so no record is lost.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    global _player
    _player = EpisodePlayer(spec, render_mode="rgb_array" if spec.runner.record_video else None)


def _play_in_worker(index: int) -> EpisodeSummary:
    assert _player is not None, "worker not initialised"
    return _player.play(index)


# -- the runner ---------------------------------------------------------------------------------


@dataclass
class RolloutResult:
    summaries: list[EpisodeSummary]
    failures: list[str]
    interrupted: bool


def _run_sequential(spec: RolloutSpec, progress: tqdm) -> RolloutResult:
    if spec.runner.render:
        render_mode: str | None = "human"
    else:
        render_mode = "rgb_array" if spec.runner.record_video else None
    player = EpisodePlayer(spec, render_mode)
    result = RolloutResult([], [], interrupted=False)
    try:
        for index in range(spec.runner.n_episodes):
            try:
                result.summaries.append(player.play(index))
            except EpisodeFailed as failure:
                result.failures.append(str(failure))
            progress.update()
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        player.env.close()
    return result


def _run_parallel(spec: RolloutSpec, progress: tqdm) -> RolloutResult:
    n_workers = worker_count(spec.runner)
    result = RolloutResult([], [], interrupted=False)
    executor = ProcessPoolExecutor(
        max_workers=n_workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_init_worker,
        initargs=(spec,),
    )
    futures: dict[Future, int] = {
        executor.submit(_play_in_worker, index): index for index in range(spec.runner.n_episodes)
    }
    try:
        for future in as_completed(futures):
            try:
                result.summaries.append(future.result())
            except EpisodeFailed as failure:
                result.failures.append(str(failure))
            except BrokenProcessPool:
                index = futures[future]
                result.failures.append(
                    f"a worker process died before episode {index} (seed {spec.runner.seed + index}) finished"
                )
            progress.update()
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        # Running episodes finish and write their records; queued ones are dropped.
        executor.shutdown(wait=True, cancel_futures=True)
    return result


def run_rollout(config: RunConfig, run_dir: Path) -> dict[str, float]:
    """`run` without an algorithm: the env is the one named, else the checkpoint's (torch_policy), else the default."""
    env_id = config.env.name
    if config.policy.name == "torch_policy":
        import torch  # imported only for trained policies

        # One small forward pass per step: threads only add overhead. A thread pool started here
        # would also deadlock the forked workers of the parallel runner.
        torch.set_num_threads(1)
        if env_id is None and config.input_dir:
            from mazerun.checkpoint import load_checkpoint

            env_id = load_checkpoint(config.input_dir).env_id
    return rollout(env_id or DEFAULT_ENV_ID, config.policy, config.runner, run_dir, input_dir=config.input_dir)


def rollout(
    env_id: str,
    policy: PolicyConfig,
    runner: RunnerConfig,
    run_dir: Path,
    *,
    input_dir: str | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, float]:
    """Play ``runner.n_episodes`` episodes, record them under ``run_dir`` and return the statistics."""
    env_id = resolve_env_id(env_id)
    spec = RolloutSpec(env_id=env_id, policy=policy, runner=runner, run_dir=Path(run_dir), input_dir=input_dir)
    # Build once in this process so that bad input (no heuristic, bad checkpoint) fails before any worker starts.
    probe_env = make_env(env_id, max_episode_steps=runner.max_episode_steps)
    policy_for(spec, probe_env)
    probe_env.close()
    sequential = runner.type == "sequential"
    if runner.render:
        check_display_for_human_render()
        if not sequential:
            log.info("runner.render=true: playing the episodes one after another in this process")
            sequential = True
    with tqdm(total=runner.n_episodes, unit="episode", desc="rollout", disable=None) as progress:
        result = (_run_sequential if sequential else _run_parallel)(spec, progress)

    summaries = sorted(result.summaries, key=lambda summary: summary.index)
    stats = rollout_statistics(summaries)
    if summaries:
        print_fn(format_rollout_table(summaries, stats))
        finished = not (result.interrupted or result.failures)
        described = {**stats, "env_id": env_id, "policy": summaries[0].policy, "finished": finished}
        atomic_write_bytes(spec.run_dir / STATS_FILE, json.dumps(described, indent=2).encode())
    if runner.record_trajectory and summaries:
        log.info("recorded %d episodes to %s", len(summaries), spec.run_dir / TRAJECTORY_DIR)
    if result.interrupted:
        raise KeyboardInterrupt(f"{len(summaries)} finished episodes kept in {spec.run_dir}")
    if result.failures:
        shown = "; ".join(result.failures[:3])
        more = f" (and {len(result.failures) - 3} more)" if len(result.failures) > 3 else ""
        raise MazerunError(
            f"{len(result.failures)} of {runner.n_episodes} episodes failed: {shown}{more}; "
            f"the {len(summaries)} finished episodes are kept in {spec.run_dir}"
        )
    return stats


def rollout_statistics(summaries: Iterable[EpisodeSummary]) -> dict[str, float]:
    """The numbers behind Maze's rollout table, also written to rollout_stats.json."""
    summaries = list(summaries)
    returns = [summary.episode_return for summary in summaries]
    steps = [summary.steps for summary in summaries]
    stats: dict[str, float] = {
        "episode_count": len(summaries),
        "total_step_count": int(sum(steps)),
        "mean_step_count": float(np.mean(steps)) if steps else 0.0,
        "median_step_count": float(statistics.median(steps)) if steps else 0.0,
        "mean": float(np.mean(returns)) if returns else 0.0,
        "std": float(np.std(returns)) if returns else 0.0,
        "min": float(np.min(returns)) if returns else 0.0,
        "max": float(np.max(returns)) if returns else 0.0,
    }
    successes = [summary.success for summary in summaries if summary.success is not None]
    if successes:
        stats["success_rate"] = float(np.mean(successes))
    return stats


def _action_summary(summaries: list[EpisodeSummary]) -> str:
    actions = np.concatenate([np.asarray(summary.actions, dtype=np.float64).reshape(summary.steps, -1)
                              for summary in summaries])
    return f"[len:{len(actions)}, μ:{actions.mean():.1f}]"


def format_rollout_table(summaries: list[EpisodeSummary], stats: dict[str, float]) -> str:
    """Maze's ``step|path|value`` table of a rollout."""
    rows = [("rollout_stats    ActionEvents          action|  substep_0/action", _action_summary(summaries))]
    for key in ("median_step_count", "mean_step_count", "total_step_count", "episode_count",
                "std", "mean", "min", "max", "success_rate"):
        if key in stats:
            rows.append((f"rollout_stats    BaseEnvEvents         reward|  {key}", f"{stats[key]:.3f}"))
    path_width = max(len(path) for path, _ in rows) + 2
    value_width = max(16, *(len(value) for _, value in rows))
    lines = [f" step|{'path':<{path_width}}|{'value':>{value_width}}", f"=====|{'=' * path_width}|{'=' * value_width}"]
    lines += [f"    1|{path:<{path_width}}|{value:>{value_width}}" for path, value in rows]
    return "\n".join(lines)

