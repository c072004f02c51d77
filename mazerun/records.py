"""Trajectory records: one pickled :class:`StateTrajectoryRecord` per episode.

A record stores columns (arrays over time), not one Python object per step, so that
loading thousands of episodes into tensors is a handful of concatenations. Iterating a
record still yields per-step :class:`StateRecord` views for users who expect Maze's API.

Layout of one episode of ``T`` steps::

    observations  T + 1 entries (the final observation is kept); a dict of arrays for dict spaces
    actions       T entries
    rewards       T entries (float64)
"""

from __future__ import annotations

import os
import pickle
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import cloudpickle
import numpy as np

from mazerun.errors import MazerunError

RECORD_FORMAT_VERSION = 1
"""Bumped whenever the layout of :class:`StateTrajectoryRecord` changes incompatibly."""

Observations = Union[np.ndarray, dict[str, np.ndarray]]


@dataclass(frozen=True)
class StateRecord:
    """One step of an episode: what the agent saw, did and got."""

    observation: Any
    action: Any
    reward: float
    next_observation: Any
    terminated: bool
    """True only on the last step of an episode that ended in a terminal state."""
    truncated: bool
    """True only on the last step of an episode cut off by a time limit."""

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


@dataclass
class StateTrajectoryRecord:
    """One recorded episode, stored column-wise."""

    observations: Observations
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    truncated: bool
    env_id: str
    seed: int | None
    policy: str
    format_version: int = RECORD_FORMAT_VERSION
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def episode_return(self) -> float:
        return float(np.sum(self.rewards))

    def observation_at(self, index: int) -> Any:
        """The observation at ``index`` (0 .. T), as the environment returned it."""
        if isinstance(self.observations, dict):
            return {key: value[index] for key, value in self.observations.items()}
        return self.observations[index]

    def __iter__(self) -> Iterator[StateRecord]:
        last = len(self) - 1
        for t in range(len(self)):
            yield StateRecord(
                observation=self.observation_at(t),
                action=self.actions[t],
                reward=float(self.rewards[t]),
                next_observation=self.observation_at(t + 1),
                terminated=self.terminated and t == last,
                truncated=self.truncated and t == last,
            )

    def check(self) -> None:
        """Raise ``ValueError`` if the columns do not describe one consistent episode."""
        steps = len(self.actions)
        if steps == 0:
            raise ValueError("the episode has no steps")
        if len(self.rewards) != steps:
            raise ValueError(f"{len(self.rewards)} rewards for {steps} actions")
        columns = self.observations if isinstance(self.observations, dict) else {"": self.observations}
        for key, column in columns.items():
            if len(column) != steps + 1:
                name = f"observations[{key!r}]" if key else "observations"
                raise ValueError(f"{name} has {len(column)} entries, expected {steps + 1} (actions + 1)")


class EpisodeBuilder:
    """Collects one episode step by step and turns it into a column-wise record."""

    def __init__(self, first_observation: Any) -> None:
        self._observations = [first_observation]
        self._actions: list[Any] = []
        self._rewards: list[float] = []

    def add(self, action: Any, reward: float, next_observation: Any) -> None:
        self._actions.append(action)
        self._rewards.append(float(reward))
        self._observations.append(next_observation)

    def build(
        self, *, terminated: bool, truncated: bool, env_id: str, seed: int | None, policy: str
    ) -> StateTrajectoryRecord:
        first = self._observations[0]
        if isinstance(first, dict):
            observations: Observations = {
                key: np.asarray([obs[key] for obs in self._observations]) for key in first
            }
        else:
            observations = np.asarray(self._observations)
        return StateTrajectoryRecord(
            observations=observations,
            actions=np.asarray(self._actions),
            rewards=np.asarray(self._rewards, dtype=np.float64),
            terminated=bool(terminated),
            truncated=bool(truncated),
            env_id=env_id,
            seed=seed,
            policy=policy,
        )


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the whole file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_record(record: StateTrajectoryRecord, directory: Path) -> Path:
    """Pickle ``record`` to ``directory/<id>.pkl`` atomically and return the path."""
    path = Path(directory) / f"{record.id}.pkl"
    atomic_write_bytes(path, cloudpickle.dumps(record))
    return path


def _read_record(path: Path) -> StateTrajectoryRecord:
    try:
        with path.open("rb") as handle:
            record = pickle.load(handle)
    except Exception as error:
        raise MazerunError(
            f"cannot read trajectory record {path}: {type(error).__name__}: {error}; "
            "delete the file or record the episodes again"
        ) from None
    if not isinstance(record, StateTrajectoryRecord):
        raise MazerunError(
            f"{path} holds a {type(record).__name__}, not a StateTrajectoryRecord; "
            "point the dataset at mazerun trajectory_data only"
        )
    version = getattr(record, "format_version", None)
    if version != RECORD_FORMAT_VERSION:
        raise MazerunError(
            f"{path} has record format version {version}, this mazerun reads version "
            f"{RECORD_FORMAT_VERSION}; record the episodes again with this version"
        )
    try:
        record.check()
    except ValueError as error:
        raise MazerunError(f"{path} is not a usable episode: {error}") from None
    return record


def record_files(dir_or_file: str | Path | Sequence[str | Path]) -> list[Path]:
    """The record files named by a file, a directory, or a list of either, sorted per directory."""
    if isinstance(dir_or_file, (str, os.PathLike)):
        sources = [dir_or_file]
    else:
        sources = list(dir_or_file)
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(path.glob("*.pkl"))
            if not found:
                raise MazerunError(
                    f"no trajectory records (*.pkl) in {path}; record some with "
                    "`run env=<env> policy=heuristic`"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise MazerunError(f"trajectory data {path} does not exist; check the path")
    return files


def load_records(dir_or_file: str | Path | Sequence[str | Path]) -> list[StateTrajectoryRecord]:
    """Load every record from a file, a directory of ``*.pkl`` files, or a list of either."""
    return [_read_record(path) for path in record_files(dir_or_file)]
