"""What the shared training loops need from an algorithm, and the settings all offline ones share."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import nn

from mazerun.config import check_algorithm_fields
from mazerun.data import TransitionBatch
from mazerun.errors import MazerunError
from mazerun.models import ModelInput


@dataclass
class OfflineConfig:
    """Budget and optimiser settings of every algorithm that learns from records."""

    name: str = "bc"
    n_updates: int = 5000
    """Gradient steps in total."""
    batch_size: int = 256
    lr: float = 3e-4
    eval_every: int = 1000
    """Updates between two reports (train/validation metrics, evaluation rollout, checkpoint)."""
    validation_percentage: float = 0.0
    """Share of episodes held out for validation metrics; 0 = none (the best model is then picked by eval return)."""

    def check(self) -> None:
        check_algorithm_fields(self, positive=("n_updates", "batch_size", "lr", "eval_every"))
        if not 0 <= self.validation_percentage < 100:
            raise MazerunError(
                f"algorithm.validation_percentage={self.validation_percentage} is outside [0, 100); "
                "use e.g. 10 to hold out a tenth of the episodes, or 0 for no validation"
            )

    def check_spaces(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        """Fail early, in one line, on an environment the algorithm cannot learn in; any fits by default."""


@dataclass
class ValueLearningConfig(OfflineConfig):
    """Settings of the offline algorithms that learn discrete-action Q-values (CQL, IQL)."""

    gamma: float = 0.99
    """Discount of the TD targets."""
    tau: float = 1.0
    """Share of the way the target network moves to the online one at each target update: 1 copies."""
    target_update_interval: int = 1000
    """Updates between two target updates. Both settings always apply together (as in SB3's DQN):
    tau=1 with an interval of N is a hard copy every N updates, tau<1 with an interval of 1 is
    Polyak averaging after every update."""

    def check(self) -> None:
        super().check()
        check_algorithm_fields(self, positive=("target_update_interval",), unit_interval=("gamma",))
        if not 0.0 < self.tau <= 1.0:
            raise MazerunError(
                f"algorithm.tau={self.tau} must lie in (0, 1]: 1 copies the online network into the "
                "target every target_update_interval updates, e.g. 0.005 averages it in slowly"
            )

    def check_spaces(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        if not isinstance(action_space, gym.spaces.Discrete):
            raise MazerunError(
                f"{self.name} learns Q-values of discrete actions and this environment's actions are "
                f"{action_space}; use algorithm=bc or algorithm=ppo for continuous actions"
            )


def frozen_copy(network: nn.Module) -> nn.Module:
    """A target network: same weights and observation statistics, never trained by gradients."""
    target = copy.deepcopy(network)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target <- tau * online + (1 - tau) * target`` for every parameter; tau = 1 is a hard copy.

    Buffers (the observation statistics) are set alike in both by ``set_normalization`` and never
    change, so only parameters follow. One fused ``_foreach`` call keeps it a few kernels.
    """
    target_parameters, online_parameters = list(target.parameters()), list(online.parameters())
    if tau == 1.0:
        torch._foreach_copy_(target_parameters, online_parameters)
    else:
        torch._foreach_lerp_(target_parameters, online_parameters, tau)


def follow_target(target: nn.Module, online: nn.Module, update: int, config: ValueLearningConfig) -> None:
    """The target update due after gradient step number ``update`` (counted from 1), if any."""
    if update % config.target_update_interval == 0:
        update_target(target, online, config.tau)


class OfflineAlgorithm(ABC):
    """One learner driven by :func:`mazerun.training.train_offline`: a gradient step per batch.

    ``network`` is what acts and what checkpoints store (its kind in ``network_type``); any
    other networks (targets, critics) and optimisers live in :meth:`training_state`.
    """

    network: nn.Module
    network_type: str
    """``actor_critic`` or ``q_network``: how :func:`mazerun.models.build_network` rebuilds it."""

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise vector observations in every network of the algorithm with the dataset's statistics."""
        for module in vars(self).values():
            if isinstance(module, nn.Module) and hasattr(module, "set_normalization"):
                module.set_normalization(mean, std)

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start from an earlier run's acting network (``input_dir``)."""
        self.network.load_state_dict(state)

    @abstractmethod
    def losses(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise on ``batch`` and its detached scalar metrics."""

    @abstractmethod
    def update(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """One gradient step; returns detached scalar metrics (averaged over a report window)."""

    @torch.no_grad()
    def validation_metrics(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """The metrics of :meth:`losses` on held-out transitions, without learning."""
        return self.losses(batch)[1]

    def report_metrics(self) -> dict[str, float]:
        """Metrics of the current weights (not of a batch), computed at report time only."""
        return {}

    @abstractmethod
    def act(self, observations: ModelInput, deterministic: bool = True) -> torch.Tensor:
        """Actions for a batch of observations (evaluation rollouts)."""

    def selection_metric(self, has_validation: bool) -> tuple[str, str]:
        """Which logged metric picks the best checkpoint, and whether lower ("min") or higher ("max") wins."""
        return ("eval/mean_return", "max")
