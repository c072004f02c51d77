"""A replay buffer: the last ``capacity`` transitions of a vector env, in tensors allocated once.

Rows are written in the order the env copies step (a ring: the oldest are overwritten) and
drawn uniformly, as a :class:`~mazerun.data.tensors.TransitionBatch`, the batch every
batch-fed algorithm reads. ``dones`` marks terminal transitions only: an episode cut off by a
time limit keeps its future, and its ``next_observations`` row is the episode's final
observation (not the next episode's first, which the env returns in its place). Observations
are vectors (a 1-D Box): the continuous-action learners that replay never meet MiniGrid's dicts.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch

from mazerun.data.tensors import TransitionBatch, allocate_actions

COLUMNS = ("observations", "next_observations", "actions", "rewards", "dones")


class ReplayBuffer:
    """Transitions ``(capacity, ...)`` on the training device; :meth:`state` is what ``last.pt`` keeps of it."""

    def __init__(self, capacity: int, observation_space: gym.Space, action_space: gym.Space,
                 device: torch.device | str) -> None:
        self.capacity, self.device = capacity, torch.device(device)
        self.observations = torch.zeros((capacity, *observation_space.shape), device=device)
        self.next_observations = torch.zeros((capacity, *observation_space.shape), device=device)
        self.actions = allocate_actions((capacity,), action_space, device)
        self.rewards = torch.zeros(capacity, device=device)
        self.dones = torch.zeros(capacity, device=device)
        self.position = 0
        """Where the next row is written."""
        self.size = 0
        """Rows filled so far (at most ``capacity``)."""

    def __len__(self) -> int:
        return self.size

    def add(self, observations: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
            next_observations: torch.Tensor, terminated: torch.Tensor) -> None:
        """One row per env copy; ``terminated`` (not ``truncated``) is what stops the bootstrap."""
        count = len(actions)
        index = torch.arange(self.position, self.position + count, device=self.device) % self.capacity
        self.observations[index] = observations
        self.next_observations[index] = next_observations
        self.actions[index] = actions
        self.rewards[index] = rewards
        self.dones[index] = terminated.to(self.dones.dtype)
        self.position = (self.position + count) % self.capacity
        self.size = min(self.size + count, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> TransitionBatch:
        """``batch_size`` rows drawn uniformly (with replacement) from ``generator``."""
        index = torch.randint(self.size, (batch_size,), generator=generator, device=self.device)
        return TransitionBatch(self.observations[index], self.actions[index], self.rewards[index],
                               self.next_observations[index], self.dones[index])

    def state(self) -> dict[str, Any]:
        """The filled rows on the CPU, the capacity and the write position: plain tensors and numbers, for
        ``torch.load(weights_only=True)``."""
        return {"capacity": self.capacity, "position": self.position, "size": self.size,
                **{name: getattr(self, name)[: self.size].cpu() for name in COLUMNS}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` of a buffer of the same capacity."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"the saved replay buffer holds {state['capacity']} transitions, this one {self.capacity}")
        self.size, self.position = int(state["size"]), int(state["position"])
        for name in COLUMNS:
            getattr(self, name)[: self.size] = state[name].to(self.device)
