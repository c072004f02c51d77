"""What every bench shares: recording, real `run` commands, evaluation on unseen seeds, the table, the verdict.

A bench is a check: :meth:`Table.exit_code` is non-zero when a row misses its target or a
peer is missing, so a bench run can gate a change like a test.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.metadata
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mazerun.acting.evaluation import evaluate
from mazerun.acting.rollout import rollout
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.data.records import load_records, write_record
from mazerun.nn.checkpoint import load_checkpoint, network_from_checkpoint, resolve_run_dir
from mazerun.nn.models import Vocabulary

D3RLPY_INSTALL = 'pip install -e ".[bench]" && pip install --no-deps "d3rlpy==2.8.1"'
UNSEEN_SEED_OFFSET = 2_000_000
"""Seeds used by neither recordings (0, 1, ...) nor training's evaluations (1_000_000, ...)."""

QUIET = {"print_fn": lambda _: None}


def load_average() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def peer_version(module: str, install: str) -> str | None:
    """The peer library's version, or None when it cannot be imported (said once on stderr): its rows then fail."""
    try:
        imported = importlib.import_module(module)
    except Exception as error:  # an ImportError, or a failure inside the peer's own imports
        print(f"{module} is missing ({type(error).__name__}: {error}); install it: {install}", file=sys.stderr)
        return None
    try:
        return str(getattr(imported, "__version__", None) or importlib.metadata.version(module))
    except importlib.metadata.PackageNotFoundError:
        return "?"


def seconds_to_log_line(run_dir: Path, text: str, launched: float) -> float:
    """Seconds from ``launched`` (``time.time()`` before the command started) to the first run.log line holding ``text``."""
    for line in (Path(run_dir) / "run.log").read_text().splitlines():
        if text in line:
            stamp = datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp() - launched
    raise RuntimeError(f"no line with {text!r} in {run_dir / 'run.log'}")


def run(*overrides: str, cwd: Path, quiet: bool = True) -> float:
    """The real `run <overrides>` in ``cwd``; returns its wall time in seconds (raises if it fails)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mazerun", *overrides], cwd=cwd, text=True,
                            capture_output=quiet, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"run {' '.join(overrides)} failed:\n{result.stderr if quiet else ''}")
    return time.perf_counter() - started


def record(env_id: str, episodes: int, directory: Path, *, seed: int = 0, epsilon: float = 0.0) -> Path:
    """The env's expert for ``episodes`` episodes (seeds ``seed``, ``seed + 1``, ...) into ``directory``."""
    rollout(env_id, PolicyConfig(epsilon=epsilon), RunnerConfig(n_episodes=episodes, seed=seed), directory, **QUIET)
    return directory / "trajectory_data"


def expert_return(env_id: str, episodes: int, directory: Path) -> dict[str, float]:
    """The expert's statistics on the unseen seeds every clone is scored on."""
    return rollout(env_id, PolicyConfig(), RunnerConfig(n_episodes=episodes, seed=UNSEEN_SEED_OFFSET,
                                                        record_trajectory=False), directory, **QUIET)


def labelled_subset(source: Path, labels: int, directory: Path) -> Path:
    """Whole expert episodes from ``source`` up to ``labels`` steps, the last one cut to fit."""
    left = labels
    for index, episode in enumerate(load_records(source)):
        if left <= 0:
            break
        if len(episode) > left:  # cut: a time limit, as far as the data is concerned
            observations = episode.observations  # MiniGrid's: a dict of columns (image, direction, mission)
            episode.observations = ({key: column[: left + 1] for key, column in observations.items()}
                                    if isinstance(observations, dict) else observations[: left + 1])
            episode.actions, episode.rewards = episode.actions[:left], episode.rewards[:left]
            episode.terminated, episode.truncated = False, True
        write_record(episode, directory, index)
        left -= len(episode)
    if left > 0:
        raise RuntimeError(f"{source} holds {labels - left} expert steps, fewer than the {labels} asked for")
    return directory


def evaluate_run(run_dir: Path, episodes: int, checkpoint_name: str = "best.pt") -> dict[str, float]:
    """Greedy episodes of a run's checkpoint on the unseen seeds (a pipeline run: its last stage)."""
    checkpoint = load_checkpoint(resolve_run_dir(run_dir) / checkpoint_name)
    vocabulary = Vocabulary.from_list(checkpoint.vocabulary) if checkpoint.vocabulary else None
    return evaluate(network_from_checkpoint(checkpoint), checkpoint.env_id, episodes,
                    observation_space=checkpoint.observation_space, vocabulary=vocabulary, device="cpu",
                    seed_offset=UNSEEN_SEED_OFFSET).metrics()


def d3rlpy_dataset(data_dir: Path, action_size: int | None) -> Any:
    """Our records as d3rlpy's ``MDPDataset``.

    d3rlpy stores T observations per episode and never samples the last step of a timed-out
    episode (it has no next observation). A truncated episode therefore gets its final
    observation appended as one extra, never-sampled step, so its real last step bootstraps from
    it as in mazerun; a terminated one keeps its T steps with the terminal flag. ``action_size``
    None: the records' actions are a Box's vectors (d3rlpy's continuous action space).
    """
    import d3rlpy
    import numpy as np

    observations, actions, rewards, terminals, timeouts = [], [], [], [], []
    for record in load_records(data_dir):
        steps = len(record)
        extra = 0 if record.terminated else 1
        observations.append(np.asarray(record.observations[: steps + extra], dtype=np.float32))
        actions.append(np.concatenate([record.actions, np.zeros((extra, *record.actions.shape[1:]),
                                                                dtype=record.actions.dtype)]))
        rewards.append(np.concatenate([record.rewards, np.zeros(extra)]).astype(np.float32))
        end = np.zeros(steps + extra, dtype=np.float32)
        end[-1] = 1.0
        terminals.append(end if record.terminated else np.zeros_like(end))
        timeouts.append(np.zeros_like(end) if record.terminated else end)
    with contextlib.redirect_stdout(io.StringIO()):  # d3rlpy logs through structlog to stdout
        return d3rlpy.dataset.MDPDataset(
            np.concatenate(observations), np.concatenate(actions), np.concatenate(rewards)[:, None],
            np.concatenate(terminals), np.concatenate(timeouts),
            action_space=(d3rlpy.constants.ActionSpace.CONTINUOUS if action_size is None
                          else d3rlpy.constants.ActionSpace.DISCRETE), action_size=action_size,
        )


def peer_return(act: Callable[[Any], Any], env_id: str, episodes: int) -> float:
    """A peer's greedy policy (numpy observations -> numpy actions): its mean return on the unseen seeds every
    clone of ours is scored on (NaN for 0 episodes)."""
    import torch

    from mazerun.acting.envs import env_spaces

    if not episodes:
        return float("nan")
    return evaluate(lambda observations: torch.as_tensor(act(observations.cpu().numpy())), env_id, episodes,
                    observation_space=env_spaces(env_id)[0], vocabulary=None, device="cpu",
                    seed_offset=UNSEEN_SEED_OFFSET).metrics()["mean_return"]


def d3rlpy_fit(config: Any, data_dir: Path, budgets: list[int], *, env_id: str, eval_episodes: int = 0,
               threads: int = 0) -> dict[int, tuple[float, float]]:
    """d3rlpy's learner of ``config`` fitted on our records in ``data_dir`` up to each of ``budgets`` updates
    (call it in a worker process, after ``d3rlpy.seed``).

    Returns, per budget, the seconds ``fit()`` alone took to get there (the dataset is built and
    the networks created before the clock starts) and the mean greedy return over
    ``eval_episodes`` unseen seeds (NaN for 0).
    """
    import d3rlpy
    import gymnasium as gym
    import torch

    from mazerun.acting.envs import env_spaces

    if threads:
        torch.set_num_threads(threads)
    action_space = env_spaces(env_id)[1]
    dataset = d3rlpy_dataset(data_dir, int(action_space.n) if isinstance(action_space, gym.spaces.Discrete) else None)
    learner = config.create(device=False)
    results, done, seconds = {}, 0, 0.0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        learner.build_with_dataset(dataset)
        for budget in sorted(budgets):
            started = time.perf_counter()
            learner.fit(dataset, n_steps=budget - done, n_steps_per_epoch=budget - done, show_progress=False,
                        logger_adapter=d3rlpy.logging.NoopAdapterFactory(), save_interval=10**9)
            seconds += time.perf_counter() - started
            done = budget
            results[budget] = (seconds, peer_return(learner.predict, env_id, eval_episodes))
    return results


def d3rlpy_run(algorithm: str, data_dir: Path, budgets: list[int], *, seed: int, threads: int,
               hidden_units: tuple[int, ...], activation: str, eval_episodes: int = 0, env_id: str = "LunarLander-v3",
               lr: float = 3e-4, batch_size: int = 256) -> dict[int, tuple[float, float]]:
    """d3rlpy's DiscreteCQL (alpha 1, double DQN, Huber TD loss, hard target copy every 1000 updates,
    gamma 0.99) or DiscreteBC, as :func:`d3rlpy_fit` fits them (run it in a worker process)."""
    import d3rlpy

    d3rlpy.seed(seed)
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=list(hidden_units), activation=activation)
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    if algorithm == "cql":
        config: Any = d3rlpy.algos.DiscreteCQLConfig(batch_size=batch_size, learning_rate=lr, gamma=0.99, alpha=1.0,
                                                     target_update_interval=1000, encoder_factory=encoder,
                                                     observation_scaler=scaler)
    else:
        config = d3rlpy.algos.DiscreteBCConfig(batch_size=batch_size, learning_rate=lr, encoder_factory=encoder,
                                               observation_scaler=scaler)
    return d3rlpy_fit(config, data_dir, budgets, env_id=env_id, eval_episodes=eval_episodes, threads=threads)


@dataclass
class Row:
    measure: str
    ours: Any
    peer: Any
    target: str
    passed: bool | None
    """None: an informative row without a target."""


class Table:
    """Rows of ``measure | ours | peer | ratio | target | verdict``, printed once, judged once."""

    def __init__(self, title: str, peer_name: str = "peer") -> None:
        self.title, self.peer_name = title, peer_name
        self.rows: list[Row] = []

    def add(self, measure: str, ours: Any, peer: Any, target: str = "", passed: bool | None = None) -> None:
        if isinstance(peer, str) and target:
            passed = False  # a missing peer is a failed check, not a skipped one
        self.rows.append(Row(measure, ours, peer, target, passed))

    @staticmethod
    def _cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:>12.4g}"
        return f"{'-' if value is None else str(value):>12}"

    def render(self) -> str:
        width = max([46, *(len(row.measure) + 1 for row in self.rows)])
        target_width = max([26, *(len(row.target) + 1 for row in self.rows)])
        header = f"{'measure':<{width}}|{'ours':>12}|{self.peer_name:>12}|{'ratio':>8}|{'target':>{target_width}}|"
        lines = ["", self.title, header, "-" * (len(header) + 6)]
        for row in self.rows:
            # a ratio only means something between two positive numbers (rates, times, returns above 0)
            numbers = all(isinstance(value, (int, float)) and value > 0 for value in (row.ours, row.peer))
            ratio = f"{row.ours / row.peer:>7.2f}x" if numbers else f"{'-':>8}"
            verdict = "" if row.passed is None else ("PASS" if row.passed else "FAIL")
            lines.append(f"{row.measure:<{width}}|{self._cell(row.ours)}|{self._cell(row.peer)}|{ratio}|"
                         f"{row.target:>{target_width}}| {verdict}")
        return "\n".join(lines)

    def exit_code(self) -> int:
        return 1 if any(row.passed is False for row in self.rows) else 0
