"""The small protocol every acting policy follows, so scripted experts and trained networks plug in alike."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class Policy:
    """Chooses actions for one environment, one episode at a time.

    The runner calls :meth:`reset` after each ``env.reset``, then :meth:`act` per step. When a
    wrapper replaces the chosen action (epsilon-greedy noise), it reports the action actually
    taken through :meth:`took`, so stateful experts such as the BabyAI bot can replan.
    """

    name: str = "policy"

    def reset(self, env: gym.Env, seed: int | None) -> None:
        """Start a new episode in ``env`` (already reset)."""

    def act(self, observation: Any) -> Any:
        raise NotImplementedError

    def took(self, action: Any) -> None:
        """The action executed this step differed from the one :meth:`act` returned."""


class RandomPolicy(Policy):
    """Uniformly random actions from the action space, seeded per episode."""

    name = "random"

    def __init__(self, action_space: gym.Space) -> None:
        self.action_space = action_space

    def reset(self, env: gym.Env, seed: int | None) -> None:
        self.action_space.seed(seed)

    def act(self, observation: Any) -> Any:
        return self.action_space.sample()


class EpsilonGreedyPolicy(Policy):
    """Replace a share ``epsilon`` of the expert's actions with random ones (noisy offline datasets)."""

    def __init__(self, expert: Policy, action_space: gym.Space, epsilon: float) -> None:
        self.expert = expert
        self.name = f"{expert.name}+epsilon{epsilon:g}"
        self.action_space = action_space
        self.epsilon = epsilon
        self._rng = np.random.default_rng()

    def reset(self, env: gym.Env, seed: int | None) -> None:
        self.expert.reset(env, seed)
        self.action_space.seed(None if seed is None else seed + 1_000_003)
        self._rng = np.random.default_rng(seed)

    def act(self, observation: Any) -> Any:
        action = self.expert.act(observation)
        if self._rng.random() < self.epsilon:
            action = self.action_space.sample()
            self.expert.took(action)
        return action
