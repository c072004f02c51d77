"""D4RL-style datasets of our own, made from one SAC run: random, medium, medium-replay and expert.

D4RL's MuJoCo datasets come from a SAC expert: ``expert`` is that policy's episodes,
``medium`` the episodes of a policy stopped at about a third of the expert's return,
``medium-replay`` the replay buffer up to that policy, and ``random`` uniformly random
actions. Scores on them are reported normalised, 100 x (return - random) / (expert - random).
Here the same four come from a SAC run of this tool (``run algorithm=sac``), which keeps its
policy at every report (``snapshots/step_<N>.pt``) and its replay buffer in ``last.pt``:

- ``expert``: greedy episodes of the run's ``best.pt``;
- ``medium``: greedy episodes of the snapshot whose evaluation return is nearest to a third of
  the way from the random policy's return to the best one (the earliest of equals; not the
  untrained one of step 0, which would leave medium-replay empty);
- ``medium-replay``: every transition the run collected up to that snapshot's step, cut into
  episodes where an episode terminated or its env copy was reset;
- ``random``: uniformly random actions.

Each lands in ``<out>/<name>/trajectory_data`` as a recording (``rollout_stats.json`` beside it),
so ``runner.dataset.dir_or_file=<out>/medium`` trains on it and ``python -m mazerun.datasets
export <out>/medium/trajectory_data medium.h5`` (or ``minari:<id>``) exports it.
``<out>/references.json`` holds the reference returns (random, expert) and each dataset's
size, mean return and normalised score.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mazerun.acting.rollout import episode_statistics, rollout, write_recording_stats
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write_bytes
from mazerun.data.records import TRAJECTORY_DIR, StateTrajectoryRecord, write_record
from mazerun.nn.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, TRAINING_STATE, load_checkpoint, snapshots
from mazerun.training.metrics import evaluation_curve

log = logging.getLogger(__name__)

DATASETS = ("random", "medium", "medium-replay", "expert")
REPLAY_POLICY = "sac-replay"
"""The policy medium-replay's episodes name: the SAC run's own actions, random ones at first."""
REFERENCES_FILE = "references.json"
MEDIUM_SHARE = 1 / 3
"""A medium policy's normalised score as a share of the expert's, as D4RL's."""


def normalized_score(episode_return: float, random_return: float, expert_return: float) -> float:
    """D4RL's normalised score: 0 for the random policy's return, 100 for the expert's."""
    return 100.0 * (episode_return - random_return) / (expert_return - random_return)


def pick_medium(run_dir: Path, random_return: float) -> tuple[int, Path, float]:
    """The snapshot (step, path, evaluation return) nearest to a normalised score of a third of the best's.

    A third of the way from the random policy's return to the run's best evaluation return: a
    third of the expert's return where random scores about 0 (Hopper), and still a middling
    policy where every return is negative (Pendulum).
    """
    kept = snapshots(run_dir)
    steps, returns = evaluation_curve(run_dir)
    evaluated = {step: value for step, value in zip(steps, returns) if step in kept and step > 0}  # 0: untrained
    if not evaluated:
        raise MazerunError(f"{run_dir}: none of its snapshots/step_<N>.pt has an evaluation in metrics.csv")
    target = random_return + MEDIUM_SHARE * (max(returns) - random_return)
    step = min(evaluated, key=lambda candidate: (abs(evaluated[candidate] - target), candidate))
    return step, kept[step], evaluated[step]


def replay_episodes(buffer: dict[str, Any], n_envs: int, transitions: int, env_id: str) -> list[StateTrajectoryRecord]:
    """The first ``transitions`` rows of a saved replay buffer as episodes.

    The off-policy loop adds one row per env copy at every step, so copy ``c``'s transitions are
    rows ``c, c + n_envs, ...`` in time order. An episode ends where a row is marked done (it
    terminated) or where the copy's next row starts elsewhere than this row's next observation
    (its time limit reset it); an episode the cut at ``transitions`` leaves open ends truncated.
    """
    observations, next_observations = buffer["observations"].numpy(), buffer["next_observations"].numpy()
    actions, rewards, dones = buffer["actions"].numpy(), buffer["rewards"].numpy(), buffer["dones"].numpy()
    episodes: list[tuple[int, StateTrajectoryRecord]] = []
    for copy in range(n_envs):
        rows = np.arange(copy, transitions, n_envs)
        start = 0
        for position, row in enumerate(rows):
            last = position == len(rows) - 1
            terminated = bool(dones[row])
            reset = not last and not np.array_equal(observations[rows[position + 1]], next_observations[row])
            if terminated or reset or last:
                chosen = rows[start:position + 1]
                episodes.append((int(chosen[0]), StateTrajectoryRecord(
                    observations=np.concatenate([observations[chosen], next_observations[row][None]]),
                    actions=actions[chosen], rewards=rewards[chosen].astype(np.float64), terminated=terminated,
                    truncated=not terminated, env_id=env_id, seed=None, policy=REPLAY_POLICY)))
                start = position + 1
    return [record for _, record in sorted(episodes, key=lambda pair: pair[0])]  # in the order they began


def _write_recording(records: list[StateTrajectoryRecord], run_dir: Path, env_id: str) -> dict[str, float]:
    """Records as a finished recording under ``run_dir``: trajectory_data, then its rollout_stats.json."""
    for index, record in enumerate(records):
        write_record(record, run_dir / TRAJECTORY_DIR, index)
    stats = episode_statistics([len(record) for record in records], [record.episode_return for record in records],
                               [])
    write_recording_stats(run_dir, stats, env_id, REPLAY_POLICY, finished=True)
    return stats


def make_d4rl_datasets(sac_run: str | Path, out: str | Path, *, episodes: int = 100, seed: int = 0,
                       print_fn: Any = print) -> dict[str, Any]:
    """The four datasets of ``sac_run`` under ``out``, and ``references.json``; returns what it holds."""
    sac_run, out = Path(sac_run), Path(out)
    last = load_checkpoint(sac_run, prefer=(LAST_CHECKPOINT,))
    buffer = last.extra.get(TRAINING_STATE, {}).get("buffer")
    if last.algorithm != "sac" or buffer is None:
        raise MazerunError(f"{sac_run} is a {last.algorithm} run without a replay buffer; make the datasets from a "
                           "run of `run algorithm=sac`")
    if out.exists() and any(out.iterdir()):
        raise MazerunError(f"{out} is not empty; choose a new --out for the datasets")
    if int(last.extra["step"]) > int(buffer["capacity"]):  # the buffer wrapped over its first rows
        raise MazerunError(f"the replay buffer of {sac_run} ({buffer['capacity']} transitions) wrapped before the "
                           f"run's {last.extra['step']} steps ended, so medium-replay's first transitions are gone; "
                           "train with algorithm.buffer_size at least algorithm.total_steps")
    if not snapshots(sac_run):
        raise MazerunError(f"{sac_run} kept no policy snapshots (snapshots/step_<N>.pt): it was trained before SAC "
                           "kept them; train it again with `run algorithm=sac`")
    env_id = last.env_id
    runner = RunnerConfig(type="sequential", n_episodes=episodes, seed=seed)
    quiet = lambda _: None  # noqa: E731 -- each rollout's table would bury the summary
    stats: dict[str, dict[str, float]] = {}
    stats["random"] = rollout(env_id, PolicyConfig(name="random"), runner, out / "random", print_fn=quiet)
    medium_step, medium_path, medium_eval = pick_medium(sac_run, stats["random"]["mean"])
    n_envs = len(last.extra[TRAINING_STATE]["envs"]["episodes"])  # each env copy's running episode
    stats["medium"] = rollout(env_id, PolicyConfig(name="torch_policy"), runner, out / "medium",
                              input_dir=str(medium_path), print_fn=quiet)
    stats["medium-replay"] = _write_recording(replay_episodes(buffer, n_envs, medium_step, env_id),
                                              out / "medium-replay", env_id)
    stats["expert"] = rollout(env_id, PolicyConfig(name="torch_policy"), runner, out / "expert",
                              input_dir=str(sac_run / BEST_CHECKPOINT), print_fn=quiet)
    random_return, expert_return = stats["random"]["mean"], stats["expert"]["mean"]
    references = {
        "env_id": env_id, "source_run": str(sac_run), "random_return": random_return, "expert_return": expert_return,
        "medium_policy": {"snapshot": str(medium_path), "step": medium_step, "evaluation_return": medium_eval},
        "datasets": {name: {"episodes": int(stats[name]["episode_count"]),
                            "transitions": int(stats[name]["total_step_count"]),
                            "mean_return": float(stats[name]["mean"]),
                            "normalized_score": normalized_score(stats[name]["mean"], random_return, expert_return)}
                     for name in DATASETS},
    }
    atomic_write_bytes(out / REFERENCES_FILE, json.dumps(references, indent=2).encode())
    for name in DATASETS:
        entry = references["datasets"][name]
        print_fn(f"{name:>14}: {entry['episodes']:5d} episodes, {entry['transitions']:8d} transitions, "
                 f"mean return {entry['mean_return']:9.1f}, normalised score {entry['normalized_score']:6.1f}")
    return references

