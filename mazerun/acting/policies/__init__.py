"""Acting policies: scripted experts, random, and (from a checkpoint) trained networks."""

from __future__ import annotations

import gymnasium as gym

from mazerun.acting.policies.base import EpsilonGreedyPolicy, Policy, RandomPolicy
from mazerun.acting.policies.heuristic import bot_for, heuristic_for
from mazerun.acting.policies.planner import planner_for
from mazerun.config.schemas import HEURISTIC_ALIASES, PolicyConfig
from mazerun.core.errors import MazerunError

__all__ = ["Policy", "build_policy"]


def build_policy(
    config: PolicyConfig, env_id: str, action_space: gym.Space, *, input_dir: str | None = None
) -> Policy:
    """The policy named by ``config`` for ``env_id``, with epsilon-greedy noise when asked."""
    if config.name in HEURISTIC_ALIASES:
        policy = heuristic_for(env_id)
    elif config.name == "planner":
        policy = planner_for(env_id)
    elif config.name == "bot":
        policy = bot_for(env_id)
    elif config.name == "random":
        policy = RandomPolicy(action_space)
    else:
        if input_dir is None:
            raise MazerunError("policy=torch_policy needs input_dir=<a training run's output directory>")
        from mazerun.acting.policies.torch_policy import TorchPolicy

        policy = TorchPolicy(input_dir, env_id, action_space, deterministic=config.deterministic)
    if config.epsilon > 0:
        policy = EpsilonGreedyPolicy(policy, action_space, config.epsilon)
    return policy
