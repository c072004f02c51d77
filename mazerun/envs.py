"""Building environments from ids, with the aliases and quirks our users meet on gymnasium 1.x."""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
from functools import partial
from typing import Any, Callable, Protocol

import gymnasium as gym
import numpy as np

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


class Teacher(Protocol):
    """What :class:`ExpertActions` needs of an expert (every :class:`mazerun.policies.Policy` has it)."""

    def reset(self, env: gym.Env, seed: int | None) -> None: ...

    def act(self, observation: Any) -> Any: ...

    def took(self, action: Any) -> None: ...


NO_LABEL = -1
"""``info["expert_action"]`` of a discrete env whose expert could not label the state."""


class ExpertActions(gym.Wrapper):
    """Puts the expert's action for the current observation into ``info["expert_action"]``.

    AllenAct's "expert action sensor": the expert runs beside its env copy, so sync and async
    vector envs both carry its labels, and whoever acts (learner or expert) the expert sees the
    action actually taken and replans from it (the BabyAI bot needs that). An expert that fails
    on a state the learner led it into is rebuilt from the current state once; if that fails
    too, the rest of the episode is unlabelled (``NO_LABEL``, or NaN for continuous actions).
    """

    def __init__(self, env: gym.Env, expert: Teacher) -> None:
        super().__init__(env)
        self.expert = expert
        self.expert_action: Any = None
        self.labelling = True
        """False once the expert gave up on this episode."""
        self._seed: int | None = None
        discrete = isinstance(env.action_space, gym.spaces.Discrete)
        self._no_label = NO_LABEL if discrete else np.full(env.action_space.shape, np.nan, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        observation, info = self.env.reset(seed=seed, options=options)
        self._seed = seed
        self.labelling = True
        self.expert.reset(self.env, seed)
        self.expert_action = self._label(observation)
        info["expert_action"] = self.expert_action
        return observation, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        if self.labelling and not np.array_equal(action, self.expert_action):
            self.expert.took(action)
        observation, reward, terminated, truncated, info = self.env.step(action)
        if self.labelling and not (terminated or truncated):
            self.expert_action = self._label(observation)
        info["expert_action"] = self.expert_action
        return observation, reward, terminated, truncated, info

    def _label(self, observation: Any) -> Any:
        for attempt in range(2):
            try:
                return self.expert.act(observation)
            except Exception:  # noqa: BLE001 - any failure of a scripted planner means "no label here"
                if attempt == 0:
                    self.expert.reset(self.env, self._seed)
        log.debug("the expert could not label a state; the rest of this episode is unlabelled")
        self.labelling = False
        return self._no_label


class SeededEpisodes(gym.Wrapper):
    """Seeds episode ``k`` of env copy ``i`` with ``first_seed + k * stride`` and keeps the current episode's actions.

    The seed of every episode is then known and its state is a function of the actions taken
    since its reset, so a copy's exact state can be rebuilt in a fresh process by
    :meth:`replay`: a continued run steps on from exactly where the interrupted one stopped.
    """

    def __init__(self, env: gym.Env, first_seed: int, stride: int) -> None:
        super().__init__(env)
        self.first_seed, self.stride = first_seed, stride
        self.episode = -1
        self.actions: list[Any] = []
        self.pending_replay: tuple[int, np.ndarray] | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        self.episode += 1
        self.actions = []
        return self.env.reset(seed=self.first_seed + self.episode * self.stride, options=options)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self.actions.append(np.array(action))
        return self.env.step(action)

    def episode_state(self) -> tuple[int, np.ndarray]:
        """The current episode's index and its actions so far: what :meth:`replay` needs."""
        return self.episode, np.array(self.actions)

    def replay(self) -> tuple[list[Any], list[float], list[dict]]:
        """Rebuild the episode set in ``pending_replay``: its observations, rewards and infos, first reset to now."""
        assert self.pending_replay is not None, "set pending_replay to an episode_state() first"
        episode, actions = self.pending_replay
        self.pending_replay = None
        self.episode = episode - 1
        observation, info = self.reset()
        observations, rewards, infos = [observation], [], [info]
        for action in actions:
            observation, reward, _, _, info = self.step(action.item() if action.ndim == 0 else action)
            observations.append(observation)
            rewards.append(float(reward))
            infos.append(info)
        return observations, rewards, infos


def _make_copy(
    env_id: str, index: int, n_envs: int, seed: int, max_episode_steps: int | None,
    make_expert: Callable[[gym.Env], Teacher] | None,
) -> gym.Env:
    env = make_env(env_id, max_episode_steps=max_episode_steps)
    if make_expert is not None:
        env = ExpertActions(env, make_expert(env))
    return SeededEpisodes(env, first_seed=seed + index, stride=n_envs)


def make_vector_env(
    env_id: str,
    n_envs: int,
    vector: str,
    max_episode_steps: int | None,
    *,
    seed: int = 0,
    make_expert: Callable[[gym.Env], Teacher] | None = None,
) -> gym.vector.VectorEnv:
    """``n_envs`` seeded copies of ``env_id`` that reset a finished episode within the step that ends it.

    Copy ``i`` plays its episodes on seeds ``seed + i``, ``seed + i + n_envs``, ...;
    ``make_expert`` adds an expert labelling every state (``info["expert_action"]``).
    """
    thunks = [partial(_make_copy, env_id, index, n_envs, seed, max_episode_steps, make_expert) for index in range(n_envs)]
    same_step = gym.vector.AutoresetMode.SAME_STEP
    if vector == "async":
        # MiniGrid's mission strings do not fit in shared memory. Workers start from a fork server:
        # forking a process whose torch thread pool is running (a trained expert) can deadlock.
        return gym.vector.AsyncVectorEnv(thunks, shared_memory=not is_minigrid(env_id), copy=False,
                                         autoreset_mode=same_step, context="forkserver")
    return gym.vector.SyncVectorEnv(thunks, copy=False, autoreset_mode=same_step)
