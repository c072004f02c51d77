"""Building environments from ids, with the aliases and quirks our users meet on gymnasium 1.x."""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
from typing import Any

import gymnasium as gym

from mazerun.errors import MazerunError

log = logging.getLogger(__name__)

RENAMED_IDS = {
    "LunarLander-v2": "LunarLander-v3",
    "LunarLanderContinuous-v2": "LunarLanderContinuous-v3",
    "BipedalWalker-v2": "BipedalWalker-v3",
    "CarRacing-v1": "CarRacing-v3",
}
"""Ids gymnasium 1.x removed (they raise DeprecatedEnv) and the ids that replaced them."""

_warned_renames: set[str] = set()


def _register_minigrid() -> None:
    """MiniGrid and BabyAI ids exist only once the package is imported."""
    import minigrid  # noqa: F401  (import registers the envs)


def resolve_env_id(name: str) -> str:
    """Map a user's env id to a registered gymnasium id, or fail with close suggestions."""
    _register_minigrid()
    if name in RENAMED_IDS:
        new = RENAMED_IDS[name]
        if name not in _warned_renames:
            log.info("%s was removed from gymnasium 1.x; using %s (same dynamics, fixed bugs)", name, new)
            _warned_renames.add(name)
        name = new
    if name not in gym.registry:
        close = difflib.get_close_matches(name, list(gym.registry), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "set env.name to a registered gymnasium id"
        raise MazerunError(f"unknown environment id {name!r}; {hint}")
    return name


def is_minigrid(env_id: str) -> bool:
    entry = gym.registry[env_id].entry_point
    return isinstance(entry, str) and entry.startswith("minigrid")


class QuietReset(gym.Wrapper):
    """Swallow what BabyAI's level generator prints to stdout ("Sampling rejected: ...")."""

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        with contextlib.redirect_stdout(io.StringIO()):
            return self.env.reset(**kwargs)


def make_env(
    env_id: str, *, max_episode_steps: int | None = None, render_mode: str | None = None
) -> gym.Env:
    """Build one environment; MiniGrid/BabyAI keep their dict observation (image, direction, mission)."""
    env_id = resolve_env_id(env_id)
    kwargs: dict[str, Any] = {}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    env = gym.make(env_id, **kwargs)
    if is_minigrid(env_id):
        env = QuietReset(env)
    return env


def check_display_for_human_render() -> None:
    """A human window needs a display (or SDL's dummy driver); say what to do instead."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    if os.environ.get("SDL_VIDEODRIVER") in {"dummy", "offscreen"}:
        return
    raise MazerunError(
        "runner.render=true needs a display and none was found (DISPLAY is unset); "
        "use runner.record_video=true to save MP4s instead"
    )
