"""Scripted experts: gymnasium's LunarLander heuristic, a CartPole controller, the planner or the bot on grids."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from mazerun.acting.envs import is_minigrid, unmasking
from mazerun.acting.policies.base import Policy
from mazerun.acting.policies.planner import planner_for
from mazerun.core.errors import MazerunError


class LunarLanderHeuristic(Policy):
    """gymnasium's own hand-written lander controller (discrete and continuous)."""

    name = "heuristic"

    def reset(self, env: gym.Env, seed: int | None) -> None:
        from gymnasium.envs.box2d.lunar_lander import heuristic  # Box2D is loaded only for LunarLander

        self._heuristic = heuristic
        self._whole = unmasking(env)
        self._lander = env.unwrapped

    def act(self, observation: Any) -> Any:
        action = self._heuristic(self._lander, self._whole(observation))
        return np.asarray(action, dtype=np.float32) if self._lander.continuous else int(action)


class CartPoleController(Policy):
    """Push toward where the pole is falling, damped by cart position and speed (balances for 500 steps)."""

    name = "heuristic"

    def reset(self, env: gym.Env, seed: int | None) -> None:
        self._whole = unmasking(env)

    def act(self, observation: Any) -> int:
        cart_position, cart_velocity, pole_angle, pole_velocity = self._whole(observation)
        push = pole_angle + 0.5 * pole_velocity + 0.01 * cart_position + 0.1 * cart_velocity
        return int(push > 0)


class BabyAIBotPolicy(Policy):
    """minigrid's planner that solves BabyAI levels from the full state (re-created each episode)."""

    name = "bot"

    def reset(self, env: gym.Env, seed: int | None) -> None:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        self._bot = BabyAIBot(env.unwrapped)
        self._taken: Any = None

    def act(self, observation: Any) -> int:
        action = self._bot.replan(self._taken)
        self._taken = None
        return int(action)

    def took(self, action: Any) -> None:
        self._taken = int(action)


HEURISTICS_BY_ENV_PREFIX: dict[str, type[Policy]] = {
    "LunarLander": LunarLanderHeuristic,
    "LunarLanderContinuous": LunarLanderHeuristic,
    "CartPole": CartPoleController,
}
"""The expert for each family of env ids (the part before the version suffix)."""

PLANNER_FIRST_IDS: frozenset[str] = frozenset({
    "BabyAI-KeyInBox-v0",  # planner 200/200, bot 0/200
    "BabyAI-PutNextS5N2Carrying-v0",  # planner 200/200, bot 0/200 (each level starts with the object in hand)
    "BabyAI-PutNextS6N3Carrying-v0",  # planner 200/200, bot 0/200
    "BabyAI-PutNextS7N4Carrying-v0",  # planner 200/200, bot 0/200
    "BabyAI-SynthS5R2-v0",  # planner 200/200, bot 196/200
    "BabyAI-UnlockToUnlock-v0",  # planner 200/200; bot 27/40 (--seeds 40: 13 hung), its 200-seed run hangs too long
})
"""BabyAI levels where the planner succeeds more often than the bot (bench/experts.py, seeds 0-199).

Elsewhere on BabyAI the bot stays the heuristic: at equal success the records, tuned defaults
and figures measured on its demos (bench/defaults.py, bench/babyai.py) keep holding.
"""


def bot_for(env_id: str) -> Policy:
    """minigrid's BabyAI bot, for a BabyAI level only (it reads the level's instructions)."""
    if not env_id.startswith("BabyAI-"):
        raise MazerunError(f"policy=bot solves BabyAI levels only, not {env_id}; "
                           "use policy=planner on MiniGrid envs, policy=heuristic elsewhere")
    return BabyAIBotPolicy()


def heuristic_for(env_id: str, sees: str = "agent") -> Policy:
    """The scripted expert for ``env_id``, or an error that lists the envs that have one.

    On a MiniGrid id it is the planner (the bot reads only BabyAI levels); on a BabyAI level, the
    better of the two for that level (:data:`PLANNER_FIRST_IDS`). Its planner plans on what the
    agent has seen (``sees``), so the clones of its demonstrations can do what it does.
    """
    if is_minigrid(env_id):
        return bot_for(env_id) if env_id.startswith("BabyAI-") and env_id not in PLANNER_FIRST_IDS \
            else planner_for(env_id, sees)
    family = env_id.split("-")[0]
    if family not in HEURISTICS_BY_ENV_PREFIX:
        known = ", ".join(f"{prefix}-*" for prefix in [*HEURISTICS_BY_ENV_PREFIX, "MiniGrid", "BabyAI"])
        raise MazerunError(
            f"no heuristic policy for {env_id}; heuristics exist for {known}: "
            "use policy=random or policy=torch_policy for this env"
        )
    return HEURISTICS_BY_ENV_PREFIX[family]()
