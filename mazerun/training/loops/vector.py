"""Stepping a vector env for a learner: current observations, episode statistics, and exact resume.

Both the on-policy loop (PPO) and the interactive loop (DAgger) step ``runner.n_envs`` copies
of the env side by side. :class:`VectorEpisodes` keeps what they share: the observations the
next step starts from, the return and length of each copy's running episode, the episodes
finished since the last report, and the state that rebuilds all of it in a continued run
(every copy replays its running episode from the seed it started on, see
:class:`mazerun.acting.envs.SeededEpisodes`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from mazerun.acting.vector import VectorSteps, make_vector_env
from mazerun.core.errors import MazerunError
from mazerun.nn.checkpoint import TRAINING_STATE
from mazerun.nn.models import ModelInput, Vocabulary, obs_to_tensor
from mazerun.training.runsetup import RunSetup


def open_vector_env(setup: RunSetup, make_expert: Any = None) -> VectorSteps:
    """The setup's ``runner.n_envs`` seeded env copies, stepped as ``runner.vector`` says, with an expert beside each
    when asked. A continued run must step as many copies as its ``last.pt``: each replays its own running episode."""
    runner, start = setup.runner, setup.start
    if start is not None and start.continuing:
        saved = start.checkpoint.extra[TRAINING_STATE].get("envs")
        if saved is not None and len(saved["episodes"]) != runner.n_envs:
            stepped = len(saved["episodes"])
            raise MazerunError(f"runner.n_envs={runner.n_envs} differs from the {stepped} env copies "
                               f"{start.checkpoint.path} stepped; continue with runner.n_envs={stepped}")
    return make_vector_env(setup.env_id, runner.n_envs, runner.vector, runner.max_episode_steps, seed=runner.seed,
                           make_expert=make_expert)


class VectorEpisodes:
    """The running episodes of a vector env, restored from ``state`` when a run continues.

    A loop steps every copy at once (:meth:`step`), or half by half (:meth:`send`, then
    :meth:`receive`), acting on one half while the other steps.
    """

    def __init__(
        self,
        envs: VectorSteps,
        observation_space: gym.Space,
        vocabulary: Vocabulary | None,
        device: torch.device,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.envs, self.observation_space, self.vocabulary, self.device = envs, observation_space, vocabulary, device
        self.halves = envs.halves
        self.episode_returns = np.zeros(envs.num_envs)
        self.episode_lengths = np.zeros(envs.num_envs, dtype=np.int64)
        self.finished_returns: list[float] = []
        self.finished_lengths: list[int] = []
        self.finished_successes: list[bool] = []
        if state is None:
            envs.reset()
        else:
            self._replay(state)

    @property
    def observations(self) -> Any:
        """Every copy's current observation (the env's own arrays: read them before the copy steps again)."""
        return self.envs.observations

    @property
    def infos(self) -> dict[str, Any]:
        return self.envs.infos

    def tensor(self, observations: Any) -> ModelInput:
        return obs_to_tensor(observations, self.observation_space, self.vocabulary, self.device)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """Step every copy; returns rewards, terminated, truncated and infos (episodes that end restart at once)."""
        _, rewards, terminated, truncated, infos = self.envs.step(actions)
        self._count(slice(0, self.envs.num_envs), rewards, terminated, truncated)
        return rewards, terminated, truncated, infos

    def send(self, half: int, actions: np.ndarray) -> None:
        """Start stepping the copies of ``half`` with ``actions``."""
        self.envs.send(half, actions)

    def receive(self, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wait for the step of ``half``; the rewards, terminated and truncated flags of its copies."""
        rewards, terminated, truncated = self.envs.receive(half)
        self._count(self.halves[half], rewards, terminated, truncated)
        return rewards, terminated, truncated

    def _count(self, rows: slice, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray) -> None:
        self.episode_returns[rows] += rewards
        self.episode_lengths[rows] += 1
        done = terminated | truncated
        if done.any():
            ended = np.flatnonzero(done)
            finished = ended + rows.start
            self.finished_returns.extend(self.episode_returns[finished].tolist())
            self.finished_lengths.extend(self.episode_lengths[finished].tolist())
            self.finished_successes.extend((terminated & (rewards > 0))[ended].tolist())
            self.episode_returns[finished] = 0.0
            self.episode_lengths[finished] = 0

    def episode_metrics(self, report_success: bool = False) -> dict[str, float]:
        """Mean return and length of the episodes finished since the last call (none: empty)."""
        if not self.finished_returns:
            return {}
        metrics = {
            "episode_return": float(np.mean(self.finished_returns)),
            "episode_length": float(np.mean(self.finished_lengths)),
            "episodes": float(len(self.finished_returns)),
        }
        if report_success:
            metrics["success_rate"] = float(np.mean(self.finished_successes))
        self.finished_returns, self.finished_lengths, self.finished_successes = [], [], []
        return metrics

    def state(self) -> dict[str, Any]:
        """Each copy's episode index and actions so far: enough to rebuild every running episode exactly; and the
        episodes finished since the last report, which the next report still owes."""
        episodes, actions = zip(*self.envs.episode_states())
        return {"episodes": list(episodes), "actions": [torch.as_tensor(np.asarray(a)) for a in actions],
                "finished": {"returns": torch.tensor(self.finished_returns, dtype=torch.float64),
                             "lengths": torch.tensor(self.finished_lengths, dtype=torch.int64),
                             "successes": torch.tensor(self.finished_successes, dtype=torch.bool)}}

    def _replay(self, state: dict[str, Any]) -> None:
        replays = self.envs.replay([(episode, actions.numpy()) for episode, actions
                                    in zip(state["episodes"], state["actions"])])
        self.replayed = [
            (observations, actions.numpy(), rewards, infos)
            for (observations, rewards, infos), actions in zip(replays, state["actions"])
        ]
        """Each copy's running episode as replayed: observations, actions, rewards and infos since its reset."""
        self.episode_returns = np.array([sum(rewards, 0.0) for _, _, rewards, _ in self.replayed], dtype=np.float64)
        self.episode_lengths = np.array([len(rewards) for _, _, rewards, _ in self.replayed], dtype=np.int64)
        finished = state.get("finished")  # absent from checkpoints written before it was kept
        if finished is not None:
            self.finished_returns = finished["returns"].tolist()
            self.finished_lengths = finished["lengths"].tolist()
            self.finished_successes = finished["successes"].tolist()
