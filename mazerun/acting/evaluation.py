"""Evaluation rollouts of a network, shared by every trainer.

Exactly ``n_episodes`` episodes are played on fixed seeds ``EVAL_SEED_OFFSET + i``, far from
the seeds recorded demonstrations use, so a clone is never scored on the episodes it copied.
Several environments step side by side with one batched forward pass, but each plays its own
list of seeds: unlike a plain auto-resetting vector env, short episodes are never over-sampled.
A network with memory keeps one state per environment, restarted where its episode starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union

import gymnasium as gym
import numpy as np
import torch

from mazerun.acting.envs import is_minigrid, make_env
from mazerun.acting.vector import stack_observations
from mazerun.core.progress import Progress
from mazerun.nn.models import ModelInput, Vocabulary, obs_to_tensor

EVAL_SEED_OFFSET = 1_000_000
"""Evaluation episode i is seeded EVAL_SEED_OFFSET + i; recordings start at runner.seed (0)."""

MAX_PARALLEL_EVAL_ENVS = 16

ActFn = Callable[[ModelInput], torch.Tensor]
"""Maps a batch of model inputs to a batch of actions (a policy without memory, e.g. a peer library's)."""


class Stepper(Protocol):
    """A network that acts step by step from a state (every mazerun network: the state is empty without memory)."""

    def initial_state(self, batch: int, device: torch.device | str) -> torch.Tensor: ...

    def act_step(self, obs: ModelInput, state: torch.Tensor, starts: torch.Tensor,
                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]: ...


class _Stateless:
    """An :data:`ActFn` as a :class:`Stepper` with an empty state."""

    def __init__(self, act: ActFn) -> None:
        self.act = act

    def initial_state(self, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(batch, 0, device=device)

    def act_step(self, obs: ModelInput, state: torch.Tensor, starts: torch.Tensor,
                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.act(obs), state


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


@torch.no_grad()
def evaluate(
    policy: Union[Stepper, ActFn],
    env_id: str,
    n_episodes: int,
    *,
    observation_space: gym.Space,
    vocabulary: Vocabulary | None,
    device: torch.device | str,
    max_episode_steps: int | None = None,
    seed_offset: int = EVAL_SEED_OFFSET,
) -> EvaluationResult:
    """Play ``n_episodes`` greedy episodes of ``policy`` (a network, or a plain function of observations)."""
    stepper: Stepper = policy if hasattr(policy, "act_step") else _Stateless(policy)
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
    state = stepper.initial_state(n_envs, device)
    starts = torch.ones(n_envs, dtype=torch.bool, device=device)
    result = EvaluationResult([], [], [] if is_minigrid(env_id) else None)
    progress = Progress(n_episodes, unit="episode", desc="evaluation", leave=False)
    try:
        while active:
            batch = obs_to_tensor(stack_observations([observations[i] for i in active]),
                                  observation_space, vocabulary, device)
            rows = torch.as_tensor(active, device=device)
            actions, state[rows] = stepper.act_step(batch, state[rows], starts[rows], deterministic=True)
            starts[rows] = False
            actions = actions.cpu().numpy()
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
                progress.update()
                if result.successes is not None:
                    result.successes.append(bool(terminated and reward > 0))
                if next_seed < n_episodes:
                    observations[env_index], _ = env.reset(seed=seeds[next_seed])
                    starts[env_index] = True
                    next_seed += 1
                    returns[env_index], lengths[env_index] = 0.0, 0
                    still_active.append(env_index)
            active = still_active
    finally:
        progress.close()
        for env in envs:
            env.close()
    return result
