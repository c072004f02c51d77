"""Env copies stepped into preallocated arrays and reset in place: the lean path between the envs and the policy.

A step of copy ``i`` writes its observation, reward and end flags into row ``i`` of arrays
allocated once (:class:`StepArrays`); nothing else is built per step. A copy whose episode ended
is reset within the same step (gymnasium's ``SAME_STEP`` auto-reset): its row then holds the
next episode's first observation, and ``final_observations`` the ended one's last, which the
truncation bootstrap needs. The arrays may live in shared memory, so that a worker process steps
some of the copies (:mod:`mazerun.acting.workers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np

Replay = tuple[list[Any], list[float], list[dict]]
"""A copy's running episode rebuilt: its observations, rewards and infos from its reset to now."""
EpisodeState = tuple[int, np.ndarray]
"""A copy's episode index and the actions taken in it so far (:meth:`SeededEpisodes.episode_state`)."""
Layout = dict[str, tuple[tuple[int, ...], np.dtype]]
"""The shape and dtype of each field of :class:`StepArrays`."""
ALIGNMENT = 64
"""Each field starts on a cache line of its own."""


def _aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


@dataclass
class StepArrays:
    """What a step of the copies writes, one row per copy: allocated once, in shared memory for a worker."""

    observations: np.ndarray
    final_observations: np.ndarray
    """A copy's last observation of the episode that ended on this step (stale elsewhere)."""
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    expert_actions: np.ndarray | None = None
    """With an expert: its label of each copy's current observation."""

    @staticmethod
    def layout(n_envs: int, observation_space: gym.Space, action_space: gym.Space, labelled: bool) -> Layout:
        """Each field's shape and dtype. Rewards are float64, as gymnasium's vector envs return them."""
        observation = ((n_envs, *observation_space.shape), np.dtype(observation_space.dtype))
        discrete = isinstance(action_space, gym.spaces.Discrete)
        action = ((n_envs,), np.dtype(np.int64)) if discrete else ((n_envs, *action_space.shape),
                                                                    np.dtype(action_space.dtype))
        layout = {"observations": observation, "final_observations": observation, "actions": action,
                  "rewards": ((n_envs,), np.dtype(np.float64)), "terminated": ((n_envs,), np.dtype(bool)),
                  "truncated": ((n_envs,), np.dtype(bool))}
        if labelled:  # ExpertActions' labels: NO_LABEL for discrete actions, NaN rows for continuous ones
            layout["expert_actions"] = action if discrete else ((n_envs, *action_space.shape), np.dtype(np.float32))
        return layout

    @staticmethod
    def size(layout: Layout) -> int:
        """Bytes of memory the arrays of ``layout`` take, laid one after another (:meth:`on`)."""
        return sum(_aligned(math.prod(shape) * dtype.itemsize) for shape, dtype in layout.values())

    @classmethod
    def on(cls, layout: Layout, memory: Any) -> StepArrays:
        """The arrays of ``layout`` laid one after another in ``memory`` (a bytearray, or a mapping a worker shares)."""
        arrays, offset = {}, 0
        for name, (shape, dtype) in layout.items():
            arrays[name] = np.ndarray(shape, dtype, buffer=memory, offset=offset)
            offset += _aligned(math.prod(shape) * dtype.itemsize)
        return cls(**arrays)

    def rows(self, rows: slice) -> StepArrays:
        """Views of ``rows`` of every field."""
        return StepArrays(**{item.name: None if getattr(self, item.name) is None else getattr(self, item.name)[rows]
                             for item in fields(self)})


class EnvCopies:
    """Seeded env copies stepped one after another, each into its row of ``arrays``, in the process that owns them.

    A copy is a :class:`SeededEpisodes` (with :class:`ExpertActions` inside when labelled).
    """

    def __init__(self, envs: list[gym.Env], arrays: StepArrays) -> None:
        self.envs, self.arrays = envs, arrays

    def reset(self) -> None:
        for index, env in enumerate(self.envs):
            self._observe(index, *env.reset())

    def send(self) -> None:
        """Step every copy with its row of ``arrays.actions`` now."""
        arrays = self.arrays
        for index, env in enumerate(self.envs):
            observation, reward, terminated, truncated, info = env.step(arrays.actions[index])
            arrays.rewards[index], arrays.terminated[index], arrays.truncated[index] = reward, terminated, truncated
            if terminated or truncated:
                arrays.final_observations[index] = observation
                observation, info = env.reset()
            self._observe(index, observation, info)

    def wait(self) -> None:
        """The copies stepped within :meth:`send`: nothing to wait for."""

    def settle(self) -> None:
        """The copies reset within :meth:`reset`: nothing to wait for."""

    def _observe(self, index: int, observation: Any, info: dict) -> None:
        self.arrays.observations[index] = observation
        if self.arrays.expert_actions is not None:
            self.arrays.expert_actions[index] = info["expert_action"]

    def episode_states(self) -> list[EpisodeState]:
        return [env.episode_state() for env in self.envs]

    def replay(self, states: list[EpisodeState]) -> list[Replay]:
        replays = []
        for index, (env, state) in enumerate(zip(self.envs, states)):
            env.pending_replay = state
            observations, rewards, infos = env.replay()
            self._observe(index, observations[-1], infos[-1])
            replays.append((observations, rewards, infos))
        return replays

    def close(self) -> None:
        for env in self.envs:
            env.close()
