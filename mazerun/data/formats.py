"""Offline datasets in other formats, read as trajectory records: HDF5 (AgileRL's/D4RL's layout) and Minari.

Every reader returns :class:`~mazerun.data.records.StateTrajectoryRecord` episodes, so HDF5 files and
Minari datasets become exactly the tensors recorded trajectory_data become, and every algorithm
accepts every format. ``runner.dataset.dir_or_file`` names any of them (or a list mixing them):

    outputs/.../trajectory_data     mazerun's own records (a directory, or one .pkl)
    data/cartpole.h5                an HDF5 file (.h5 / .hdf5)
    minari:mazerun/lunar-noisy-v0   a Minari dataset stored locally (never downloaded)
    d3rlpy:data/lunar.h5            a d3rlpy dataset file (``MDPDataset.dump``; see :func:`read_d3rlpy`)
    data/lunar.store                a columnar store (:mod:`mazerun.data.store`): read whole here; the
                                    offline loop samples it through memory maps instead

HDF5 layout (flat arrays, one row per step, episodes back to back)::

    observations       (N, obs_dim)   required
    actions            (N,) or (N, a) required
    rewards            (N,)           required
    terminals          (N,)           required: 1 where an episode ends in a terminal state
    timeouts           (N,)           optional: 1 where a time limit cuts an episode
    next_observations  (N, obs_dim)   optional: the observation after each step
    expert_actions     (N,) or (N, a) optional (mazerun's own): the expert's label of each state
    attrs["env_id"]                   optional: else pass env=<id>

Episodes end at terminals and timeouts (and at the end of the file). The observation after an
episode's last step is where formats differ; it is handled exactly: with next_observations it
is that row. Without it, it is unknown: after a terminal step no target reads it (done = 1
masks the bootstrap), so the last observation stands in; after a timeout the bootstrap would
need it, so that one last transition is left out rather than paired with the next episode's
first observation (as a plain ``observations[i + 1]`` would).

Export (``python -m mazerun.datasets export SOURCE DEST``, :mod:`mazerun.datasets`) writes any readable source as an
HDF5 file (with next_observations and timeouts, so it reads back exactly), as a local Minari
dataset (``minari:<id>``) or as a d3rlpy dataset file (``d3rlpy:<file>``). All are written whole or
not at all.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import gymnasium as gym
import numpy as np

from mazerun.config.schemas import check_fits_in_memory
from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write_bytes
from mazerun.data.records import StateTrajectoryRecord, check_regular_file, load_records, read_record, record_files
from mazerun.data.store import ColumnarStore, is_store

log = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5")
MINARI_PREFIX = "minari:"
D3RLPY_PREFIX = "d3rlpy:"
REQUIRED_HDF5 = ("observations", "actions", "rewards", "terminals")
OPTIONAL_HDF5 = ("timeouts", "next_observations", "expert_actions")


def is_hdf5(source: str | Path) -> bool:
    return Path(str(source)).suffix.lower() in HDF5_SUFFIXES


def is_minari(source: str | Path) -> bool:
    return str(source).startswith(MINARI_PREFIX)


def is_d3rlpy(source: str | Path) -> bool:
    return str(source).startswith(D3RLPY_PREFIX)


def load_dataset_records(
    sources: Sequence[str | Path], env_id: str | None = None, max_episodes: int | None = None
) -> list[StateTrajectoryRecord]:
    """The episodes of every source (records, HDF5 files, ``minari:<id>``), in order; the first ``max_episodes``.

    ``env_id`` labels the episodes of sources that do not say which env recorded them.
    """
    records: list[StateTrajectoryRecord] = []
    pickled: list[str | Path] = []

    def left() -> int | None:
        return None if max_episodes is None else max_episodes - len(records)

    def flush() -> None:
        if pickled:
            records.extend(load_records(list(pickled), left()))
            pickled.clear()

    for source in sources:
        if is_store(source):
            flush()
            records.extend(ColumnarStore.open(source).records(left()))
        elif is_minari(source):
            flush()
            records.extend(read_minari(str(source)[len(MINARI_PREFIX):], env_id))
        elif is_d3rlpy(source):
            flush()
            records.extend(read_d3rlpy(Path(str(source)[len(D3RLPY_PREFIX):]), env_id))
        elif is_hdf5(source):
            flush()
            records.extend(read_hdf5(Path(source), env_id))
        else:
            pickled.append(source)
    flush()
    return records[:max_episodes]


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:  # pragma: no cover - a dependency of mazerun
        raise MazerunError("reading HDF5 needs h5py: pip install h5py") from None
    return h5py


def read_hdf5(path: Path, env_id: str | None = None) -> list[StateTrajectoryRecord]:
    """The episodes of an HDF5 file in AgileRL's / D4RL's flat layout (see the module docstring)."""
    h5py = _h5py()
    if not path.exists():
        raise MazerunError(f"HDF5 dataset {path} does not exist; check the path")
    check_regular_file(path, "HDF5 dataset", HDF5_FIX)
    try:
        with h5py.File(path, "r") as handle:
            present = sorted(name for name in handle.keys() if isinstance(handle[name], h5py.Dataset))
            missing = [name for name in REQUIRED_HDF5 if name not in present]
            if missing:
                raise MazerunError(
                    f"{path} lacks the dataset{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                    f"(it has: {', '.join(present) or 'none'}); an offline dataset needs {', '.join(REQUIRED_HDF5)} "
                    f"({', '.join(OPTIONAL_HDF5)} optional)"
                )
            wanted = [name for name in (*REQUIRED_HDF5, *OPTIONAL_HDF5) if name in present]
            for name in wanted:
                check_fits_in_memory(handle[name].shape, handle[name].dtype, f"{path}: dataset {name}")
            columns = {name: np.asarray(handle[name][()]) for name in wanted}
            stored_env = handle.attrs.get("env_id")
            policy = handle.attrs.get("policy")
    except MazerunError:
        raise
    except Exception as error:  # h5py raises OSError, KeyError, RuntimeError... on a damaged file
        raise not_hdf5(path, error) from None
    if isinstance(stored_env, bytes):
        stored_env = stored_env.decode()
    for name, column in columns.items():
        if column.dtype.kind not in "biuf":
            raise MazerunError(f"{path}: dataset {name} holds {column.dtype} values, expected numbers; {HDF5_FIX}")
        if column.ndim == 0:
            raise MazerunError(f"{path}: dataset {name} is a single value, expected one row per step; {HDF5_FIX}")
    for name in ("terminals", "timeouts"):
        flags = columns.get(name)
        if flags is not None and not np.isin(flags, (0, 1)).all():
            row = int(np.flatnonzero(~np.isin(flags, (0, 1)).reshape(len(flags), -1).any(axis=1))[0])
            raise MazerunError(f"{path}: dataset {name} holds {flags.reshape(len(flags), -1)[row][0].item()!r} at row {row}, "
                               f"expected 0 or 1 (one flag per step); {HDF5_FIX}")
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} {length}" for name, length in lengths.items())
        raise MazerunError(f"{path} has datasets of unequal length ({listed}); every dataset needs one row per step")
    if lengths["observations"] == 0:
        raise MazerunError(f"{path} holds no steps; record some episodes first")
    env = stored_env or env_id
    if not env:
        raise MazerunError(
            f"{path} does not say which env recorded it (no env_id attribute); add env=<id>, e.g. env=CartPole-v1"
        )
    return _episodes_from_columns(columns, str(env), str(policy or f"hdf5:{path.name}"))


HDF5_FIX = "export it again with python -m mazerun.datasets export <trajectory_data> <file>.h5"


def not_hdf5(path: Path, error: Exception) -> MazerunError:
    """The one line for a file h5py cannot read (empty, truncated, not HDF5), classified where it is opened."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return MazerunError(f"{path} is not readable HDF5 ({reason}); it is damaged or not an HDF5 file: {HDF5_FIX}")


def _episodes_from_columns(columns: dict[str, np.ndarray], env_id: str, policy: str) -> list[StateTrajectoryRecord]:
    observations = columns["observations"]
    count = len(observations)
    terminals = columns["terminals"].astype(bool).reshape(count)  # read_hdf5 checked: one flag per row
    timeouts = columns["timeouts"].astype(bool).reshape(count) if "timeouts" in columns else np.zeros(count, bool)
    next_observations = columns.get("next_observations")
    actions = _integral_actions(columns["actions"])
    rewards = _float_rewards(columns["rewards"]).reshape(count)
    labels = columns.get("expert_actions")
    ends = np.flatnonzero(terminals | timeouts).tolist()
    if not ends or ends[-1] != count - 1:
        ends.append(count - 1)  # the file stops mid-episode: a cut like a timeout
    records = []
    start = 0
    for end in ends:
        terminated = bool(terminals[end])
        last = end + 1
        if next_observations is not None:
            final = next_observations[end]
        elif terminated:
            final = observations[end]  # never read: done = 1 masks the bootstrap from it
        else:
            last, final = end, observations[end]  # its successor is unknown: drop the cut step
        if last > start:
            records.append(StateTrajectoryRecord(
                observations=np.concatenate([observations[start:last], final[None]]),
                actions=actions[start:last], rewards=rewards[start:last], terminated=terminated,
                truncated=not terminated, env_id=env_id, seed=None, policy=policy,
                expert_actions=None if labels is None else _integral_actions(labels)[start:last],
            ))
        start = end + 1
    return records


def _float_rewards(rewards: np.ndarray) -> np.ndarray:
    """Numeric rewards as float64, the records' dtype; anything else is left for the record check to refuse."""
    return rewards.astype(np.float64) if rewards.dtype.kind in "biuf" else rewards


def _integral_actions(actions: np.ndarray) -> np.ndarray:
    """Discrete actions stored as floats (as many HDF5 files do) become integers; anything else is unchanged."""
    if actions.ndim == 1 and np.issubdtype(actions.dtype, np.floating) and np.all(np.isfinite(actions)) \
            and np.array_equal(actions, np.round(actions)):
        return actions.astype(np.int64)
    return actions


def write_hdf5(records: Sequence[StateTrajectoryRecord], path: Path) -> None:
    """``records`` as one HDF5 file of flat columns, with next_observations and timeouts (exact round trip)."""
    h5py = _h5py()
    if any(isinstance(record.observations, dict) for record in records):
        raise MazerunError(
            "HDF5 export writes flat (vector) observations and these records have dict observations; "
            "export them to Minari (minari:<id>) or keep the trajectory_data"
        )
    env_ids = {record.env_id for record in records}
    if len(env_ids) > 1:
        raise MazerunError(f"the records come from {len(env_ids)} environments ({', '.join(sorted(env_ids))}); "
                           "export the records of one environment")
    columns: dict[str, np.ndarray] = {
        "observations": np.concatenate([np.asarray(record.observations)[:-1] for record in records]),
        "next_observations": np.concatenate([np.asarray(record.observations)[1:] for record in records]),
        "actions": np.concatenate([np.asarray(record.actions) for record in records]),
        "rewards": np.concatenate([np.asarray(record.rewards, dtype=np.float64) for record in records]),
        "terminals": np.concatenate([_last_flag(len(record), record.terminated) for record in records]),
        "timeouts": np.concatenate([_last_flag(len(record), not record.terminated) for record in records]),
    }
    if all(record.expert_actions is not None for record in records):
        columns["expert_actions"] = np.concatenate([np.asarray(record.expert_actions) for record in records])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with h5py.File(temporary, "w") as file:
            for name, column in columns.items():
                file.create_dataset(name, data=column)
            file.attrs["env_id"] = records[0].env_id
            file.attrs["format"] = "mazerun-hdf5"
        atomic_write_bytes(path, Path(temporary).read_bytes())
    finally:
        Path(temporary).unlink(missing_ok=True)


def _last_flag(length: int, value: bool) -> np.ndarray:
    flags = np.zeros(length, dtype=bool)
    flags[-1] = value
    return flags


def _minari() -> Any:
    try:
        import minari
    except ImportError:
        raise MazerunError("Minari datasets need the minari package: pip install 'mazerun[minari]'") from None
    return minari


def minari_root() -> Path:
    """Where Minari keeps local datasets: $MINARI_DATASETS_PATH, else ~/.minari/datasets (Minari's own rule)."""
    configured = os.environ.get("MINARI_DATASETS_PATH")
    return Path(configured) if configured else Path.home() / ".minari" / "datasets"


def read_minari(dataset_id: str, env_id: str | None = None) -> list[StateTrajectoryRecord]:
    """The episodes of the local Minari dataset ``dataset_id``; nothing is downloaded."""
    root = minari_root()
    if not (root / dataset_id / "data").is_dir():
        local = sorted(str(path.parent.relative_to(root)) for path in root.glob("**/data")) if root.is_dir() else []
        listed = f"; local datasets: {', '.join(local)}" if local else "; it holds none"
        raise MazerunError(
            f"Minari dataset {dataset_id!r} is not found locally in {root} (set MINARI_DATASETS_PATH to look "
            f"elsewhere){listed}; mazerun never downloads datasets: export one with "
            "python -m mazerun.datasets export <trajectory_data> minari:<id>"
        )
    minari = _minari()
    try:
        dataset = minari.load_dataset(dataset_id)
    except Exception as error:  # Minari raises many kinds on a damaged dataset
        raise MazerunError(f"cannot read Minari dataset {dataset_id!r} in {root}: {type(error).__name__}: {error}; "
                           f"{MINARI_FIX}") from None
    spec = dataset.spec.env_spec
    env = env_id if spec is None else spec.id
    if not env:
        raise MazerunError(f"Minari dataset {dataset_id!r} names no environment; add env=<id>")
    records = []
    data_file = root / dataset_id / "data" / "main_data.hdf5"
    check_regular_file(data_file, f"Minari dataset {dataset_id!r} file", MINARI_FIX)
    try:  # Minari opens its HDF5 file lazily: a damaged one fails here, not in load_dataset
        for episode in dataset.iterate_episodes():
            terminated = bool(np.asarray(episode.terminations)[-1])
            truncated = bool(np.asarray(episode.truncations)[-1]) or not terminated
            records.append(StateTrajectoryRecord(
                observations=_minari_observations(episode.observations),
                actions=_integral_actions(np.asarray(episode.actions)),
                rewards=_float_rewards(np.asarray(episode.rewards)),
                terminated=terminated, truncated=truncated, env_id=env,
                seed=None, policy=f"minari:{dataset_id}",
            ))
    except OSError as error:
        raise MazerunError(f"Minari dataset {dataset_id!r}: {data_file} is not readable HDF5 "
                           f"({' '.join(str(error).split())}); it is damaged: {MINARI_FIX}") from None
    except Exception as error:
        raise MazerunError(f"cannot read Minari dataset {dataset_id!r} in {root}: {type(error).__name__}: {error}; "
                           f"{MINARI_FIX}") from None
    if not records:
        raise MazerunError(f"Minari dataset {dataset_id!r} holds no episodes")
    return records


MINARI_FIX = "delete it and export it again with python -m mazerun.datasets export <trajectory_data> minari:<id>"


def _minari_observations(observations: Any) -> Any:
    if isinstance(observations, dict):
        return {key: np.asarray(value) for key, value in observations.items()}
    return np.asarray(observations)


def write_minari(records: Sequence[StateTrajectoryRecord], dataset_id: str, env: gym.Env) -> Path:
    """``records`` of ``env`` as the local Minari dataset ``dataset_id``; written in a scratch root, then moved in whole."""
    minari = _minari()
    from minari.data_collector.episode_buffer import EpisodeBuffer

    root = minari_root()
    destination = root / dataset_id
    if destination.exists():
        raise MazerunError(f"Minari dataset {dataset_id!r} already exists in {root}; choose another id or delete it")
    env_ids = {record.env_id for record in records}
    if len(env_ids) > 1:
        raise MazerunError(f"the records come from {len(env_ids)} environments ({', '.join(sorted(env_ids))}); "
                           "export the records of one environment")
    spec = env.spec
    observation_space, action_space = env.observation_space, env.action_space
    buffers = []
    for index, record in enumerate(records):
        steps = len(record)
        buffers.append(EpisodeBuffer(
            id=index, seed=record.seed, observations=record.observations, actions=np.asarray(record.actions),
            rewards=np.asarray(record.rewards), terminations=_last_flag(steps, record.terminated),
            # a step that ends in a terminal state at the time limit raised both, as gymnasium's own envs do
            truncations=_last_flag(steps, record.truncated or not record.terminated), infos={},
        ))
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / f".mazerun-export-{uuid.uuid4().hex}"
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(scratch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Minari asks for authors and permalinks a local export lacks
            minari.create_dataset_from_buffers(
                dataset_id=dataset_id, buffer=buffers, env=spec, algorithm_name=records[0].policy,
                observation_space=observation_space, action_space=action_space,
                description=f"exported by mazerun from {len(records)} trajectory records",
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        for namespace in Path(dataset_id).parents:
            metadata = scratch / namespace / "namespace_metadata.json"
            if str(namespace) != "." and metadata.is_file() and not (root / namespace / metadata.name).exists():
                shutil.copy2(metadata, root / namespace / metadata.name)
        os.replace(scratch / dataset_id, destination)
    except MazerunError:
        raise
    except Exception as error:
        raise MazerunError(f"cannot write Minari dataset {dataset_id!r}: {type(error).__name__}: {error}") from None
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
        shutil.rmtree(scratch, ignore_errors=True)
    return destination


D3RLPY_VERSION = "2.1"
"""The d3rlpy dataset file version read and written: ``d3rlpy.dataset.io.DATASET_VERSION`` of d3rlpy 2.x."""
D3RLPY_COLUMNS = ("observations", "actions", "rewards", "terminated")
"""The parts of each episode in a d3rlpy 2.x file (its ``Episode.serialize``), in its order."""
D3RLPY_FIX = ("write it with d3rlpy's dataset.dump(file), or export records with "
              "python -m mazerun.datasets export <trajectory_data> d3rlpy:<file>.h5")


def read_d3rlpy(path: Path, env_id: str | None = None) -> list[StateTrajectoryRecord]:
    """The episodes of a d3rlpy dataset file (``MDPDataset.dump``), as the transitions d3rlpy itself takes from it.

    A d3rlpy episode holds T observations, actions and rewards and a ``terminated`` flag; its
    transition i runs from observation i to observation i + 1 (``BasicTransitionPicker``). After
    a terminal step the next observation is zeros, which done masks; an episode that did not
    terminate gives no transition from its last row, whose observation only ends the step before.
    So a terminated episode becomes T steps ending in a zero observation, any other T - 1 steps.
    The file is HDF5 and is read with h5py: d3rlpy need not be installed.
    """
    h5py = _h5py()
    if not path.exists():
        raise MazerunError(f"d3rlpy dataset {path} does not exist; check the path")
    check_regular_file(path, "d3rlpy dataset", D3RLPY_FIX)
    episodes = []
    try:
        with h5py.File(path, "r") as handle:
            version = _h5_text(handle["version"][()]) if "version" in handle else None
            columns = tuple(_h5_text(name) for name in handle["columns"][()]) if "columns" in handle else ()
            if version != D3RLPY_VERSION or columns != D3RLPY_COLUMNS:
                raise MazerunError(
                    f"{path} is not a d3rlpy {D3RLPY_VERSION} dataset of episodes (version {version}, columns "
                    f"{', '.join(columns) or 'none'}; expected {', '.join(D3RLPY_COLUMNS)}); {D3RLPY_FIX}")
            if "observations_0_0" in handle:
                raise MazerunError(f"{path} holds tuple observations, which mazerun does not read from d3rlpy files; "
                                   "convert them to one vector per step")
            for index in range(int(handle["num_episodes"][()])):
                parts = {}
                for name in D3RLPY_COLUMNS:
                    dataset = handle[f"{name}_{index}"]
                    check_fits_in_memory(dataset.shape, dataset.dtype, f"{path}: {name}_{index}")
                    parts[name] = np.asarray(dataset[()])
                episodes.append(parts)
            stored_env = handle.attrs.get("env_id")
            policy = handle.attrs.get("policy")
    except MazerunError:
        raise
    except Exception as error:  # h5py raises OSError, KeyError, ValueError... on a damaged or foreign file
        reason = " ".join(str(error).split()) or type(error).__name__
        raise MazerunError(f"{path} is not a readable d3rlpy dataset ({reason}); {D3RLPY_FIX}") from None
    env = _h5_text(stored_env) if stored_env is not None else env_id
    if not env:
        raise MazerunError(f"{path} does not say which env recorded it (d3rlpy files name none); add env=<id>, "
                           "e.g. env=CartPole-v1 (python -m mazerun.datasets: --env <id>)")
    records = []
    for index, parts in enumerate(episodes):
        observations, actions, rewards = parts["observations"], parts["actions"], parts["rewards"]
        if not (len(observations) == len(actions) == len(rewards)) or len(actions) == 0:
            raise MazerunError(f"{path}: episode {index} holds {len(observations)} observations, {len(actions)} actions "
                               f"and {len(rewards)} rewards; a d3rlpy episode has one of each per step")
        if actions.dtype.kind in "iu" and actions.ndim == 2 and actions.shape[1] == 1:
            actions = actions[:, 0]  # d3rlpy keeps discrete actions as a column
        terminated = bool(parts["terminated"])
        if terminated:
            steps, final = len(actions), np.zeros_like(observations[-1])
        else:
            steps, final = len(actions) - 1, observations[-1]
        if steps == 0:
            continue  # a one-row episode cut by a time limit: d3rlpy takes no transition from it either
        records.append(StateTrajectoryRecord(
            observations=np.concatenate([observations[:steps], final[None]]), actions=actions[:steps],
            rewards=_float_rewards(rewards.reshape(len(rewards), -1)[:steps, 0]), terminated=terminated,
            truncated=not terminated, env_id=str(env), seed=None,
            policy=_h5_text(policy) if policy is not None else f"d3rlpy:{path.name}",
        ))
    if not records:
        raise MazerunError(f"{path} holds no transitions; {D3RLPY_FIX}")
    return records


def write_d3rlpy(records: Sequence[StateTrajectoryRecord], path: Path) -> None:
    """``records`` as a d3rlpy dataset file: ``ReplayBuffer.load(file, InfiniteBuffer())`` gives their transitions.

    A terminated episode is its T steps. An episode cut by a time limit is T + 1 rows whose last
    holds the observation after the last step (with a zero action and reward): d3rlpy takes no
    transition from that row, only the next observation of the step before, so no step is lost.
    The observation after a terminal step is not kept, as d3rlpy has no row for it (zeros there).
    """
    h5py = _h5py()
    if any(isinstance(record.observations, dict) for record in records):
        raise MazerunError("d3rlpy export writes vector observations and these records have dict observations; "
                           "export them to Minari (minari:<id>) or keep the trajectory_data")
    env_ids = {record.env_id for record in records}
    if len(env_ids) > 1:
        raise MazerunError(f"the records come from {len(env_ids)} environments ({', '.join(sorted(env_ids))}); "
                           "export the records of one environment")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with h5py.File(temporary, "w") as file:
            file.create_dataset("columns", data=list(D3RLPY_COLUMNS))
            file.create_dataset("num_episodes", data=len(records))
            for index, record in enumerate(records):
                observations = np.asarray(record.observations)
                actions = np.asarray(record.actions)
                actions = actions.reshape(len(actions), -1)
                rewards = np.asarray(record.rewards, dtype=np.float64).reshape(-1, 1)
                if record.terminated:
                    observations = observations[:-1]
                else:
                    actions = np.concatenate([actions, np.zeros_like(actions[:1])])
                    rewards = np.concatenate([rewards, np.zeros_like(rewards[:1])])
                file.create_dataset(f"observations_{index}", data=observations)
                file.create_dataset(f"actions_{index}", data=actions)
                file.create_dataset(f"rewards_{index}", data=rewards)
                file.create_dataset(f"terminated_{index}", data=bool(record.terminated))
            file.create_dataset("version", data=D3RLPY_VERSION)
            file.attrs["env_id"] = records[0].env_id
            file.attrs["policy"] = records[0].policy
        atomic_write_bytes(path, Path(temporary).read_bytes())
    finally:
        Path(temporary).unlink(missing_ok=True)


def _h5_text(value: Any) -> str:
    """An HDF5 string as str (h5py returns bytes for variable-length strings)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def iter_source_records(source: str, env_id: str | None = None) -> Iterator[tuple[StateTrajectoryRecord, str]]:
    """The episodes of one source, one at a time where the format allows (pickles, stores)."""

    if is_store(source):
        store = ColumnarStore.open(source)
        for record in store.iter_records():
            yield record, source
    elif is_minari(source):
        for record in read_minari(source[len(MINARI_PREFIX):], env_id):
            yield record, source
    elif is_d3rlpy(source):
        for record in read_d3rlpy(Path(source[len(D3RLPY_PREFIX):]), env_id):
            yield record, source
    elif is_hdf5(source):
        for record in read_hdf5(Path(source), env_id):
            yield record, source
    else:
        for file in record_files(source):
            yield read_record(file), str(file)
