"""A columnar record store on disk: episodes too many for RAM, trained on through memory maps.

Pickled records stay the default format; a store is how large data is kept and trained on. It
is a directory::

    index.json            format marker and version, env id, counts, every column's dtype and shape,
                          the policies' names and the action range (written last, atomically)
    observations.bin      (N + E, *obs_shape)  each episode's T + 1 observations, episodes end to end
    actions.bin           (N, *action_shape)   one row per step
    rewards.bin           (N,)
    expert_actions.bin    (N, *action_shape)   only when every episode carries the expert's labels
    episode_length.bin    (E,) int64           the episode index: steps of each episode, in order,
    episode_terminated.bin, episode_truncated.bin (E,) uint8, episode_seed.bin (E,) int64 (-1: none),
    episode_policy.bin    (E,) int32           an index into index.json's "policies"

Each ``.bin`` file is one raw C-order array, read with ``numpy.memmap``: training gathers the
rows of a batch from the page cache, so resident memory does not grow with the store (the
kernel keeps what fits of it cached, outside the process's anonymous memory).

A new store is written into a scratch directory beside its destination, flushed to disk and
renamed into place, so it exists whole or not at all. Appending (a sweep's recordings into one
store) writes past the end of every column file and then replaces ``index.json``; a failed
append (a full disk, Ctrl-C) truncates the columns back, and ``index.json`` is what readers
trust. Opening a store checks its format version, that every column file holds exactly the
rows the index says and that the episode index hashes as when it was written; training then
checks every value against the env (:meth:`ColumnarStore.check_spaces`), as records are checked.

MiniGrid's dict observations (an image, a direction and a mission string) are refused: they
train from trajectory_data, where a BabyAI dataset of 10k demos is about 50k steps anyway.

Conversion lives in :mod:`mazerun.datasets`, which reads every source format:
``python -m mazerun.datasets convert SOURCE... DEST`` writes a store from trajectory_data, record
files, HDF5 files, ``minari:<id>`` or other stores; ``append`` adds them to an existing store;
``info`` describes one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write_bytes, fsync_directory
from mazerun.data.records import (
    NO_LABEL,
    StateTrajectoryRecord,
    read_regular_file,
)

log = logging.getLogger(__name__)

STORE_FORMAT = "mazerun-columnar"
STORE_VERSION = 1
"""Bumped whenever the layout changes incompatibly; a store of another version is refused."""
INDEX_FILE = "index.json"
STEP_COLUMNS = ("actions", "rewards", "expert_actions")
EPISODE_COLUMNS = {
    "episode_length": np.int64, "episode_terminated": np.uint8, "episode_truncated": np.uint8,
    "episode_seed": np.int64, "episode_policy": np.int32,
}
NO_SEED = -1
STATS_CHUNK = 1 << 18
"""Rows per chunk when statistics stream over a store."""


FINGERPRINT = "episode_index_sha256"
"""index.json's hash of the episode columns: lengths swapped between episodes keep every sum and size
right and would pair each episode's steps with another's observations; the hash tells. Stores
written before it existed have none and open unchecked."""


def episode_fingerprint(columns: dict[str, np.ndarray]) -> str:
    """The SHA-256 of the episode columns, in :data:`EPISODE_COLUMNS` order (small: one row per episode)."""
    digest = hashlib.sha256()
    for name in EPISODE_COLUMNS:
        digest.update(np.ascontiguousarray(columns[name]).tobytes())
    return digest.hexdigest()


def is_store(source: str | Path) -> bool:
    """A directory holding a store's ``index.json`` (any version: opening it says what is wrong)."""
    path = Path(str(source))
    return path.is_dir() and (path / INDEX_FILE).is_file()


def _fail_write(path: Path, error: OSError) -> MazerunError:
    return MazerunError(
        f"cannot write {path}: {error.strerror or error}; free disk space, or write the store to another directory"
    )


def _column_spec(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": array.dtype.str, "shape": list(array.shape[1:])}


# -- reading ---------------------------------------------------------------------------------


class ColumnarStore:
    """An opened store: its index, its episode index in memory (small) and every column memory-mapped."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self.index = index
        self.env_id: str = index["env_id"]
        self.n_episodes: int = int(index["episodes"])
        self.n_transitions: int = int(index["transitions"])
        self.policies: list[str] = list(index["policies"])
        self.columns: dict[str, np.ndarray] = {}
        specs = index["columns"]
        for name in ("observations", "actions", "rewards", *EPISODE_COLUMNS):
            if name not in specs:
                raise KeyError(f"columns.{name}")
        for name, dtype in EPISODE_COLUMNS.items():
            if np.dtype(specs[name]["dtype"]) != np.dtype(dtype) or specs[name]["shape"]:
                raise ValueError(f"{name} is {specs[name]}, expected {np.dtype(dtype)} with one value per episode")
        for name, spec in specs.items():
            if np.dtype(spec["dtype"]).kind not in "biuf" or any(int(dim) < 0 for dim in spec["shape"]):
                raise ValueError(f"column {name} is {spec}, expected numbers of a non-negative shape")
            self.columns[name] = self._map(name, np.dtype(spec["dtype"]), tuple(spec["shape"]), self.rows(name))
        self.lengths = np.asarray(self.columns["episode_length"], dtype=np.int64)
        if int(self.lengths.sum()) != self.n_transitions or (self.lengths <= 0).any():
            raise MazerunError(
                f"store {self.path}: the episode lengths add up to {int(self.lengths.sum())} steps and the index "
                f"says {self.n_transitions}; the store is damaged: convert the records again"
            )
        fingerprint = index.get(FINGERPRINT)
        if fingerprint is not None and fingerprint != episode_fingerprint(self.columns):
            raise MazerunError(
                f"store {self.path}: the episode index (episode_*.bin) differs from the one {INDEX_FILE} was written "
                "with (episode lengths reordered or edited); the store is damaged: convert the records again"
            )
        policies = np.asarray(self.columns["episode_policy"])
        if self.n_episodes and (policies.min() < 0 or policies.max() >= len(self.policies)):
            raise MazerunError(f"store {self.path}: episode_policy.bin names policies beyond the {len(self.policies)} "
                               f"of {INDEX_FILE}; the store is damaged: convert the records again")
        self.terminated = np.asarray(self.columns["episode_terminated"], dtype=bool)
        self.first_transition = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    @classmethod
    def open(cls, path: str | Path) -> ColumnarStore:
        path = Path(path)
        try:
            index = json.loads(read_regular_file(path / INDEX_FILE, "store index", "convert the records again"))
        except ValueError as error:
            raise MazerunError(f"store {path}: {INDEX_FILE} is not JSON ({error}); convert the records again") from None
        if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
            raise MazerunError(f"{path / INDEX_FILE} is not a mazerun columnar store index; "
                               "write stores with python -m mazerun.datasets convert")
        version = index.get("version")
        if version != STORE_VERSION:
            raise MazerunError(
                f"store {path} has format version {version} and this mazerun reads version {STORE_VERSION}; "
                "convert its records again with this mazerun (python -m mazerun.datasets convert)"
            )
        try:
            return cls(path, index)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as error:
            raise MazerunError(f"store {path}: {INDEX_FILE} is damaged ({type(error).__name__}: {error}); "
                               "convert the records again") from None

    def rows(self, name: str) -> int:
        if name == "observations":
            return self.n_transitions + self.n_episodes
        if name in EPISODE_COLUMNS:
            return self.n_episodes
        return self.n_transitions

    def _map(self, name: str, dtype: np.dtype, shape: tuple[int, ...], rows: int) -> np.ndarray:
        file = self.path / f"{name}.bin"
        row_bytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        try:
            size = file.stat().st_size
        except OSError:
            raise MazerunError(f"store {self.path} lacks its column {file.name}; convert the records again") from None
        if size != rows * row_bytes:
            raise MazerunError(
                f"store {self.path}: column {file.name} holds {size / row_bytes:g} rows and the index says {rows} "
                "(the columns disagree in length); the store is damaged: convert the records again"
            )
        # copy-on-write: pages are read from the file (the page cache), never written back; torch can wrap it
        return np.memmap(file, dtype=dtype, mode="c", shape=(rows, *shape))

    def __len__(self) -> int:
        return self.n_transitions

    @property
    def has_labels(self) -> bool:
        return "expert_actions" in self.columns

    def episode(self, number: int) -> StateTrajectoryRecord:
        """Episode ``number`` as a record, copied into memory."""
        start, length = int(self.first_transition[number]), int(self.lengths[number])
        first_observation = start + number
        seed = int(self.columns["episode_seed"][number])
        labels = self.columns.get("expert_actions")
        return StateTrajectoryRecord(
            observations=np.array(self.columns["observations"][first_observation:first_observation + length + 1]),
            actions=np.array(self.columns["actions"][start:start + length]),
            rewards=np.array(self.columns["rewards"][start:start + length]),
            terminated=bool(self.terminated[number]),
            truncated=bool(self.columns["episode_truncated"][number]),
            env_id=self.env_id, seed=None if seed == NO_SEED else seed,
            policy=self.policies[int(self.columns["episode_policy"][number])],
            expert_actions=None if labels is None else np.array(labels[start:start + length]),
        )

    def iter_records(self, max_episodes: int | None = None) -> Iterator[StateTrajectoryRecord]:
        for number in range(min(self.n_episodes, max_episodes or self.n_episodes)):
            yield self.episode(number)

    def records(self, max_episodes: int | None = None) -> list[StateTrajectoryRecord]:
        """The episodes in memory, for the trainers that need them whole (PPO's demonstrations, a population)."""
        return list(self.iter_records(max_episodes))

    def check_spaces(self, observation_space: Any, action_space: Any) -> None:
        """The columns against the env's spaces: shapes and dtypes from the index, then every value.

        The values are scanned in chunks of :data:`STATS_CHUNK` rows (a few seconds for 50M
        transitions, read from the page cache), with the checks records get: an action index out
        of range or a NaN is named here, by column and row, not by a torch error or a NaN loss later.
        """
        import gymnasium as gym

        from mazerun.data.tensors import column_problem, describe_space, finite_problem

        def refuse(problem: str) -> None:
            raise MazerunError(
                f"store {self.path} (env {self.env_id}) does not match the environment: {problem}; "
                "train on a store of this environment or convert its records again"
            )

        observations = self.index["columns"]["observations"]
        if not isinstance(observation_space, gym.spaces.Box):
            refuse(f"the store holds vector observations and the env observes {describe_space(observation_space)}")
        if tuple(observations["shape"]) != observation_space.shape:
            refuse(f"observations have shape {tuple(observations['shape'])} per step, expected {observation_space.shape}")
        actions = self.index["columns"]["actions"]
        if isinstance(action_space, gym.spaces.Discrete):
            if actions["shape"] or np.dtype(actions["dtype"]).kind not in "iu":
                refuse(f"actions are {np.dtype(actions['dtype'])} of shape {tuple(actions['shape'])}, "
                       f"expected integers from {action_space}")
        elif tuple(actions["shape"]) != action_space.shape:
            refuse(f"actions have shape {tuple(actions['shape'])} per step, expected {action_space.shape}")
        for name, space in (("observations", observation_space), ("actions", action_space),
                            ("rewards", None), ("expert_actions", action_space)):
            column = self.columns.get(name)
            for begin in range(0, 0 if column is None else len(column), STATS_CHUNK):
                chunk = np.asarray(column[begin:begin + STATS_CHUNK])
                problem = (finite_problem(name, chunk, offset=begin, unit="row") if space is None else
                           column_problem(name, chunk, space, len(chunk), offset=begin, unit="row",
                                          ignore=NO_LABEL if name == "expert_actions" else None))
                if problem:
                    raise MazerunError(
                        f"store {self.path}: column {name}.bin does not fit the env {self.env_id}: {problem}; "
                        "the store is damaged or of other data: convert the records again "
                        "(python -m mazerun.datasets convert)"
                    )


def open_store(source: str | Path) -> ColumnarStore:
    return ColumnarStore.open(source)


# -- training: transitions gathered from the memory maps --------------------------------------


def _as_model_dtype(values: torch.Tensor) -> torch.Tensor:
    """What :func:`mazerun.data.tensors.records_to_dataset` makes of a column: float32 floats, int64 integers."""
    if values.is_floating_point():
        return values if values.dtype == torch.float32 else values.float()
    if values.dtype not in (torch.uint8, torch.bool, torch.int64):
        return values.long()
    return values


class StoreColumn:
    """One column of a :class:`StoreDataset`, read like a tensor: ``index_select(0, index)`` gathers rows.

    ``kind`` says how a transition index finds its row: ``step`` (actions, rewards), ``observation``
    or ``next_observation`` (each episode has one observation row more than steps), or the derived
    ``done`` and ``start`` flags.
    """

    def __init__(self, dataset: StoreDataset, kind: str, array: np.ndarray | None = None,
                 shape: tuple[int, ...] = (), dtype: torch.dtype | None = None) -> None:
        self.dataset, self.kind = dataset, kind
        self.values = None if array is None else torch.from_numpy(array)
        self.shape = (len(dataset), *(array.shape[1:] if array is not None else shape))
        self.dtype = dtype if dtype is not None else _as_model_dtype(self.values[:1]).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        assert dim == 0, "store columns are gathered by row"
        located = self.dataset.locate(index)
        if self.kind == "done":
            rows = (located.within == located.length - 1) & located.terminated
            values = rows.to(torch.float32)
        elif self.kind == "start":
            values = located.within == 0
        else:
            rows = {"step": located.transition, "observation": located.observation,
                    "next_observation": located.observation + 1}[self.kind]
            values = _as_model_dtype(self.values.index_select(0, rows))
        return values.to(self.dataset.target, non_blocking=True) if self.dataset.target.type != "cpu" else values


@dataclass
class Located:
    """Where the transitions of an index are: their episode's length and end, their rows in the columns."""

    within: torch.Tensor
    length: torch.Tensor
    terminated: torch.Tensor
    transition: torch.Tensor
    observation: torch.Tensor


class StoreDataset:
    """The transitions of some episodes of a store, with the interface the samplers read.

    Row ``k`` is the ``k``-th transition of the chosen episodes taken in order, exactly the row
    :func:`mazerun.data.tensors.records_to_dataset` gives it for the same episodes, so the same sampler
    seed draws the same batches. Nothing is copied: a batch is one ``searchsorted`` over the
    episode starts and one gather per column from the memory maps. Indices live on the CPU;
    batches are moved to ``target`` (the training device).
    """

    vocabulary = None

    def __init__(self, store: ColumnarStore, episodes: Sequence[int], target: torch.device | str = "cpu") -> None:
        self.store = store
        self.episodes = np.asarray(episodes, dtype=np.int64)
        if len(self.episodes) == 0:
            raise MazerunError(f"store {store.path} holds no episodes to train on")
        lengths = store.lengths[self.episodes]
        self.n = int(lengths.sum())
        self.target = torch.device(target)
        self.device = torch.device("cpu")
        self._starts = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
        self._lengths = torch.from_numpy(lengths)
        self._terminated = torch.from_numpy(store.terminated[self.episodes])
        first = store.first_transition[self.episodes]
        self._first_transition = torch.from_numpy(first)
        self._first_observation = torch.from_numpy(first + self.episodes)
        self._cached: tuple[torch.Tensor, Located] | None = None
        columns = store.columns
        self.observations = StoreColumn(self, "observation", columns["observations"])
        self.next_observations = StoreColumn(self, "next_observation", columns["observations"])
        self.actions = StoreColumn(self, "step", columns["actions"])
        self.rewards = StoreColumn(self, "step", columns["rewards"])
        self.expert_actions = StoreColumn(self, "step", columns["expert_actions"]) if store.has_labels else None
        self.dones = StoreColumn(self, "done", dtype=torch.float32)
        self.episode_starts = StoreColumn(self, "start", dtype=torch.bool)

    def __len__(self) -> int:
        return self.n

    def to(self, device: torch.device | str) -> StoreDataset:
        """The same transitions, delivered on ``device``; the memory maps stay where they are."""
        moved = StoreDataset.__new__(StoreDataset)
        moved.__dict__.update(self.__dict__)
        moved.target = torch.device(device)
        for name in ("observations", "next_observations", "actions", "rewards", "expert_actions", "dones",
                     "episode_starts"):
            column = getattr(self, name)
            if column is not None:
                copy = StoreColumn.__new__(StoreColumn)
                copy.__dict__.update(column.__dict__)
                copy.dataset = moved
                setattr(moved, name, copy)
        return moved

    def locate(self, index: torch.Tensor) -> Located:
        """The rows of transitions ``index``; the columns of one batch share one lookup."""
        if self._cached is not None and self._cached[0] is index:
            return self._cached[1]
        index = index.to(torch.int64)
        episode = torch.searchsorted(self._starts, index, right=True) - 1
        within = index - self._starts.index_select(0, episode)
        transition = self._first_transition.index_select(0, episode) + within
        located = Located(
            within=within, length=self._lengths.index_select(0, episode),
            terminated=self._terminated.index_select(0, episode), transition=transition,
            observation=self._first_observation.index_select(0, episode) + within,
        )
        self._cached = (index, located)
        return located

    def observation_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and std (>= 1e-6) of the observations, streamed in chunks, in float64.

        The same numbers :func:`mazerun.data.tensors.observation_stats` computes in memory (two passes:
        the mean, then the mean squared deviation from it).
        """
        total = None
        for begin in range(0, self.n, STATS_CHUNK):
            rows = self.observations.index_select(0, torch.arange(begin, min(begin + STATS_CHUNK, self.n)))
            part = rows.to("cpu").double().sum(dim=0)
            total = part if total is None else total + part
        mean = total / self.n
        squares = None
        for begin in range(0, self.n, STATS_CHUNK):
            rows = self.observations.index_select(0, torch.arange(begin, min(begin + STATS_CHUNK, self.n)))
            part = (rows.to("cpu").double() - mean).pow(2).sum(dim=0)
            squares = part if squares is None else squares + part
        std = (squares / self.n).sqrt().clamp(min=1e-6)
        return mean.float(), std.float()


def store_split(
    store: ColumnarStore, validation_percentage: float, seed: int, device: torch.device | str,
    max_episodes: int | None = None,
) -> tuple[StoreDataset, StoreDataset | None]:
    """Training and validation transitions of ``store``, split by episode as records are split."""
    from mazerun.data.tensors import split_by_episode

    episodes = list(range(min(store.n_episodes, max_episodes or store.n_episodes)))
    train, validation = split_by_episode(episodes, validation_percentage, seed)
    return (StoreDataset(store, train, device),
            StoreDataset(store, validation, device) if validation else None)


# -- writing ---------------------------------------------------------------------------------


class StoreWriter:
    """Episodes appended to a new store (written in scratch, renamed into place) or to an existing one.

    Use as a context manager: leaving it normally commits, an exception rolls everything back.
    """

    def __init__(self, path: str | Path, spaces_of: Callable[[str], tuple[Any, Any]], *, append: bool = False) -> None:
        """``spaces_of(env_id)``: the observation and action spaces every episode of that env is checked against."""
        self.path = Path(path)
        self.spaces_of = spaces_of
        self.appending = append
        self.index: dict[str, Any] | None = None
        self.files: dict[str, Any] = {}
        self.original_sizes: dict[str, int] = {}
        self.added = 0
        self.first: dict[str, Any] | None = None
        """The env and column specs of the first episode checked, until the index exists."""
        self.spaces: tuple[str, Any, Any] | None = None
        if append:
            store = ColumnarStore.open(self.path)  # refuses a damaged store before anything is written
            self.index = store.index
            self.directory = self.path
            del store
            for name in self.index["columns"]:
                file = self.directory / f"{name}.bin"
                self.original_sizes[name] = file.stat().st_size
                self.files[name] = self._open(file, "ab")
        else:
            if self.path.exists():
                raise MazerunError(f"{self.path} already exists; choose a new store path, or add to it with "
                                   "python -m mazerun.datasets append")
            self.directory = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                self.directory.mkdir(parents=True)
            except OSError as error:
                raise _fail_write(self.directory, error) from None

    def _open(self, file: Path, mode: str) -> Any:
        try:
            return open(file, mode)
        except OSError as error:
            raise _fail_write(file, error) from None

    def _start(self, record: StateTrajectoryRecord, columns: dict[str, np.ndarray]) -> None:
        self.index = {
            "format": STORE_FORMAT, "version": STORE_VERSION, "env_id": record.env_id, "episodes": 0,
            "transitions": 0, "policies": [], "action_range": None,
            "columns": {**{name: _column_spec(array) for name, array in columns.items()},
                        **{name: {"dtype": np.dtype(dtype).str, "shape": []} for name, dtype in EPISODE_COLUMNS.items()}},
        }
        for name in self.index["columns"]:
            self.files[name] = self._open(self.directory / f"{name}.bin", "wb")

    def check(self, record: StateTrajectoryRecord, source: str = "") -> dict[str, np.ndarray]:
        """Every check training runs on ``record`` (its env's spaces, types, lengths, NaN) and that it fits
        the store; nothing is written. Returns its columns in the store's dtypes.

        ``append`` checks every episode this way before it writes the first one, so a bad episode
        leaves the store untouched, instead of poisoning it for every later training run.
        """
        from mazerun.data.tensors import record_problem

        where = f" ({source})" if source else ""
        if isinstance(record.observations, dict):
            raise MazerunError(
                f"episode {record.id}{where} has dict observations ({', '.join(sorted(record.observations))}): the "
                "columnar store holds vector observations only; train MiniGrid and BabyAI from trajectory_data"
            )
        index = self.index or self.first
        if index is not None and record.env_id != index["env_id"]:
            raise MazerunError(f"episode {record.id}{where} comes from {record.env_id} and the store holds "
                               f"{index['env_id']}; a store holds the episodes of one environment")
        problem = record_problem(record, *self._spaces(record.env_id))
        if problem:
            raise MazerunError(f"episode {record.id}{where} does not fit {record.env_id}: {problem}; "
                               "leave that episode out, or record it again")
        columns = self._columns(record)
        if index is None:
            self.first = {"env_id": record.env_id, "columns": {name: _column_spec(array) for name, array in columns.items()}}
            return columns
        expected = set(index["columns"]) - set(EPISODE_COLUMNS)
        if set(columns) != expected:
            missing = sorted(expected ^ set(columns))
            raise MazerunError(f"episode {record.id}{where} differs from the store's episodes in {', '.join(missing)} "
                               "(expert labels on some episodes only); store those episodes apart")
        for name, array in columns.items():
            spec = index["columns"][name]
            stored = np.dtype(spec["dtype"])
            if list(array.shape[1:]) != spec["shape"] or array.dtype.kind != stored.kind:
                raise MazerunError(
                    f"episode {record.id}{where}: {name} are {array.dtype} of shape {array.shape[1:]} per row and "
                    f"the store's are {stored} of shape {tuple(spec['shape'])}; store those episodes apart"
                )
            columns[name] = array.astype(stored, copy=False)
        return columns

    def _spaces(self, env_id: str) -> tuple[Any, Any]:
        """The observation and action spaces of ``env_id``, made once per writer."""
        if self.spaces is None or self.spaces[0] != env_id:
            self.spaces = (env_id, *self.spaces_of(env_id))
        return self.spaces[1], self.spaces[2]

    def add(self, record: StateTrajectoryRecord, source: str = "") -> None:
        """Append one episode, after :meth:`check`."""
        columns = self.check(record, source)
        if self.index is None:
            self._start(record, columns)
        index = self.index
        if record.policy not in index["policies"]:
            index["policies"].append(record.policy)
        policy = index["policies"].index(record.policy)
        try:
            for name, array in columns.items():
                self.files[name].write(np.ascontiguousarray(array).tobytes())
            for name, value in (("episode_length", len(record)), ("episode_terminated", record.terminated),
                                ("episode_truncated", record.truncated),
                                ("episode_seed", NO_SEED if record.seed is None else record.seed),
                                ("episode_policy", policy)):
                self.files[name].write(np.asarray([value], dtype=EPISODE_COLUMNS[name]).tobytes())
        except OSError as error:
            raise _fail_write(self.path, error) from None
        if np.issubdtype(columns["actions"].dtype, np.integer):
            low, high = int(columns["actions"].min()), int(columns["actions"].max())
            previous = index["action_range"]
            index["action_range"] = [low, high] if previous is None else [min(low, previous[0]), max(high, previous[1])]
        index["episodes"] += 1
        index["transitions"] += len(record)
        self.added += 1

    @staticmethod
    def _columns(record: StateTrajectoryRecord) -> dict[str, np.ndarray]:
        columns = {"observations": np.asarray(record.observations), "actions": np.asarray(record.actions),
                   "rewards": np.asarray(record.rewards)}
        if record.expert_actions is not None:
            columns["expert_actions"] = np.asarray(record.expert_actions)
        return columns

    def commit(self) -> None:
        """Flush the columns, then publish: the index of an appended store, the renamed directory of a new one."""
        if self.index is None:
            self.abort()
            raise MazerunError(f"no episodes to write to {self.path}")
        try:
            for file in self.files.values():
                file.flush()
                os.fsync(file.fileno())
                file.close()
            self.index[FINGERPRINT] = episode_fingerprint({
                name: np.fromfile(self.directory / f"{name}.bin", dtype=dtype) for name, dtype in EPISODE_COLUMNS.items()})
            if self.appending:
                atomic_write_bytes(self.directory / INDEX_FILE, json.dumps(self.index, indent=1).encode())
                return
            (self.directory / INDEX_FILE).write_text(json.dumps(self.index, indent=1))
            with open(self.directory / INDEX_FILE, "rb") as handle:
                os.fsync(handle.fileno())
            fsync_directory(self.directory)
            if self.path.exists():
                raise MazerunError(f"{self.path} appeared while the store was written; nothing was replaced")
            os.rename(self.directory, self.path)
            fsync_directory(self.path.parent)
        except OSError as error:
            self.abort()
            raise _fail_write(self.path, error) from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Undo: a new store's scratch directory is removed, an appended store's columns are cut back."""
        for file in self.files.values():
            try:
                file.close()
            except OSError:
                pass
        if self.appending:
            for name, size in self.original_sizes.items():
                try:
                    os.truncate(self.directory / f"{name}.bin", size)
                except OSError as error:
                    log.error("could not cut %s back to %d bytes: %s", name, size, error)
        else:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


class OrderedEpisodes:
    """Episodes that arrive in any order (parallel workers), appended to a store in episode-index order."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer = writer
        self.waiting: dict[int, StateTrajectoryRecord] = {}
        self.next = 0

    def add(self, index: int, record: StateTrajectoryRecord) -> None:
        self.waiting[index] = record
        while self.next in self.waiting:
            self.writer.add(self.waiting.pop(self.next))
            self.next += 1

    def finish(self) -> None:
        """Append the rest (an episode that never finished leaves a gap) and publish the store."""
        for index in sorted(self.waiting):
            self.writer.add(self.waiting.pop(index))
        self.writer.commit()
