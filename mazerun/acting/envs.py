"""Building environments from ids, with the aliases and quirks our users meet on gymnasium 1.x."""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
from typing import Any, Callable, Protocol

import gymnasium as gym
import numpy as np

from mazerun.core.errors import MazerunError

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
    """MiniGrid and BabyAI ids exist only once the package is imported (a third of a second: only when needed)."""
    import minigrid  # noqa: F401  (import registers the envs)


WRAPPER_SEPARATOR = "+"
"""An env id with wrappers reads ``<gymnasium id>+<wrapper>``: records and checkpoints carry it whole."""


def split_env_id(env_id: str) -> tuple[str, tuple[str, ...]]:
    """The gymnasium id and the wrappers of an env id."""
    base, *wrappers = env_id.split(WRAPPER_SEPARATOR)
    return base, tuple(wrappers)


def resolve_env_id(name: str) -> str:
    """Map a user's env id to a registered gymnasium id (wrappers kept), or fail with close suggestions."""
    base, wrappers = split_env_id(name)
    if base in RENAMED_IDS:
        new = RENAMED_IDS[base]
        if base not in _warned_renames:
            log.info("%s was removed from gymnasium 1.x; using %s (same dynamics, fixed bugs)", base, new)
            _warned_renames.add(base)
        base = new
    if base not in gym.registry:
        _register_minigrid()
    if base not in gym.registry:
        close = difflib.get_close_matches(base, list(gym.registry), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "set env.name to a registered gymnasium id"
        raise MazerunError(f"unknown environment id {base!r}; {hint}")
    for wrapper in wrappers:
        if wrapper not in WRAPPERS:
            raise MazerunError(f"unknown wrapper {wrapper!r} in env id {name!r}; wrappers: {', '.join(WRAPPERS)}")
        WRAPPERS[wrapper].check(base)
    return WRAPPER_SEPARATOR.join([base, *wrappers])


def is_minigrid(env_id: str) -> bool:
    entry = gym.registry[split_env_id(env_id)[0]].entry_point
    return isinstance(entry, str) and entry.startswith("minigrid")


class MaskVelocity(gym.ObservationWrapper):
    """Drops the velocities from CartPole's and LunarLander's observations: a POMDP that needs memory.

    A policy must then infer motion from the positions it remembers. Scripted experts still
    see the whole state (:func:`unmasking`), as a teacher with privileged
    information does.
    """

    VELOCITIES = {"CartPole": (1, 3), "LunarLander": (2, 3, 5), "LunarLanderContinuous": (2, 3, 5)}
    """Per env family, the observation entries that are velocities."""

    @classmethod
    def check(cls, base_id: str) -> None:
        family = base_id.split("-")[0]
        if family not in cls.VELOCITIES:
            known = ", ".join(f"{name}-*" for name in cls.VELOCITIES)
            raise MazerunError(f"mask_velocity does not know which entries of {base_id}'s observation are velocities; "
                               f"it knows {known}")

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        hidden = self.VELOCITIES[env.spec.id.split("-")[0]]
        self.keep = np.array([index for index in range(env.observation_space.shape[0]) if index not in hidden])
        space = env.observation_space
        self.observation_space = gym.spaces.Box(space.low[self.keep], space.high[self.keep], dtype=space.dtype)
        self.unmasked_observation: np.ndarray | None = None

    def observation(self, observation: np.ndarray) -> np.ndarray:
        self.unmasked_observation = observation
        return observation[self.keep]


WRAPPERS: dict[str, Any] = {"mask_velocity": MaskVelocity}
"""Wrappers an env id may name after its gymnasium id."""


def unmasking(env: gym.Env) -> Callable[[Any], Any]:
    """A function from the observation ``env`` returns to the whole one, where a wrapper hid part of it.

    Found once per episode: searching the wrapper chain at every step (``get_wrapper_attr``) cost
    a scripted expert 5 µs a step, a sixth of a LunarLander step.
    """
    layer = env
    while isinstance(layer, gym.Wrapper):
        if isinstance(layer, MaskVelocity):
            mask = layer
            return lambda observation: observation if mask.unmasked_observation is None else mask.unmasked_observation
        layer = layer.env
    return lambda observation: observation


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
    base, wrappers = split_env_id(env_id)
    kwargs: dict[str, Any] = {}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        env = gym.make(base, **kwargs)
    except gym.error.DependencyNotInstalled as error:
        extra = " (mazerun's mujoco extra: pip install \".[mujoco]\")" if "mujoco" in str(error).lower() else ""
        raise MazerunError(f"{base} needs a package that is not installed: {error}{extra}") from None
    if is_minigrid(base):
        env = QuietReset(env)
    for wrapper in wrappers:
        env = WRAPPERS[wrapper](env)
    return env


def env_spaces(env_id: str) -> tuple[gym.Space, gym.Space]:
    """The observation and action spaces of ``env_id`` (an env is made and closed)."""
    env = make_env(env_id)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


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
    """What :class:`ExpertActions` needs of an expert (every :class:`mazerun.acting.policies.Policy` has it)."""

    def reset(self, env: gym.Env, seed: int | None) -> None: ...

    def act(self, observation: Any) -> Any: ...

    def took(self, action: Any) -> None: ...


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
        # imported here: an env worker imports this module, and only an expert's reads the records' format
        from mazerun.data.records import NO_LABEL

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
