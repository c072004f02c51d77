"""Acting policies: scripted experts, random, (from a checkpoint) trained networks, and installed plugins' policies.

A package adds a policy through the entry point group ``mazerun.policies``: name -> a
:class:`Policy` subclass or any factory called as ``factory(env_id, action_space)`` that returns
a :class:`Policy`. It then works wherever a policy does: ``policy=<name>`` records its
episodes, ``expert=<name>`` teaches DAgger and pipelines' record stages.
"""

from __future__ import annotations

import gymnasium as gym

from mazerun.acting.policies.base import EpsilonGreedyPolicy, Policy, RandomPolicy
from mazerun.acting.policies.heuristic import bot_for, heuristic_for
from mazerun.acting.policies.planner import planner_for
from mazerun.config.plugins import POLICY_PLUGINS, describe, load_plugin, plugins_beside
from mazerun.config.schemas import HEURISTIC_ALIASES, POLICY_NAMES, ExpertConfig, PolicyConfig
from mazerun.core.errors import MazerunError

__all__ = ["Policy", "build_expert", "build_policy"]


def build_policy(
    config: PolicyConfig, env_id: str, observation_space: gym.Space, action_space: gym.Space, *,
    input_dir: str | None = None,
) -> Policy:
    """The policy named by ``config`` for ``env_id``, with epsilon-greedy noise when asked."""
    if config.name in HEURISTIC_ALIASES:
        policy = heuristic_for(env_id, config.sees or "agent")
    elif config.name == "planner":
        policy = planner_for(env_id, config.sees or "all")
    elif config.name == "bot":
        policy = bot_for(env_id)
    elif config.name == "random":
        policy = RandomPolicy(action_space)
    elif config.name == "onnx":
        from mazerun.acting.policies.onnx_policy import OnnxPolicy

        policy = OnnxPolicy(config.path, env_id, observation_space, action_space, deterministic=config.deterministic)
    elif config.name == "torch_policy":
        if input_dir is None:
            raise MazerunError("policy=torch_policy needs input_dir=<a training run's output directory>")
        from mazerun.acting.policies.torch_policy import TorchPolicy

        policy = TorchPolicy(input_dir, env_id, action_space, deterministic=config.deterministic)
    else:
        policy = plugin_policy(config.name, env_id, action_space)
    if config.epsilon > 0:
        policy = EpsilonGreedyPolicy(policy, action_space, config.epsilon)
    return policy


def build_expert(expert: ExpertConfig, env_id: str, env: gym.Env) -> Policy:
    """The teacher beside one env copy (DAgger's). Here, not in the loop: an env worker builds it, and imports no
    more than it needs (a scripted expert needs no torch)."""
    policy = PolicyConfig(name=expert.name, deterministic=expert.deterministic, sees=expert.sees)
    return build_policy(policy, env_id, env.observation_space, env.action_space, input_dir=expert.input_dir)


def plugin_policy(name: str, env_id: str, action_space: gym.Space) -> Policy:
    """The policy an installed package registers as ``name``, made for ``env_id``."""
    plugins = plugins_beside(POLICY_NAMES, POLICY_PLUGINS, "policy")
    if name not in plugins:
        raise MazerunError(f"policy {name!r} is unknown; choose one of {', '.join([*POLICY_NAMES, *sorted(plugins)])}")
    factory = load_plugin(plugins[name], "policy")
    policy = factory(env_id, action_space)
    if not isinstance(policy, Policy):
        raise MazerunError(f"the policy plugin {describe(plugins[name])} made a {type(policy).__name__}, not a "
                           "mazerun.acting.policies.Policy; subclass Policy (reset, act, took)")
    return policy
