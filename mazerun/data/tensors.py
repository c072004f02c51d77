"""Trajectory records -> contiguous transition tensors, built once, sampled by index.

Offline training (BC, CQL, IQL) runs many thousand minibatch steps over the same data, so
everything per-step happens here exactly once: columns of all episodes are concatenated with
numpy, turned into tensors, and a minibatch is then a single ``tensor[index]`` per field.

Transitions pair step ``t`` with step ``t + 1`` of the same episode only. ``dones`` marks
terminal states (``terminated``) alone: the last step of an episode cut off by a time limit
still bootstraps from its final observation, which the records keep.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union, overload

import gymnasium as gym
import numpy as np
import torch

from mazerun.core.errors import MazerunError
from mazerun.data.records import NO_LABEL, StateTrajectoryRecord
from mazerun.nn.models import Vocabulary

log = logging.getLogger(__name__)

TensorObs = Union[torch.Tensor, dict[str, torch.Tensor]]

MISSION_KEY = "mission"
"""The dict-observation key whose strings are turned into token ids."""

NO_RECORDS = "no trajectory records to train on; record some with `run env=<env> policy=heuristic`"


class TransitionBatch(NamedTuple):
    """A minibatch of transitions ``(B, ...)``, every field indexed by the same sample indices."""

    observations: TensorObs
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: TensorObs
    dones: torch.Tensor
    expert_actions: Optional[torch.Tensor] = None
    """The expert's labels of ``observations`` (records of DAgger runs), else None."""


class SequenceBatch(NamedTuple):
    """``nrollouts`` chunks of ``rollout_len`` consecutive transitions: every field ``(T, B, ...)``.

    ``starts[t, b]`` marks a transition that begins an episode: a recurrent state is zeroed
    before it. ``burn_in_*`` are the ``burn_in`` steps before each chunk, read only to warm the
    state (no loss on them); None without burn-in.
    """

    observations: TensorObs
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: TensorObs
    dones: torch.Tensor
    expert_actions: Optional[torch.Tensor]
    starts: torch.Tensor
    burn_in_observations: Optional[TensorObs] = None
    burn_in_starts: Optional[torch.Tensor] = None


def _index_obs(obs: TensorObs, index: torch.Tensor) -> TensorObs:
    if isinstance(obs, dict):
        return {key: value[index] for key, value in obs.items()}
    return obs[index]


def _gather_obs(obs: TensorObs, index: torch.Tensor) -> TensorObs:
    """Rows ``index`` (int64) of each tensor; ``index_select`` costs half of ``tensor[index]``."""
    if isinstance(obs, dict):
        return {key: value.index_select(0, index) for key, value in obs.items()}
    return obs.index_select(0, index)


def _obs_to(obs: TensorObs, device: torch.device | str) -> TensorObs:
    if isinstance(obs, dict):
        return {key: value.to(device) for key, value in obs.items()}
    return obs.to(device)


@dataclass
class TransitionDataset:
    """All transitions of a set of episodes as tensors of ``N`` rows.

    ``observations`` / ``next_observations`` are a float32 tensor ``(N, obs_dim)``, or for dict
    observations a dict of tensors in the model input format (missions as token ids of
    :attr:`vocabulary`).
    """

    observations: TensorObs
    actions: torch.Tensor
    """``(N,)`` int64 for discrete actions, ``(N, d)`` float32 for continuous ones."""
    rewards: torch.Tensor
    """``(N,)`` float32."""
    next_observations: TensorObs
    dones: torch.Tensor
    """``(N,)`` float32, 1 only on the last step of a terminated episode."""
    episode_ids: torch.Tensor
    """``(N,)`` int64, the index of the transition's episode in the records it was built from."""
    expert_actions: torch.Tensor | None = None
    """Like ``actions``: the expert's label of each state, when every record carries labels."""
    vocabulary: Vocabulary | None = None
    """The vocabulary of the mission token ids (dict observations with missions only)."""

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def device(self) -> torch.device:
        return self.actions.device

    def to(self, device: torch.device | str) -> TransitionDataset:
        """The dataset on ``device``; moving it once up front keeps host-to-device copies out of training."""
        return replace(
            self,
            observations=_obs_to(self.observations, device),
            actions=self.actions.to(device),
            rewards=self.rewards.to(device),
            next_observations=_obs_to(self.next_observations, device),
            dones=self.dones.to(device),
            episode_ids=self.episode_ids.to(device),
            expert_actions=None if self.expert_actions is None else self.expert_actions.to(device),
        )

    @property
    def episode_starts(self) -> torch.Tensor:
        """``(N,)`` bool: the transitions that begin an episode (the rows are whole episodes in order)."""
        ids = self.episode_ids
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[1:] = ids[1:] != ids[:-1]
        return starts

    def subset(self, index: torch.Tensor) -> TransitionDataset:
        """The transitions selected by a boolean mask or integer index tensor."""
        return replace(
            self,
            observations=_index_obs(self.observations, index),
            actions=self.actions[index],
            rewards=self.rewards[index],
            next_observations=_index_obs(self.next_observations, index),
            dones=self.dones[index],
            episode_ids=self.episode_ids[index],
            expert_actions=None if self.expert_actions is None else self.expert_actions[index],
        )


def env_id_of(records: Sequence[StateTrajectoryRecord]) -> str:
    """The environment all ``records`` were recorded in."""
    if not records:
        raise MazerunError(NO_RECORDS)
    counts = Counter(record.env_id for record in records)
    if len(counts) > 1:
        found = ", ".join(
            f"{env_id} ({count} record{'s' if count > 1 else ''})" for env_id, count in counts.most_common()
        )
        raise MazerunError(
            f"the trajectory records come from {len(counts)} environments: {found}; "
            "point the dataset at the records of one environment"
        )
    return records[0].env_id


FAR_OUTSIDE = 10
"""A value lies far outside a Box when it is more than this many Box widths beyond a finite bound.

Recorded observations may leave their Box a little (LunarLander's are not clipped); a value ten
widths out is another env's data or a broken file."""


def describe_space(space: gym.Space) -> str:
    """A space in one short line: gymnasium prints a Box's bounds as arrays, over several lines."""
    if isinstance(space, gym.spaces.Box):
        low, high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
        return f"Box(shape {space.shape}, {space.dtype}, in [{low.min():g}, {high.max():g}])"
    if isinstance(space, gym.spaces.Dict):
        return f"Dict({', '.join(space.spaces)})"
    return " ".join(str(space).split())


def _first_row(bad: np.ndarray) -> int:
    """The first row of a ``(rows, ...)`` mask with any True entry."""
    return int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])


def column_problem(name: str, column: np.ndarray, space: gym.Space, rows: int, *, offset: int = 0,
                   unit: str = "step", ignore: int | None = None) -> str | None:
    """What is wrong with ``column`` (``rows`` entries of ``space``), or None; bad entries are named by row.

    The one check of a column's values, shared by records (a whole episode), stores at open and
    ``append`` (in chunks: ``offset`` is the chunk's first row) and HDF5/Minari files. ``ignore``
    marks entries that hold no value (DAgger's unlabelled states): that number for discrete
    actions, a row of NaN for a Box.
    """
    column = np.asarray(column)
    if isinstance(space, gym.spaces.Box):
        if column.shape != (rows, *space.shape):
            return f"{name} have shape {column.shape[1:]} per {unit}, expected {space.shape} from {describe_space(space)}"
        if not np.issubdtype(column.dtype, np.number):
            return f"{name} have dtype {column.dtype}, expected numbers ({space.dtype}) from {describe_space(space)}"
        if np.issubdtype(column.dtype, np.floating):
            values = column if ignore is None else np.where(np.isnan(column).all(axis=tuple(range(1, column.ndim)),
                                                                              keepdims=True), 0, column)
            finite = np.isfinite(values)
            if not finite.all():
                return f"{name} hold NaN or infinite values (first at {unit} {offset + _first_row(~finite)})"
        low, high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
        width = np.where(np.isfinite(high - low), high - low, np.inf)
        far = (column < low - FAR_OUTSIDE * width) | (column > high + FAR_OUTSIDE * width)
        if far.any():
            row = _first_row(far)
            value = column.reshape(len(column), -1)[row][far.reshape(len(column), -1)[row]][0]
            return (f"{name} hold {value:g} at {unit} {offset + row}, far outside {describe_space(space)} "
                    f"(more than {FAR_OUTSIDE} widths beyond its bounds)")
    elif isinstance(space, gym.spaces.Discrete):
        if column.shape != (rows,):
            return f"{name} have shape {column.shape[1:]} per {unit}, expected () from {space}"
        if not np.issubdtype(column.dtype, np.integer):
            return f"{name} have dtype {column.dtype}, expected integers from {space}"
        low, high = int(space.start), int(space.start + space.n)
        outside = (column < low) | (column >= high)
        if ignore is not None:
            outside &= column != ignore
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            return f"{name} contain {column[row]}, outside {space}, at {unit} {offset + row}"
    elif column.dtype.kind not in "UO":
        # MiniGrid missions (MissionSpace, or Text after a checkpoint round trip)
        return f"{name} have dtype {column.dtype}, expected strings from {describe_space(space)}"
    return None


def finite_problem(name: str, column: np.ndarray, *, offset: int = 0, unit: str = "step") -> str | None:
    """Non-finite numbers in a column that no space describes (rewards)."""
    column = np.asarray(column)
    if column.dtype.kind not in "biuf":
        return f"{name} have dtype {column.dtype}, expected numbers"
    if column.dtype.kind == "f":
        finite = np.isfinite(column)
        if not finite.all():
            return f"{name} hold NaN or infinite values (first at {unit} {offset + _first_row(~finite)})"
    return None


def record_problem(
    record: StateTrajectoryRecord, observation_space: gym.Space, action_space: gym.Space
) -> str | None:
    """What is wrong with ``record`` for an env of these spaces (types, lengths, shapes, ranges, NaN), or None.

    Every check training runs on an episode: the loaders call it, and so does ``append`` before it
    writes anything to a store.
    """
    try:
        record.check()
    except ValueError as error:
        return str(error)
    steps = len(record)
    observations = record.observations
    if isinstance(observation_space, gym.spaces.Dict):
        if not isinstance(observations, dict):
            shape = np.shape(observations)[1:]
            return (f"observations are an array of shape {shape} per step, expected a dict from "
                    f"{describe_space(observation_space)}")
        expected, found = sorted(observation_space.spaces), sorted(observations)
        if expected != found:
            return f"observation keys are {found}, expected {expected}"
        for key, space in observation_space.spaces.items():
            problem = column_problem(f"observations[{key!r}]", observations[key], space, steps + 1)
            if problem:
                return problem
    elif isinstance(observations, dict):
        return f"observations are a dict with keys {sorted(observations)}, expected {describe_space(observation_space)}"
    else:
        problem = column_problem("observations", observations, observation_space, steps + 1)
        if problem:
            return problem
    problem = finite_problem("rewards", record.rewards) or column_problem("actions", record.actions, action_space, steps)
    if problem is None and record.expert_actions is not None:
        problem = column_problem("expert_actions", record.expert_actions, action_space, steps, ignore=NO_LABEL)
    return problem


def check_records_match_spaces(
    records: Sequence[StateTrajectoryRecord], observation_space: gym.Space, action_space: gym.Space
) -> None:
    """Fail on the first record whose observations or actions do not fit the environment's spaces."""
    for record in records:
        problem = record_problem(record, observation_space, action_space)
        if problem:
            raise MazerunError(
                f"trajectory record {record.id} (env {record.env_id}, "
                f"policy {record.policy}) does not match the environment: {problem}; "
                "train on records of this environment or record them again"
            )


def build_vocabulary(records: Sequence[StateTrajectoryRecord]) -> Vocabulary:
    """The vocabulary of every mission in ``records`` (each distinct string tokenised once)."""
    missions: set[str] = set()
    for record in records:
        if not isinstance(record.observations, dict) or MISSION_KEY not in record.observations:
            raise ValueError(f"record {record.id} has no {MISSION_KEY!r} observations for a vocabulary")
        missions.update(np.unique(np.asarray(record.observations[MISSION_KEY], dtype=str)).tolist())
    return Vocabulary.build(missions)


def _as_tensor(column: np.ndarray) -> torch.Tensor:
    """Floats as float32, integers as int64 (embedding indices), uint8 and bool unchanged."""
    if np.issubdtype(column.dtype, np.floating):
        column = column.astype(np.float32, copy=False)
    elif np.issubdtype(column.dtype, np.integer) and column.dtype != np.uint8:
        column = column.astype(np.int64, copy=False)
    return torch.from_numpy(np.ascontiguousarray(column))


def records_to_dataset(
    records: Sequence[StateTrajectoryRecord], vocabulary: Vocabulary | None = None
) -> TransitionDataset:
    """All transitions of ``records``, each episode paired only with itself.

    For dict observations with missions, ``vocabulary`` maps them to token ids; it is built
    from ``records`` when not given (pass the model's vocabulary for data it was not built on).
    """
    if not records:
        raise MazerunError(NO_RECORDS)
    lengths = np.array([len(record) for record in records], dtype=np.int64)
    # Rows of the concatenated observation columns (T + 1 per episode) that start a transition
    # (all but each episode's final observation), and the rows that follow them.
    episode_starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    current = torch.from_numpy(np.repeat(episode_starts, lengths) + _ranges(lengths))
    following = current + 1

    first = records[0].observations
    if isinstance(first, dict):
        if any(not isinstance(record.observations, dict) for record in records):
            raise MazerunError(
                "some trajectory records have dict observations and some do not; use records of one environment"
            )
        observations: TensorObs = {}
        next_observations: TensorObs = {}
        for key in first:
            column = np.concatenate([record.observations[key] for record in records])
            if key == MISSION_KEY:
                if vocabulary is None:
                    vocabulary = build_vocabulary(records)
                full = vocabulary.encode(column)
            else:
                full = _as_tensor(column)
            observations[key] = full[current]
            next_observations[key] = full[following]
    else:
        full = _as_tensor(np.concatenate([record.observations for record in records]))
        observations, next_observations = full[current], full[following]

    dones = np.zeros(int(lengths.sum()), dtype=np.float32)
    terminated = np.array([record.terminated for record in records], dtype=bool)
    dones[(np.cumsum(lengths) - 1)[terminated]] = 1.0
    labelled = all(record.expert_actions is not None for record in records)
    return TransitionDataset(
        observations=observations,
        actions=_as_tensor(np.concatenate([np.asarray(record.actions) for record in records])),
        expert_actions=_as_tensor(np.concatenate([record.expert_actions for record in records])) if labelled else None,
        rewards=torch.from_numpy(np.concatenate([record.rewards for record in records]).astype(np.float32)),
        next_observations=next_observations,
        dones=torch.from_numpy(dones),
        episode_ids=torch.from_numpy(np.repeat(np.arange(len(records), dtype=np.int64), lengths)),
        vocabulary=vocabulary,
    )


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """``[0 .. l0-1, 0 .. l1-1, ...]`` without a Python loop over episodes."""
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


@overload
def split_by_episode(
    data: TransitionDataset, validation_percentage: float, seed: int
) -> tuple[TransitionDataset, TransitionDataset | None]: ...
@overload
def split_by_episode(
    data: Sequence[StateTrajectoryRecord], validation_percentage: float, seed: int
) -> tuple[list[StateTrajectoryRecord], list[StateTrajectoryRecord] | None]: ...


def split_by_episode(
    data: TransitionDataset | Sequence[StateTrajectoryRecord], validation_percentage: float, seed: int
) -> tuple[Any, Any]:
    """Hold out whole episodes for validation, so no validation step has its neighbours in training.

    The validation side gets ``round(n_episodes * pct / 100)`` episodes, at least 1 when
    ``pct > 0`` and at most ``n_episodes - 1``; with ``pct == 0`` it is ``None``.
    """
    if not 0 <= validation_percentage < 100:
        raise MazerunError(
            f"validation_percentage={validation_percentage} is outside [0, 100); "
            "use e.g. 10 to hold out a tenth of the episodes, or 0 for no validation"
        )
    if isinstance(data, TransitionDataset):
        episodes = torch.unique(data.episode_ids).cpu().numpy()
    else:
        data = list(data)
        episodes = np.arange(len(data))
    if validation_percentage == 0:
        return data, None
    count = len(episodes)
    if count < 2:
        raise MazerunError(
            f"validation_percentage={validation_percentage} needs at least 2 episodes (1 to train on, "
            f"1 to validate on) and the dataset has {count}; record more episodes or set it to 0"
        )
    n_validation = min(max(round(count * validation_percentage / 100), 1), count - 1)
    validation = np.random.default_rng(seed).permutation(episodes)[:n_validation]
    if isinstance(data, TransitionDataset):
        held_out = torch.isin(data.episode_ids, torch.as_tensor(validation, device=data.device))
        return data.subset(~held_out), data.subset(held_out)
    held = set(validation.tolist())
    return (
        [record for index, record in enumerate(data) if index not in held],
        [record for index, record in enumerate(data) if index in held],
    )


def observation_stats(observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (clamped to >= 1e-6) of vector observations ``(N, d)``, for the encoder."""
    if isinstance(observations, dict):
        raise ValueError("observation statistics are computed for vector observations only")
    values = observations.double()
    mean = values.mean(dim=0)
    std = values.std(dim=0, unbiased=False).clamp(min=1e-6)
    return mean.float(), std.float()


def transitions_at(data: TransitionDataset, index: torch.Tensor) -> TransitionBatch:
    """The transitions of ``data`` at ``index``: one gather per tensor."""
    return TransitionBatch(
        _gather_obs(data.observations, index),
        data.actions.index_select(0, index),
        data.rewards.index_select(0, index),
        _gather_obs(data.next_observations, index),
        data.dones.index_select(0, index),
        None if data.expert_actions is None else data.expert_actions.index_select(0, index),
    )


class BatchSampler:
    """Random minibatches drawn by index from a :class:`TransitionDataset`, reproducible by seed.

    Indices come from a ``torch.Generator`` on the dataset's device, so sampling on a GPU
    involves no host round trip; a batch is one gather per tensor.
    """

    def __init__(
        self, dataset: TransitionDataset, batch_size: int, seed: int, device: torch.device | str | None = None
    ) -> None:
        if len(dataset) == 0:
            raise MazerunError("the dataset has no transitions to sample; record longer or more episodes")
        if batch_size < 1:
            raise MazerunError(f"batch_size={batch_size} must be at least 1")
        self.dataset = dataset if device is None else dataset.to(device)
        # A batch larger than the dataset would repeat transitions in every batch (1e10 rows would not even
        # fit): it is clamped, and the first training batch says so once. A validation split smaller than a
        # batch is only read in epoch() chunks, where the clamp changes nothing.
        self.batch_size = min(batch_size, len(self.dataset))
        self.requested = batch_size if batch_size > len(self.dataset) else None
        self.generator = torch.Generator(device=self.dataset.device)
        self.generator.manual_seed(seed)

    def batch(self, index: torch.Tensor) -> TransitionBatch:
        """The transitions at ``index``."""
        return transitions_at(self.dataset, index)

    def first(self) -> TransitionBatch:
        """The first ``batch_size`` transitions, drawn without the generator (a check must not move the draws)."""
        return self.batch(torch.arange(self.batch_size, device=self.dataset.device))

    def sample(self) -> TransitionBatch:
        """``batch_size`` transitions drawn uniformly with replacement (at most as many as the dataset holds)."""
        if self.requested is not None:
            log.warning("batch_size=%d is more than the %d transitions of the dataset; drawing batches of %d "
                        "(set the batch size to at most %d, or train on more episodes)",
                        self.requested, len(self.dataset), self.batch_size, len(self.dataset))
            self.requested = None
        index = torch.randint(
            len(self.dataset), (self.batch_size,), generator=self.generator, device=self.dataset.device
        )
        return self.batch(index)

    def epoch(self, shuffle: bool = True) -> Iterator[TransitionBatch]:
        """One pass over every transition (e.g. a validation loss), shuffled or in order."""
        size = len(self.dataset)
        device = self.dataset.device
        if shuffle:
            order = torch.randperm(size, generator=self.generator, device=device)
        else:
            order = torch.arange(size, device=device)
        for start in range(0, size, self.batch_size):
            yield self.batch(order[start : start + self.batch_size])


def allocate_observations(shape: tuple[int, ...], observation_space: gym.Space, device: torch.device | str) -> TensorObs:
    """Zeroed model-input tensors with leading dimensions ``shape``, to be filled by :func:`store_observations`.

    Missions are token ids, right-padded; their width starts at 1 and grows with the longest one stored.
    """
    if isinstance(observation_space, gym.spaces.Dict):
        return {
            "image": torch.zeros(shape + observation_space["image"].shape, dtype=torch.uint8, device=device),
            "direction": torch.zeros(shape, dtype=torch.long, device=device),
            MISSION_KEY: torch.zeros(shape + (1,), dtype=torch.long, device=device),
        }
    return torch.zeros(shape + observation_space.shape, device=device)


def allocate_actions(shape: tuple[int, ...], action_space: gym.Space, device: torch.device | str) -> torch.Tensor:
    if isinstance(action_space, gym.spaces.Discrete):
        return torch.zeros(shape, dtype=torch.long, device=device)
    return torch.zeros(shape + action_space.shape, device=device)


def store_observations(store: TensorObs, index: Any, rows: TensorObs) -> TensorObs:
    """Write model-input ``rows`` at ``index`` of ``store``; returns the store (a dict may widen its missions)."""
    if not isinstance(store, dict):
        store[index] = rows
        return store
    tokens = rows[MISSION_KEY]
    width = tokens.shape[-1]
    stored_width = store[MISSION_KEY].shape[-1]
    if width > stored_width:
        store[MISSION_KEY] = torch.nn.functional.pad(store[MISSION_KEY], (0, width - stored_width))
    store["image"][index] = rows["image"]
    store["direction"][index] = rows["direction"]
    store[MISSION_KEY][index] = 0
    store[MISSION_KEY][index][..., :width] = tokens
    return store


class SequenceSampler:
    """Chunks of consecutive transitions for recurrent models, gathered by index from the dataset's tensors.

    A batch is ``nrollouts`` chunks of ``rollout_len`` steps, each starting at a uniformly drawn
    row; rows ``stride`` apart are consecutive steps (1 for records, whose episodes lie end to
    end; ``n_envs`` for DAgger's aggregate, where the env copies' steps interleave). Chunks may
    cross episode boundaries: ``starts`` tells the model where to reset its state. With
    ``burn_in > 0`` the steps before each chunk come along to warm the state; where they would
    reach before a stream's first row they repeat that row, an episode start, so the warm
    state is exactly the state after the steps that do exist.
    """

    def __init__(
        self, dataset: TransitionDataset, rollout_len: int, nrollouts: int, burn_in: int, seed: int, stride: int = 1,
        starts: torch.Tensor | None = None, generator: torch.Generator | None = None,
    ) -> None:
        self.dataset, self.rollout_len, self.nrollouts, self.burn_in, self.stride = (
            dataset, rollout_len, nrollouts, burn_in, stride)
        self.starts = dataset.episode_starts if starts is None else starts
        device = dataset.device
        self.span = (rollout_len - 1) * stride
        self.offsets = torch.arange(rollout_len, device=device) * stride
        self.burn_in_offsets = torch.arange(-burn_in, 0, device=device) * stride
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        self.generator = generator

    def __len__(self) -> int:
        """How many chunk starts there are."""
        return max(0, len(self.dataset) - self.span)

    def batch(self, first_rows: torch.Tensor) -> SequenceBatch:
        """The chunks that begin at ``first_rows`` ``(B,)``."""
        index = first_rows[None, :] + self.offsets[:, None]  # (T, B)
        data = self.dataset
        flat = index.reshape(-1)
        steps, batch = index.shape

        def gather(column: torch.Tensor | None) -> torch.Tensor | None:
            return None if column is None else column.index_select(0, flat).view(steps, batch, *column.shape[1:])

        def gather_obs(obs: TensorObs, rows: torch.Tensor) -> TensorObs:
            shape = rows.shape
            picked = _gather_obs(obs, rows.reshape(-1))
            if isinstance(picked, dict):
                return {key: value.view(*shape, *value.shape[1:]) for key, value in picked.items()}
            return picked.view(*shape, *picked.shape[1:])

        burn_in_observations = burn_in_starts = None
        if self.burn_in:
            first_of_stream = first_rows % self.stride
            rows = torch.maximum(first_rows[None, :] + self.burn_in_offsets[:, None], first_of_stream[None, :])
            burn_in_observations = gather_obs(data.observations, rows)
            burn_in_starts = self.starts.index_select(0, rows.reshape(-1)).view(rows.shape)
        return SequenceBatch(
            observations=gather_obs(data.observations, index),
            actions=gather(data.actions),
            rewards=gather(data.rewards),
            next_observations=gather_obs(data.next_observations, index),
            dones=gather(data.dones),
            expert_actions=gather(data.expert_actions),
            starts=self.starts.index_select(0, flat).view(steps, batch),
            burn_in_observations=burn_in_observations,
            burn_in_starts=burn_in_starts,
        )

    def sample(self) -> SequenceBatch:
        """``nrollouts`` chunks starting at uniformly drawn rows."""
        first = torch.randint(len(self), (self.nrollouts,), generator=self.generator, device=self.dataset.device)
        return self.batch(first)

    def epoch(self, shuffle: bool = False) -> Iterator[SequenceBatch]:
        """Chunks side by side over every row (a tail shorter than a chunk is left out), ``nrollouts`` at a time."""
        device = self.dataset.device
        firsts = torch.cat([torch.arange(lane, len(self), self.rollout_len * self.stride, device=device)
                            for lane in range(self.stride)])
        if shuffle:
            firsts = firsts[torch.randperm(len(firsts), generator=self.generator, device=device)]
        for begin in range(0, len(firsts), self.nrollouts):
            yield self.batch(firsts[begin : begin + self.nrollouts])


def longest_episode(dataset: TransitionDataset) -> int:
    """The most transitions any episode of ``dataset`` has."""
    return int(torch.unique_consecutive(dataset.episode_ids, return_counts=True)[1].max())
