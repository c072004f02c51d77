"""Env copies stepped side by side for a learner, in two halves that the policy and the envs take turns on.

Every vector env here has the same surface (:class:`VectorSteps`): the current observations of
all copies, and a step that resets a finished episode within the step that ends it (gymnasium's
``SAME_STEP`` auto-reset: the copy's row then holds the next episode's first observation, and
``infos["final_obs"]`` the ended one's last, which the truncation bootstrap needs).

The copies are split in two halves. A loop acts on half A and sends its actions, then acts on
half B while A steps, and so on (PufferLib's and EnvPool's double buffering). Which process steps
a half is the mode's business, and no mode changes what the loop sees:

* ``sync``: the main process steps both halves (an :class:`ArrayVectorEnv` of two local parts);
* ``worker``: a worker process steps half B over shared memory (:mod:`mazerun.acting.workers`)
  while the main process acts on half A and steps it, so the envs and the policy use two cores;
* ``async``: gymnasium's one process per copy; MiniGrid's dict observations (mission strings
  fit no array) take gymnasium's sync path. These step all copies when the last half's actions
  are in (:class:`GymnasiumVectorEnv`).

Every mode acts on the same halves in the same order, so a seed gives the same trajectories
and the same metrics in every mode. Box and Discrete observations are stepped into arrays
allocated once (:mod:`mazerun.acting.copies`): nothing is built per step between the envs and
the policy.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Protocol

import gymnasium as gym
import numpy as np

from mazerun.acting.copies import EnvCopies, EpisodeState, Layout, Replay, StepArrays
from mazerun.acting.envs import ExpertActions, SeededEpisodes, Teacher, is_minigrid, make_env
from mazerun.acting.workers import WorkerCopies, shared_memory
from mazerun.core.errors import MazerunError


def split_in_halves(n_envs: int) -> tuple[slice, ...]:
    """The rows of the two halves (the second the larger), or of one when there is a single copy."""
    if n_envs < 2:
        return (slice(0, n_envs),)
    return slice(0, n_envs // 2), slice(n_envs // 2, n_envs)


def observation_rows(observations: Any, rows: slice) -> Any:
    """Rows of batched observations: an array, or gymnasium's dict of them (MiniGrid)."""
    if isinstance(observations, dict):
        return {key: value[rows] for key, value in observations.items()}
    return observations[rows]


def stack_observations(observations: list[Any]) -> Any:
    """Batch single env observations the way gymnasium vector envs do (dicts of arrays)."""
    if isinstance(observations[0], dict):
        return {key: np.stack([obs[key] for obs in observations]) if key != "mission"
                else [obs[key] for obs in observations] for key in observations[0]}
    return np.stack(observations)


def steps_in_arrays(space: gym.Space) -> bool:
    """Observations that fit a preallocated array (Box, Discrete); MiniGrid's dicts carry strings."""
    return isinstance(space, (gym.spaces.Box, gym.spaces.Discrete))


class VectorSteps(Protocol):
    """What the learners' loops step: ``num_envs`` copies in ``halves``, their observations and step results."""

    num_envs: int
    single_observation_space: gym.Space
    single_action_space: gym.Space
    halves: tuple[slice, ...]
    observations: Any
    """Every copy's current observation (the next episode's first where one just ended)."""
    infos: dict[str, Any]
    """``final_obs`` (per copy, read where an episode just ended) and, with an expert, ``expert_action``.
    Where the copies step in shared arrays these, like ``observations``, are the arrays themselves, which the
    next step overwrites: copy what must outlive it."""

    def reset(self) -> None:
        """Start every copy's first episode; :attr:`observations` waits for it where a worker still resets."""

    def send(self, half: int, actions: np.ndarray) -> None:
        """Start stepping ``half`` with ``actions`` (its rows' actions)."""

    def receive(self, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wait for ``half``'s step; its rows' rewards, terminated and truncated flags."""

    def step(self, actions: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every copy at once (gymnasium's ``step``)."""

    def episode_states(self) -> list[EpisodeState]: ...

    def replay(self, states: list[EpisodeState]) -> list[Replay]:
        """Rebuild each copy's running episode from its state; the observations are then where it stopped."""

    def close(self) -> None: ...


class Part(Protocol):
    """Who steps a half: :class:`EnvCopies` here, or a worker (:class:`mazerun.acting.workers.WorkerCopies`)."""

    def reset(self) -> None: ...

    def send(self) -> None: ...

    def wait(self) -> None: ...

    def settle(self) -> None:
        """Wait for a reset still in flight: before the copies' observations are read."""

    def episode_states(self) -> list[EpisodeState]: ...

    def replay(self, states: list[EpisodeState]) -> list[Replay]: ...

    def close(self) -> None: ...


class ArrayVectorEnv:
    """Copies with Box or Discrete observations stepped into :class:`StepArrays`, one part per half."""

    def __init__(self, arrays: StepArrays, parts: list[Part], observation_space: gym.Space,
                 action_space: gym.Space) -> None:
        self.arrays, self.parts = arrays, parts
        self.num_envs = len(arrays.rewards)
        self.halves = split_in_halves(self.num_envs)
        assert len(self.halves) == len(parts), "one part steps each half"
        self.single_observation_space, self.single_action_space = observation_space, action_space
        self._infos: dict[str, Any] = {"final_obs": arrays.final_observations}
        if arrays.expert_actions is not None:
            self._infos["expert_action"] = arrays.expert_actions

    @property
    def observations(self) -> np.ndarray:
        for part in self.parts:
            part.settle()
        return self.arrays.observations

    @property
    def infos(self) -> dict[str, Any]:
        for part in self.parts:
            part.settle()
        return self._infos

    def reset(self) -> None:
        for part in self.parts:
            part.reset()

    def send(self, half: int, actions: np.ndarray) -> None:
        self.arrays.actions[self.halves[half]] = actions
        self.parts[half].send()

    def receive(self, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.parts[half].wait()
        rows, arrays = self.halves[half], self.arrays
        return arrays.rewards[rows], arrays.terminated[rows], arrays.truncated[rows]

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        # the last half first: a worker's half steps while this process steps its own
        for half in reversed(range(len(self.halves))):
            self.send(half, actions[self.halves[half]])
        for half in range(len(self.halves)):
            self.parts[half].wait()
        arrays = self.arrays
        return arrays.observations, arrays.rewards, arrays.terminated, arrays.truncated, self._infos

    def episode_states(self) -> list[EpisodeState]:
        return [state for part in self.parts for state in part.episode_states()]

    def replay(self, states: list[EpisodeState]) -> list[Replay]:
        return [replay for part, rows in zip(self.parts, self.halves) for replay in part.replay(states[rows])]

    def close(self) -> None:
        for part in self.parts:
            part.close()


class GymnasiumVectorEnv:
    """A gymnasium vector env behind the halves: it steps every copy once the last half's actions are in.

    For MiniGrid's dict observations and ``runner.vector=async`` (one process per copy).
    """

    def __init__(self, envs: gym.vector.VectorEnv) -> None:
        self.envs = envs
        self.num_envs = envs.num_envs
        self.halves = split_in_halves(self.num_envs)
        self.single_observation_space = envs.single_observation_space
        self.single_action_space = envs.single_action_space
        self.observations: Any = None
        self.infos: dict[str, Any] = {}
        self._results: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._actions: list[np.ndarray] = []

    def reset(self) -> None:
        self.observations, self.infos = self.envs.reset()

    def send(self, half: int, actions: np.ndarray) -> None:
        self._actions.append(actions)
        if half == len(self.halves) - 1:
            actions, self._actions = np.concatenate(self._actions), []
            self.step(actions)

    def receive(self, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self.halves[half]
        return tuple(result[rows] for result in self._results)

    def step(self, actions: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        self.observations, rewards, terminated, truncated, self.infos = self.envs.step(actions)
        self._results = rewards, terminated, truncated
        return self.observations, rewards, terminated, truncated, self.infos

    def episode_states(self) -> list[EpisodeState]:
        return list(self.envs.call("episode_state"))

    def replay(self, states: list[EpisodeState]) -> list[Replay]:
        self.envs.set_attr("pending_replay", states)
        replays = list(self.envs.call("replay"))
        self.observations = stack_observations([observations[-1] for observations, _, _ in replays])
        last_infos = [infos[-1] for _, _, infos in replays]
        self.infos = {key: np.stack([info[key] for info in last_infos]) for key in last_infos[0]
                      if key == "expert_action"}
        return replays

    def close(self) -> None:
        self.envs.close()


def _make_copy(
    env_id: str, index: int, n_envs: int, seed: int, max_episode_steps: int | None,
    make_expert: Callable[[gym.Env], Teacher] | None,
) -> gym.Env:
    env = make_env(env_id, max_episode_steps=max_episode_steps)
    if make_expert is not None:
        env = ExpertActions(env, make_expert(env))
    return SeededEpisodes(env, first_seed=seed + index, stride=n_envs)


def _given(env: gym.Env) -> gym.Env:
    """A thunk of a copy built already (the first one, built to read the spaces)."""
    return env


def make_vector_env(
    env_id: str,
    n_envs: int,
    vector: str,
    max_episode_steps: int | None,
    *,
    seed: int = 0,
    make_expert: Callable[[gym.Env], Teacher] | None = None,
) -> VectorSteps:
    """``n_envs`` seeded copies of ``env_id``, stepped as ``vector`` (:data:`mazerun.config.schemas.VECTOR_MODES`) says.

    Copy ``i`` plays its episodes on seeds ``seed + i``, ``seed + i + n_envs``, ...;
    ``make_expert`` adds an expert labelling every state (``infos["expert_action"]``). A
    worker builds its copies itself, so ``make_expert`` must then pickle (a function, not a lambda).
    """
    thunks = [partial(_make_copy, env_id, index, n_envs, seed, max_episode_steps, make_expert)
              for index in range(n_envs)]
    same_step = gym.vector.AutoresetMode.SAME_STEP
    if vector == "async":
        # MiniGrid's mission strings do not fit in shared memory. Workers start from a fork server:
        # forking a process whose torch thread pool is running (a trained expert) can deadlock.
        return GymnasiumVectorEnv(gym.vector.AsyncVectorEnv(thunks, shared_memory=not is_minigrid(env_id), copy=False,
                                                            autoreset_mode=same_step, context="forkserver"))
    first = thunks[0]()
    observation_space, action_space = first.observation_space, first.action_space
    if not steps_in_arrays(observation_space):
        if vector == "worker":
            first.close()
            raise MazerunError(f"runner.vector=worker steps Box or Discrete observations in shared memory and {env_id} "
                               f"observes a {type(observation_space).__name__}; use runner.vector=sync or async")
        envs = [first, *(thunk() for thunk in thunks[1:])]
        return GymnasiumVectorEnv(gym.vector.SyncVectorEnv([partial(_given, env) for env in envs], copy=False,
                                                           autoreset_mode=same_step))
    if vector == "auto":
        # here, not at the top: a worker imports this module, and has no use for the config schemas (omegaconf)
        from mazerun.config.schemas import CGROUP_CPU_MAX, usable_cpus

        vector = "worker" if n_envs >= 2 and usable_cpus(CGROUP_CPU_MAX) >= 2 else "sync"
    layout = StepArrays.layout(n_envs, observation_space, action_space, make_expert is not None)
    if vector == "worker":
        return _with_worker(first, thunks, layout, observation_space, action_space)
    arrays = StepArrays.on(layout, bytearray(StepArrays.size(layout)))
    envs = [first, *(thunk() for thunk in thunks[1:])]
    parts: list[Part] = [EnvCopies(envs[rows], arrays.rows(rows)) for rows in split_in_halves(n_envs)]
    return ArrayVectorEnv(arrays, parts, observation_space, action_space)


def _with_worker(first: gym.Env, thunks: list[Callable[[], gym.Env]], layout: Layout, observation_space: gym.Space,
                 action_space: gym.Space) -> ArrayVectorEnv:
    """Half A (``first`` and the copies after it) stepped here, half B by a worker, in memory both map."""
    own, theirs = split_in_halves(len(thunks))  # validation refuses runner.vector=worker with one copy
    descriptor, memory = shared_memory(StepArrays.size(layout))
    arrays = StepArrays.on(layout, memory)
    try:  # the worker first: its start-up overlaps the rest of ours
        worker = WorkerCopies(thunks[theirs], layout, descriptor, theirs)
    finally:
        os.close(descriptor)  # the worker has its own; the mapping stays
    try:
        local = EnvCopies([first, *(thunk() for thunk in thunks[1:own.stop])], arrays.rows(own))
    except BaseException:
        worker.close()
        raise
    return ArrayVectorEnv(arrays, [local, worker], observation_space, action_space)
