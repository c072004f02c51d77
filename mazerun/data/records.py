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
import math
import os
import pickle
import stat
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import cloudpickle
import numpy as np

from mazerun.core.errors import MazerunError
from mazerun.core.files import BackgroundFlusher, atomic_write_bytes
from mazerun.core.progress import Progress

RECORD_FORMAT_VERSION = 1
"""Bumped whenever the layout of :class:`StateTrajectoryRecord` changes incompatibly (a new
optional column with a default, like ``expert_actions``, is compatible: older files still load)."""

NO_LABEL = -1
"""The ``expert_actions`` entry (and ``info["expert_action"]``) of a discrete state the expert could not label."""

TRAJECTORY_DIR = "trajectory_data"
"""Where a run keeps its records."""
STORE_DIR = "trajectory_store"
"""Where a recording keeps its columnar store (``runner.store=columnar``; :mod:`mazerun.data.store`)."""
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
        """Raise ``ValueError`` if the fields are not of their types or do not describe one consistent episode.

        Types first: a pickle from elsewhere may hold ``terminated='yes'`` or string rewards, which
        numpy would silently convert later.
        """
        for name in ("terminated", "truncated"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} is {_describe(value)}, expected True or False")
        for name in ("env_id", "policy"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} is {_describe(getattr(self, name))}, expected a string")
        columns = self.observations if isinstance(self.observations, dict) else {"": self.observations}
        named = {**{(f"observations[{key!r}]" if key else "observations"): value for key, value in columns.items()},
                 "actions": self.actions, "rewards": self.rewards}
        if self.expert_actions is not None:
            named["expert_actions"] = self.expert_actions
        for name, column in named.items():
            if not isinstance(column, np.ndarray) or column.ndim == 0:
                raise ValueError(f"{name} is {_describe(column)}, expected a numpy array with one row per step")
            if column.dtype.hasobject:
                raise ValueError(f"{name} is an array of Python objects, expected numbers")
        for name in ("actions", "rewards"):
            if named[name].dtype.kind not in "biuf":
                raise ValueError(f"{name} have dtype {named[name].dtype}, expected numbers")
        if self.rewards.ndim != 1:
            raise ValueError(f"rewards have shape {self.rewards.shape}, expected one number per step")
        steps = len(self.actions)
        if steps == 0:
            raise ValueError("the episode has no steps")
        if len(self.rewards) != steps:
            raise ValueError(f"{len(self.rewards)} rewards for {steps} actions")
        if self.expert_actions is not None and len(self.expert_actions) != steps:
            raise ValueError(f"{len(self.expert_actions)} expert actions for {steps} actions")
        for key, column in columns.items():
            if len(column) != steps + 1:
                name = f"observations[{key!r}]" if key else "observations"
                raise ValueError(f"{name} has {len(column)} entries, expected {steps + 1} (actions + 1)")


def _describe(value: Any) -> str:
    """A value in a few words for a one-line error: its type, and its shape or a short repr."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


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


def record_name(index: int) -> str:
    """The file name of episode ``index`` of a recording; zero-padded so names sort like indices."""
    return f"episode_{index:08d}.pkl"


def write_record(record: StateTrajectoryRecord, directory: Path, index: int,
                 flusher: BackgroundFlusher | None = None) -> Path:
    """Pickle ``record``, episode ``index`` of its recording, into ``directory`` atomically; returns the path.

    With a ``flusher`` the file is put in place by its thread: it is there after ``flusher.wait()``.
    """
    path = Path(directory) / record_name(index)
    data = cloudpickle.dumps(record)
    if flusher is None:
        atomic_write_bytes(path, data)
    else:
        flusher.write(path, data)
    return path


_ALLOWED_GLOBALS = {
    ("mazerun.data.records", "StateTrajectoryRecord"),
    ("mazerun.records", "StateTrajectoryRecord"),  # where the class lived before mazerun/ had layers
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


class OversizedRecord(Exception):
    """A pickle declares more array memory than its bytes could carry: refused before it is allocated."""


RECORD_OVERHEAD = 1 << 16
"""Bytes of array memory a record may declare beyond its own size (empty arrays, scalars, headers).

An array pickled by numpy carries its data, so a genuine record never declares more memory than
its file holds; a crafted one (a 400-byte pickle that builds a 20M-row array) is refused before
anything is allocated."""


class _RecordUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Builds nothing but :data:`_ALLOWED_GLOBALS`, and no array larger than the pickle's own bytes allow.

    The Python unpickler (not the C one) is used so that ``BUILD`` of an array can be checked:
    ``ndarray.__setstate__`` allocates the declared shape, which must fit the remaining budget.
    Every call or opcode that allocates by a number in the pickle (``_reconstruct``, ``ndarray``,
    ``bytes``/``bytearray`` of an int, ``BYTEARRAY8``) is checked the same way before it runs.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, data: bytes, budget: int) -> None:
        super().__init__(io.BytesIO(data))
        self.budget = budget

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.budget:
            raise OversizedRecord(f"it declares {what} of {nbytes:,} bytes, more than its own bytes can carry "
                                  f"(its arrays may total its size + {RECORD_OVERHEAD:,} bytes)")
        self.budget -= nbytes

    def charge_array(self, shape: Any, dtype: Any) -> None:
        try:
            dims = [int(dim) for dim in (shape if isinstance(shape, (tuple, list)) else (shape,))]
            itemsize = np.dtype(dtype).itemsize
        except (TypeError, ValueError) as error:
            raise OversizedRecord(f"it declares an array of shape {shape!r}: {error}") from None
        if any(dim < 0 for dim in dims):
            raise OversizedRecord(f"it declares an array of negative shape {tuple(dims)}")
        if np.dtype(dtype).hasobject:
            raise OversizedRecord("it declares an array of Python objects, which no trajectory record holds")
        self.charge(math.prod(dims) * itemsize, f"an array of shape {tuple(dims)} and dtype {np.dtype(dtype)}")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafeRecord(module, name)
        if module.startswith("mazerun."):
            return StateTrajectoryRecord
        return super().find_class(module, name)

    def check_call(self, function: Any, args: Any) -> None:
        """Charge what ``function(*args)`` would allocate, before it is called."""
        args = tuple(args) if isinstance(args, (tuple, list)) else ()
        if function is np.ndarray and args:
            self.charge_array(args[0], args[1] if len(args) > 1 else float)
        elif getattr(function, "__name__", None) == "_reconstruct" and len(args) == 3:
            self.charge_array(args[1], args[2])
        elif function in (bytes, bytearray) and args and isinstance(args[0], int):
            self.charge(args[0], f"{function.__name__}({args[0]})")

    def load_reduce(self) -> None:
        self.check_call(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]

    def load_newobj(self) -> None:
        self.check_call(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_newobj(self)  # type: ignore[attr-defined]

    def load_newobj_ex(self) -> None:
        self.check_call(self.stack[-3], self.stack[-2])
        pickle._Unpickler.load_newobj_ex(self)  # type: ignore[attr-defined]

    def _instantiate(self, klass: Any, args: Any) -> None:
        self.check_call(klass, args)
        super()._instantiate(klass, args)

    def load_build(self) -> None:
        """``BUILD`` of an array: its state's shape is charged before ``__setstate__`` allocates it."""
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.ndarray):
            if not (isinstance(state, tuple) and len(state) in (4, 5)):
                raise OversizedRecord("it holds an array whose state is not numpy's")
            self.charge_array(state[-4], state[-3])
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def load_bytearray8(self) -> None:
        """``BYTEARRAY8`` allocates the length it declares before reading: charge it first."""
        (length,) = struct.unpack("<Q", self.read(8))
        self.charge(length, "a buffer")
        buffer = bytearray(length)
        self.readinto(buffer)
        if len(buffer) != length:  # the unframer shrinks it when the data ends early
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(buffer)

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def load_record_bytes(data: bytes, budget: int | None = None) -> Any:
    """Unpickle ``data`` with the restricted unpickler.

    Raises :class:`UnsafeRecord` on a global it does not allow and :class:`OversizedRecord` when
    the arrays it declares exceed ``budget`` bytes (default: the size of ``data`` plus
    :data:`RECORD_OVERHEAD`).
    """
    return _RecordUnpickler(data, len(data) + RECORD_OVERHEAD if budget is None else budget).load()


def read_regular_file(path: Path, what: str, fix: str) -> bytes:
    """The bytes of ``path`` if it is a regular file; a FIFO, a device or a directory is refused unopened.

    The check is on the resolved path (a symlink to ``/dev/zero`` is a device), and the file is
    opened non-blocking, so neither a FIFO nor an endless device can hang or exhaust a reader.
    """
    try:
        check_regular_file(path, what, fix)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MazerunError(f"{what} {path} is not a regular file; {fix}")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                return handle.read()
        finally:
            os.close(fd)
    except OSError as error:
        raise MazerunError(f"cannot read {what} {path}: {error.strerror or error}; {fix}") from None


def check_regular_file(path: Path, what: str, fix: str) -> None:
    """Refuse ``path`` unless it resolves to a regular file, without opening it (a FIFO would block)."""
    try:
        status = os.stat(path)
    except OSError as error:
        raise MazerunError(f"cannot read {what} {path}: {error.strerror or error}; {fix}") from None
    if not stat.S_ISREG(status.st_mode):
        raise MazerunError(f"{what} {path} is not a regular file ({_file_kind(status.st_mode)}); {fix}")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


RECORD_FIX = "delete the file or record the episodes again"


def read_record(path: Path) -> StateTrajectoryRecord:
    """One record file, read through the bounded unpickler: the reader datasets and load_records share."""
    data = read_regular_file(path, "trajectory record", RECORD_FIX)
    try:
        record = load_record_bytes(data)
    except UnsafeRecord as unsafe:
        raise MazerunError(
            f"refusing to load {path}: it asks to run {unsafe}, which no trajectory record holds; "
            "it was not written by mazerun (load only records you recorded or trust)"
        ) from None
    except OversizedRecord as oversized:
        raise MazerunError(f"refusing to load {path} ({len(data):,} bytes): {oversized}; {RECORD_FIX}") from None
    except Exception as error:
        raise MazerunError(f"cannot read trajectory record {path}: {type(error).__name__}: {error}; "
                           f"{RECORD_FIX}") from None
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
        raise MazerunError(f"{path} is not a usable episode: {error}; {RECORD_FIX}") from None
    return record


def record_files(dir_or_file: str | Path | Sequence[str | Path]) -> list[Path]:
    """The record files named by a file, a directory, or a list of either, sorted per directory.

    A recording's run directory stands for its ``trajectory_data``.
    """
    if isinstance(dir_or_file, (str, os.PathLike)):
        sources = [dir_or_file]
    else:
        sources = list(dir_or_file)
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir() and not any(path.glob("*.pkl")) and (path / TRAJECTORY_DIR).is_dir():
            path = path / TRAJECTORY_DIR
        if path.is_dir():
            found = sorted(path.glob("*.pkl"))
            if not found:
                raise MazerunError(
                    f"no trajectory records (*.pkl) in {path}; record some with "
                    "`run env=<env> policy=heuristic`"
                )
            files.extend(found)
        elif path.exists():
            files.append(path)  # the reader refuses what is not a regular file (a FIFO, a device)
        else:
            raise MazerunError(f"trajectory data {path} does not exist; check the path")
    return files


def load_records(
    dir_or_file: str | Path | Sequence[str | Path], max_episodes: int | None = None
) -> list[StateTrajectoryRecord]:
    """Load every record (or the first ``max_episodes``) from a file, a directory of ``*.pkl`` files, or a list of either."""
    files = record_files(dir_or_file)[:max_episodes]
    with Progress(len(files), unit="record", desc="loading records", leave=False) as loaded:
        records = []
        for path in files:
            records.append(read_record(path))
            loaded.update()
    return records


def finished_recording(trajectory_dir: Path) -> dict | None:
    """The rollout statistics of the recording in ``trajectory_dir`` if it finished, else None."""
    stats_path = trajectory_dir.parent / STATS_FILE
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and stats.get("finished") else None


WATCHED_POLICIES = ("torch_policy", "onnx")
"""Policy names of runs that watch a trained network act: not expert recordings."""


def find_newest_recording(root: Path = Path("outputs")) -> Path:
    """The ``trajectory_data`` of the newest finished recording of an expert under ``root`` (and ``multirun/``).

    A recording counts once its run wrote ``rollout_stats.json`` with ``finished: true``: a
    rollout still being written, one stopped by Ctrl-C and a ``policy=torch_policy`` or ``policy=onnx``
    watch run are never picked. Pass ``runner.dataset.dir_or_file`` to train on any of those.
    """
    candidates = []
    for base in (root, root.parent / "multirun"):
        if not base.is_dir():
            continue
        found = [*base.glob(f"**/{TRAJECTORY_DIR}"),
                 *(path for path in base.glob(f"**/{STORE_DIR}") if not (path.parent / TRAJECTORY_DIR).is_dir())]
        for path in found:  # a recording's store counts when it wrote no pickles (runner.record_trajectory=false)
            stats = finished_recording(path)
            if stats is not None and not str(stats.get("policy", "")).startswith(WATCHED_POLICIES):
                candidates.append(path)
    if not candidates:
        raise MazerunError(
            f"no finished expert recording under {root.resolve()}; record some first with "
            "`run env=LunarLander-v3 policy=heuristic`, or set runner.dataset.dir_or_file=<dir>"
        )
    return max(candidates, key=lambda path: (path.parent / STATS_FILE).stat().st_mtime)
