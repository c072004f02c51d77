"""Rolling a policy out for many episodes, sequentially or over worker processes, and recording them.

Episode ``i`` is always seeded ``seed + i`` and its policy reset with the same seed, so the
records do not depend on the runner or on the number of workers. Each worker writes its own
records atomically, so an interrupt, a failing episode or a dying worker never loses the
finished ones.

With ``runner.store=columnar`` the workers also send each finished episode to this process,
which appends it to a columnar store (:mod:`mazerun.data.store`) in episode-index order, so the
store lists the episodes as the pickles do. The store is written in a scratch directory and
renamed to ``<run>/trajectory_store`` when the run ends (an interrupted run keeps its finished
episodes there too); a write that fails leaves no store at all.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import signal
import statistics
import sys
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from mazerun.acting.envs import check_display_for_human_render, env_spaces, is_minigrid, make_env, resolve_env_id
from mazerun.acting.policies import Policy, build_policy
from mazerun.config.schemas import DEFAULT_ENV_ID, PolicyConfig, RunConfig, RunnerConfig, worker_count
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError, how_it_ended
from mazerun.core.files import BackgroundFlusher, atomic_write_bytes
from mazerun.core.interrupts import HANDLED_SIGNALS
from mazerun.data.records import (
    STATS_FILE,
    STORE_DIR,
    TRAJECTORY_DIR,
    EpisodeBuilder,
    StateTrajectoryRecord,
    record_name,
    write_record,
)

if TYPE_CHECKING:
    from mazerun.data.store import OrderedEpisodes

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
    record: StateTrajectoryRecord | None = None
    """The episode itself, on its way to the parent's columnar store (``runner.store=columnar``)."""


class EpisodeFailed(Exception):
    """An episode raised; carries which one so the user can reproduce it."""

    def __init__(self, index: int, seed: int, cause: str) -> None:
        super().__init__(index, seed, cause)
        self.index, self.seed, self.cause = index, seed, cause

    def __str__(self) -> str:
        return f"episode {self.index} (seed {self.seed}) failed: {self.cause}"


def policy_for(spec: RolloutSpec, env: Any) -> Policy:
    return build_policy(spec.policy, spec.env_id, env.observation_space, env.action_space, input_dir=spec.input_dir)


class EpisodePlayer:
    """One environment and one policy, playing whole episodes by index.

    Records are flushed to disk by a thread while the next episode plays; :meth:`close` (or
    ``flusher.wait()``) returns once every record played so far is in place.
    """

    def __init__(self, spec: RolloutSpec, render_mode: str | None) -> None:
        self.spec = spec
        self.env = make_env(
            spec.env_id, max_episode_steps=spec.runner.max_episode_steps, render_mode=render_mode
        )
        self.policy = policy_for(spec, self.env)
        self.records_dir = spec.run_dir / TRAJECTORY_DIR
        self.videos_dir = spec.run_dir / VIDEO_DIR
        self.minigrid = is_minigrid(spec.env_id)
        self.flusher = BackgroundFlusher()

    def close(self) -> None:
        """Close the env, then put every record written in place (raises what the flusher could not write)."""
        self.env.close()
        self.flusher.close()

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
            record_path = str(write_record(record, self.records_dir, index, self.flusher))
        if frames is not None:
            write_video(frames, video_path(self.videos_dir, index, seed), env.metadata)
        return EpisodeSummary(
            index=index,
            seed=seed,
            steps=len(record),
            episode_return=record.episode_return,
            actions=record.actions,
            success=bool(terminated and reward > 0) if self.minigrid else None,
            record_path=record_path,
            policy=policy.name,
            record=record if self.spec.runner.store else None,
        )


def video_path(videos_dir: Path, index: int, seed: int) -> Path:
    return videos_dir / f"episode_{index:05d}_seed{seed}.mp4"


def _temporary_video_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp.mp4")


def write_video(frames: list[np.ndarray], path: Path, metadata: dict) -> None:
    """Encode RGB frames to MP4 (imageio's bundled ffmpeg), atomically."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_video_path(path)
    try:
        imageio.mimwrite(tmp, frames, fps=metadata.get("render_fps", 30), macro_block_size=1)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# -- the runner ---------------------------------------------------------------------------------


@dataclass
class RolloutResult:
    summaries: list[EpisodeSummary]
    failures: list[str]
    interrupted: KeyboardInterrupt | None
    """The stop that ended the run early (its signal gives the exit code)."""
    abandoned: str | None = None
    """Why the run stopped before its last episode, when it was not an interrupt."""


def _keep(summary: EpisodeSummary, store: OrderedEpisodes | None) -> EpisodeSummary:
    """Hand the episode to the store (if any); the summary the parent keeps drops it."""
    if summary.record is not None:
        if store is not None:
            store.add(summary.index, summary.record)
        summary.record = None
    return summary


def _run_sequential(spec: RolloutSpec, progress: tqdm, store: OrderedEpisodes | None = None) -> RolloutResult:
    if spec.runner.render:
        render_mode: str | None = "human"
    else:
        render_mode = "rgb_array" if spec.runner.record_video else None
    player = EpisodePlayer(spec, render_mode)
    result = RolloutResult([], [], interrupted=None)
    try:
        for index in range(spec.runner.n_episodes):
            interrupts.check()  # a stop whose signal was raised where Python swallowed it
            try:
                result.summaries.append(_keep(player.play(index), store))
            except EpisodeFailed as failure:
                result.failures.append(str(failure))
            progress.update()
    except KeyboardInterrupt as interrupt:
        result.interrupted = interrupt
    finally:
        player.close()
    return result


# -- parallel workers ---------------------------------------------------------------------------
#
# The parent hands each worker one episode index at a time over its own pipe, so it always
# knows which episode a worker holds. A worker that dies (a signal, os._exit, the OOM killer)
# costs only that episode, which a fresh worker plays again; the records of every finished
# episode are already on disk, written atomically by the worker that played it.


Reply = tuple[str, Any]
"""What a worker sends back: ("done", EpisodeSummary), ("failed", message) or ("error", message)."""


def _worker_main(spec: RolloutSpec, connection: Connection, parent_ends: list[Connection]) -> None:
    """A worker's life: play the episode indices the parent sends, one at a time, until it sends None.

    The parent handles Ctrl-C and SIGTERM: a worker finishes the episode in hand so no record
    is lost. It closes the parent's ends of the pipes, which the fork copied, so that when the
    parent is gone its pipe reports end-of-file and the worker ends too.
    """
    for number in HANDLED_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # held by the parent while it forked
    for parent_end in parent_ends:
        parent_end.close()
    if "torch" in sys.modules:  # a trained policy: the forked copy of a running torch thread pool would hang
        sys.modules["torch"].set_num_threads(1)
    try:
        player = EpisodePlayer(spec, render_mode="rgb_array" if spec.runner.record_video else None)
    except Exception as error:
        cause = str(error) if isinstance(error, MazerunError) else f"{type(error).__name__}: {error}"
        connection.send(("error", f"a rollout worker could not start: {cause}"))
        return
    try:
        while (index := connection.recv()) is not None:
            try:
                reply: Reply = ("done", player.play(index))
                player.flusher.wait()  # "done" means its record is on disk: a worker may die after this
            except EpisodeFailed as failure:
                reply = ("failed", str(failure))
            except MazerunError as error:  # e.g. the disk is full: nothing more can be recorded
                reply = ("error", str(error))
            connection.send(reply)
    except (EOFError, OSError):
        pass  # the parent is gone (end-of-file, or the pipe was reset)
    finally:
        player.close()


def _remove_partial_files(spec: RolloutSpec, index: int) -> None:
    """The temporary files of episode ``index``, left by a worker killed while writing them.

    Only the worker that held the episode writes them, and it is gone.
    """
    seed = spec.runner.seed + index
    for leftover in (spec.run_dir / TRAJECTORY_DIR).glob(f".{record_name(index)}.*.tmp"):
        leftover.unlink(missing_ok=True)
    _temporary_video_path(video_path(spec.run_dir / VIDEO_DIR, index, seed)).unlink(missing_ok=True)


@dataclass
class _Worker:
    number: int
    process: BaseProcess
    connection: Connection
    episode: int | None = None
    """The index of the episode it plays, None while it waits for one."""
    hung_up: bool = False
    """Its pipe reported end-of-file: it is ending, and only its exit is still to be seen."""


class _WorkerPool:
    """Fork workers, each holding at most one episode; every one of them is stopped by :meth:`close`."""

    def __init__(self, spec: RolloutSpec) -> None:
        self.spec = spec
        self.context = multiprocessing.get_context("fork")
        self.workers: list[_Worker] = []

    def start(self, number: int) -> None:
        parent_end, worker_end = self.context.Pipe()
        parent_ends = [parent_end, *(worker.connection for worker in self.workers)]
        with interrupts.held():
            process = self.context.Process(
                target=_worker_main, args=(self.spec, worker_end, parent_ends), name=f"rollout-worker-{number}"
            )
            process.start()
            self.workers.append(_Worker(number, process, parent_end))
            worker_end.close()  # the worker holds the only copy: its death shows as end-of-file here

    def busy(self) -> list[_Worker]:
        return [worker for worker in self.workers if worker.episode is not None]

    def idle(self) -> list[_Worker]:
        return [worker for worker in self.workers if worker.episode is None and not worker.hung_up]

    def assign(self, worker: _Worker, index: int) -> bool:
        """Hand episode ``index`` to ``worker``; False if it died before it could take it."""
        if not self._send(worker, index):
            return False
        worker.episode = index
        return True

    @staticmethod
    def _send(worker: _Worker, message: int | None) -> bool:
        try:
            worker.connection.send(message)
        except OSError:
            return False  # it died; its exit is seen through its sentinel
        return True

    def wait(self) -> set[Any]:
        """Block until a worker replies or ends; the connections and sentinels that are ready."""
        watched: list[Any] = [worker.process.sentinel for worker in self.workers]
        watched += [worker.connection for worker in self.workers if not worker.hung_up]
        return set(multiprocessing.connection.wait(watched))

    def collect(self, ready: set[Any]) -> tuple[list[tuple[_Worker, list[Reply]]], list[_Worker]]:
        """The replies of the workers in ``ready``, and the workers that ended, which are forgotten.

        A worker's replies are read before its end is noted: it may send its result and die
        before the parent reads it.
        """
        replies = [
            (worker, self._receive(worker))
            for worker in self.workers
            if worker.connection in ready or worker.process.sentinel in ready
        ]
        ended = [worker for worker in self.workers if worker.process.sentinel in ready]
        for worker in ended:
            worker.process.join()
            worker.connection.close()
            self.workers.remove(worker)
        return replies, ended

    @staticmethod
    def _receive(worker: _Worker) -> list[Reply]:
        replies = []
        try:
            while not worker.hung_up and worker.connection.poll():
                replies.append(worker.connection.recv())
        except (EOFError, OSError):
            worker.hung_up = True
        return replies

    def close(self) -> None:
        """Stop every worker: idle ones are told to end, busy ones (the run stopped early) are killed.

        A killed worker's episode may have left a temporary file, which is removed.
        """
        with interrupts.held():  # a second Ctrl-C here must not leave workers behind
            for worker in self.workers:
                if worker.episode is not None or not self._send(worker, None):
                    worker.process.kill()
            for worker in self.workers:
                worker.process.join(timeout=10)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
                if worker.episode is not None:
                    _remove_partial_files(self.spec, worker.episode)
                worker.connection.close()
            self.workers.clear()


class _ParallelRollout:
    """Episodes handed out to a :class:`_WorkerPool` until all are played or the run stops."""

    def __init__(self, spec: RolloutSpec, progress: tqdm, store: OrderedEpisodes | None = None) -> None:
        self.spec = spec
        self.progress = progress
        self.store = store
        self.pool = _WorkerPool(spec)
        self.pending = deque(range(spec.runner.n_episodes))
        self.result = RolloutResult([], [], interrupted=None)
        self.stopping = False
        """No episode is handed out any more; those in hand finish and write their records."""
        self.killed_a_worker: set[int] = set()
        """Episodes during which a worker died once already."""

    def start(self) -> None:
        for number in range(worker_count(self.spec.runner)):
            self.pool.start(number)

    def run(self) -> None:
        """Hand out episodes and take the replies until no worker holds one."""
        with interrupts.held():
            self._hand_out()
        while self.pool.busy():
            ready = self.pool.wait()  # a Ctrl-C here leaves every reply unread, to be read by the drain
            if not self.stopping:
                interrupts.check()  # a stop whose signal was raised where Python swallowed it
            with interrupts.held():
                replies, ended = self.pool.collect(ready)
                for worker, messages in replies:
                    for message in messages:
                        self._take(worker, message)
                for worker in ended:
                    self._bury(worker)
                self._hand_out()

    def stop(self) -> None:
        self.stopping = True
        self.pending.clear()

    def _hand_out(self) -> None:
        for worker in self.pool.idle():
            if self.stopping or not self.pending:
                return
            index = self.pending.popleft()
            if not self.pool.assign(worker, index):
                self.pending.appendleft(index)

    def _take(self, worker: _Worker, reply: Reply) -> None:
        kind, payload = reply
        if kind == "error":
            raise MazerunError(payload)
        worker.episode = None
        if kind == "done":
            self.result.summaries.append(_keep(payload, self.store))
        else:
            self.result.failures.append(payload)
        self.progress.update()

    def _bury(self, worker: _Worker) -> None:
        """Report a worker that ended on its own, once, and play its episode again in a fresh worker.

        An episode that kills a second worker would kill every worker: the run stops instead.
        """
        lost = worker.episode
        how, short = how_it_ended(worker.process.exitcode)
        who = f"worker {worker.number} (pid {worker.process.pid}) {how}"
        if lost is None:
            log.warning("%s between episodes; no episode was lost", who)
        else:
            _remove_partial_files(self.spec, lost)
            seed = self.spec.runner.seed + lost
            if self.stopping:
                log.warning("%s during episode %d (seed %d); the run is stopping, so it is not played again",
                            who, lost, seed)
            elif lost in self.killed_a_worker:  # said once, by the error that ends the run
                self.result.abandoned = f"episode {lost} (seed {seed}) killed its worker twice ({short})"
                self.stop()
            else:
                log.warning("%s during episode %d; playing it again in a fresh worker", who, lost)
                self.killed_a_worker.add(lost)
                self.pending.appendleft(lost)
        if self.pending and not self.stopping:
            self.pool.start(worker.number)


def _run_parallel(spec: RolloutSpec, progress: tqdm, store: OrderedEpisodes | None = None) -> RolloutResult:
    rollout = _ParallelRollout(spec, progress, store)
    try:
        try:
            rollout.start()
            rollout.run()
        except KeyboardInterrupt as interrupt:
            rollout.result.interrupted = interrupt
            rollout.stop()
            rollout.run()  # the episodes in hand finish and write their records; queued ones are dropped
    finally:
        rollout.pool.close()
    return rollout.result


def run_rollout(config: RunConfig, run_dir: Path) -> dict[str, float]:
    """`run` without an algorithm: the env is the one named, else the checkpoint's (torch_policy) or the exported
    policy's (onnx), else the default."""
    env_id = config.env.name
    if config.policy.name == "onnx" and env_id is None:
        from mazerun.acting.policies.onnx_policy import read_exported

        env_id = read_exported(config.policy.path)["env_id"]
    if config.policy.name == "torch_policy":
        import torch  # imported only for trained policies

        # One small forward pass per step: threads only add overhead. A thread pool started here
        # would also deadlock the forked workers of the parallel runner.
        torch.set_num_threads(1)
        if env_id is None and config.input_dir:
            from mazerun.nn.checkpoint import load_checkpoint

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
    store = None
    if runner.store:
        from mazerun.data.store import OrderedEpisodes, StoreWriter  # torch with it: only when a store is asked for

        store = OrderedEpisodes(StoreWriter(spec.run_dir / STORE_DIR, env_spaces))
    try:
        with tqdm(total=runner.n_episodes, unit="episode", desc="rollout", disable=None) as progress:
            result = (_run_sequential if sequential else _run_parallel)(spec, progress, store)
        if store is not None:
            store.finish() if store.writer.added + len(store.waiting) else store.writer.abort()
    except BaseException:
        if store is not None:
            store.writer.abort()
        raise

    summaries = sorted(result.summaries, key=lambda summary: summary.index)
    stats = rollout_statistics(summaries)
    if summaries:
        print_fn(format_rollout_table(summaries, stats))
        finished = not (result.interrupted is not None or result.failures or result.abandoned)
        write_recording_stats(spec.run_dir, stats, env_id, summaries[0].policy, finished)
    if runner.record_trajectory and summaries:
        log.info("recorded %d episodes to %s", len(summaries), spec.run_dir / TRAJECTORY_DIR)
    if store is not None and summaries:
        log.info("stored %d episodes in %s", len(summaries), spec.run_dir / STORE_DIR)
    if result.interrupted is not None:
        message = f"{result.interrupted or 'stopped'}; {len(summaries)} finished episodes kept in {spec.run_dir}"
        raise interrupts.restated(result.interrupted, message)
    problems = [result.abandoned] if result.abandoned else []
    if result.failures:
        shown = "; ".join(result.failures[:3])
        more = f" (and {len(result.failures) - 3} more)" if len(result.failures) > 3 else ""
        problems.append(f"{len(result.failures)} of {runner.n_episodes} episodes failed: {shown}{more}")
    if problems:
        raise MazerunError(
            f"{'; '.join(problems)}; {len(summaries)} finished episodes are kept in {spec.run_dir}"
        )
    return stats


def rollout_statistics(summaries: Iterable[EpisodeSummary]) -> dict[str, float]:
    """The numbers behind Maze's rollout table, also written to rollout_stats.json."""
    summaries = list(summaries)
    return episode_statistics([summary.steps for summary in summaries],
                              [summary.episode_return for summary in summaries],
                              [summary.success for summary in summaries if summary.success is not None])


def episode_statistics(steps: list[int], returns: list[float], successes: list[bool]) -> dict[str, float]:
    """Counts, lengths and returns of a set of episodes (and their success rate where they report one)."""
    stats: dict[str, float] = {
        "episode_count": len(steps),
        "total_step_count": int(sum(steps)),
        "mean_step_count": float(np.mean(steps)) if steps else 0.0,
        "median_step_count": float(statistics.median(steps)) if steps else 0.0,
        "mean": float(np.mean(returns)) if returns else 0.0,
        "std": float(np.std(returns)) if returns else 0.0,
        "min": float(np.min(returns)) if returns else 0.0,
        "max": float(np.max(returns)) if returns else 0.0,
    }
    if successes:
        stats["success_rate"] = float(np.mean(successes))
    return stats


def write_recording_stats(run_dir: Path, stats: dict[str, float], env_id: str, policy: str, finished: bool) -> None:
    """``rollout_stats.json``: a recording's statistics; with ``finished`` it counts as a finished recording."""
    described = {**stats, "env_id": env_id, "policy": policy, "finished": finished}
    atomic_write_bytes(Path(run_dir) / STATS_FILE, json.dumps(described, indent=2).encode())


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

