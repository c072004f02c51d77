"""Evaluation rollouts of a network, shared by every trainer.

Exactly ``n_episodes`` episodes are played on fixed seeds ``EVAL_SEED_OFFSET + i``, far from
the seeds recorded demonstrations use, so a clone is never scored on the episodes it copied.
Several environments step side by side with one batched forward pass, but each plays its own
list of seeds: unlike a plain auto-resetting vector env, short episodes are never over-sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch

from mazerun.envs import is_minigrid, make_env
from mazerun.models import ModelInput, Vocabulary, obs_to_tensor

EVAL_SEED_OFFSET = 1_000_000
"""Evaluation episode i is seeded EVAL_SEED_OFFSET + i; recordings start at runner.seed (0)."""

MAX_PARALLEL_EVAL_ENVS = 16

ActFn = Callable[[ModelInput], torch.Tensor]
"""Maps a batch of model inputs to a batch of actions."""


@dataclass
class EvaluationResult:
    returns: list[float]
    lengths: list[int]
    successes: list[bool] | None
    """Per episode, for MiniGrid/BabyAI (reached the goal); None elsewhere."""

    def metrics(self) -> dict[str, float]:
        metrics = {
            "mean_return": float(np.mean(self.returns)),
            "std_return": float(np.std(self.returns)),
            "mean_length": float(np.mean(self.lengths)),
        }
        if self.successes is not None:
            metrics["success_rate"] = float(np.mean(self.successes))
        return metrics


def stack_observations(observations: list[Any]) -> Any:
    """Batch single env observations the way gymnasium vector envs do (dicts of arrays)."""
    if isinstance(observations[0], dict):
        return {key: np.stack([obs[key] for obs in observations]) if key != "mission"
                else [obs[key] for obs in observations] for key in observations[0]}
    return np.stack(observations)


@torch.no_grad()
def evaluate(
    act: ActFn,
    env_id: str,
    n_episodes: int,
    *,
    observation_space: gym.Space,
    vocabulary: Vocabulary | None,
    device: torch.device | str,
    max_episode_steps: int | None = None,
    seed_offset: int = EVAL_SEED_OFFSET,
) -> EvaluationResult:
    """Play ``n_episodes`` episodes with ``act`` and return what they scored."""
    n_envs = min(n_episodes, MAX_PARALLEL_EVAL_ENVS)
    envs = [make_env(env_id, max_episode_steps=max_episode_steps) for _ in range(n_envs)]
    seeds = [seed_offset + i for i in range(n_episodes)]
    next_seed = 0
    observations: list[Any] = []
    returns = np.zeros(n_envs)
    lengths = np.zeros(n_envs, dtype=np.int64)
    for env in envs:
        observation, _ = env.reset(seed=seeds[next_seed])
        observations.append(observation)
        next_seed += 1
    active = list(range(n_envs))
    result = EvaluationResult([], [], [] if is_minigrid(env_id) else None)
    try:
        while active:
            batch = obs_to_tensor(stack_observations([observations[i] for i in active]),
                                  observation_space, vocabulary, device)
            actions = act(batch).cpu().numpy()
            still_active = []
            for slot, env_index in enumerate(active):
                env = envs[env_index]
                observation, reward, terminated, truncated, _ = env.step(actions[slot])
                returns[env_index] += reward
                lengths[env_index] += 1
                observations[env_index] = observation
                if not (terminated or truncated):
                    still_active.append(env_index)
                    continue
                result.returns.append(float(returns[env_index]))
                result.lengths.append(int(lengths[env_index]))
                if result.successes is not None:
                    result.successes.append(bool(terminated and reward > 0))
                if next_seed < n_episodes:
                    observations[env_index], _ = env.reset(seed=seeds[next_seed])
                    next_seed += 1
                    returns[env_index], lengths[env_index] = 0.0, 0
                    still_active.append(env_index)
            active = still_active
    finally:
        for env in envs:
            env.close()
    return result
