"""Trajectory records: one pickled :class:`StateTrajectoryRecord` per episode.

A record stores columns (arrays over time), not one Python object per step, so that
loading thousands of episodes into tensors is a handful of concatenations. Iterating a
record still yields per-step :class:`StateRecord` views for users who expect Maze's API.

Layout of one episode of ``T`` steps::

    observations    T + 1 entries (the final observation is kept); a dict of arrays for dict spaces
    actions         T entries, the actions executed
    rewards         T entries (float64)
    expert_actions  T entries or None: the expert's label of each state (DAgger), whoever acted

Records are loaded with a restricted unpickler that builds nothing but records, numpy arrays
and plain Python values: a ``.pkl`` from elsewhere cannot run code when it is read (it can
still hold wrong data, which the dataset checks catch). Each episode is one file named by its
index in the recording, ``episode_00000017.pkl``, so every load sees the same order.
"""

from __future__ import annotations

import io
import json
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
"""Bumped whenever the layout of :class:`StateTrajectoryRecord` changes incompatibly (a new
optional column with a default, like ``expert_actions``, is compatible: older files still load)."""

TRAJECTORY_DIR = "trajectory_data"
"""Where a run keeps its records."""
STORE_DIR = "trajectory_store"
"""Where a recording keeps its columnar store (``runner.store=columnar``; :mod:`mazerun.store`)."""
STATS_FILE = "rollout_stats.json"
"""Written once a recording ends: its presence marks a recording that finished."""

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
    expert_actions: np.ndarray | None = None

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
        if self.expert_actions is not None and len(self.expert_actions) != steps:
            raise ValueError(f"{len(self.expert_actions)} expert actions for {steps} actions")
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
        self._expert_actions: list[Any] = []

    def __len__(self) -> int:
        return len(self._actions)

    def add(self, action: Any, reward: float, next_observation: Any, expert_action: Any = None) -> None:
        self._actions.append(action)
        self._rewards.append(float(reward))
        self._observations.append(next_observation)
        if expert_action is not None:
            self._expert_actions.append(expert_action)

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
            expert_actions=np.asarray(self._expert_actions) if self._expert_actions else None,
        )


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the whole file or none of it, also after a crash.

    The bytes go to a temporary file beside ``path``, which is flushed to disk and renamed over
    ``path``; the directory is flushed too, so the rename itself survives a power cut.
    """
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_name, path)
        _fsync_directory(path.parent)
    except BaseException as error:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise MazerunError(
                f"cannot write {path}: {error.strerror or error}; free disk space, or point "
                "hydra.run.dir at a writable directory"
            ) from None
        raise


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_name(index: int) -> str:
    """The file name of episode ``index`` of a recording; zero-padded so names sort like indices."""
    return f"episode_{index:08d}.pkl"


def write_record(record: StateTrajectoryRecord, directory: Path, index: int) -> Path:
    """Pickle ``record``, episode ``index`` of its recording, into ``directory`` atomically; returns the path."""
    path = Path(directory) / record_name(index)
    atomic_write_bytes(path, cloudpickle.dumps(record))
    return path


_ALLOWED_GLOBALS = {
    ("mazerun.records", "StateTrajectoryRecord"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    *((module, name) for module in ("numpy.core.numeric", "numpy._core.numeric") for name in ("_frombuffer",)),
    *(
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    ),
    *(("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool",
                                        "bytes", "bytearray", "complex")),
    ("_codecs", "encode"),
}
"""Everything a record's pickle may name: the record class, numpy's array and scalar rebuilders, plain builtins."""


class UnsafeRecord(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")


class _RecordUnpickler(pickle.Unpickler):
    """Refuses every global but :data:`_ALLOWED_GLOBALS`, so loading a record cannot call arbitrary code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafeRecord(module, name)
        return super().find_class(module, name)


def load_record_bytes(data: bytes) -> Any:
    """Unpickle ``data`` with the restricted unpickler (raises :class:`UnsafeRecord` on anything else)."""
    return _RecordUnpickler(io.BytesIO(data)).load()


def _read_record(path: Path) -> StateTrajectoryRecord:
    try:
        record = load_record_bytes(path.read_bytes())
    except UnsafeRecord as unsafe:
        raise MazerunError(
            f"refusing to load {path}: it asks to run {unsafe}, which no trajectory record holds; "
            "it was not written by mazerun (load only records you recorded or trust)"
        ) from None
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


def load_records(
    dir_or_file: str | Path | Sequence[str | Path], max_episodes: int | None = None
) -> list[StateTrajectoryRecord]:
    """Load every record (or the first ``max_episodes``) from a file, a directory of ``*.pkl`` files, or a list of either."""
    return [_read_record(path) for path in record_files(dir_or_file)[:max_episodes]]


def finished_recording(trajectory_dir: Path) -> dict | None:
    """The rollout statistics of the recording in ``trajectory_dir`` if it finished, else None."""
    stats_path = trajectory_dir.parent / STATS_FILE
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and stats.get("finished") else None


def find_newest_recording(root: Path = Path("outputs")) -> Path:
    """The ``trajectory_data`` of the newest finished recording of an expert under ``root`` (and ``multirun/``).

    A recording counts once its run wrote ``rollout_stats.json`` with ``finished: true``: a
    rollout still being written, one stopped by Ctrl-C and a ``policy=torch_policy`` watch run
    are never picked. Pass ``runner.dataset.dir_or_file`` to train on any of those.
    """
    candidates = []
    for base in (root, root.parent / "multirun"):
        if not base.is_dir():
            continue
        found = [*base.glob(f"**/{TRAJECTORY_DIR}"),
                 *(path for path in base.glob(f"**/{STORE_DIR}") if not (path.parent / TRAJECTORY_DIR).is_dir())]
        for path in found:  # a recording's store counts when it wrote no pickles (runner.record_trajectory=false)
            stats = finished_recording(path)
            if stats is not None and not str(stats.get("policy", "")).startswith("torch_policy"):
                candidates.append(path)
    if not candidates:
        raise MazerunError(
            f"no finished expert recording under {root.resolve()}; record some first with "
            "`run env=LunarLander-v3 policy=heuristic`, or set runner.dataset.dir_or_file=<dir>"
        )
    return max(candidates, key=lambda path: (path.parent / STATS_FILE).stat().st_mtime)
