"""What the shared training loops need from an algorithm, and the settings all offline ones share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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
    def update(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """One gradient step; returns detached scalar metrics (averaged over a report window)."""

    def validation_metrics(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """Metrics on held-out transitions, without learning; none by default."""
        return {}

    def report_metrics(self) -> dict[str, float]:
        """Metrics of the current weights (not of a batch), computed at report time only."""
        return {}

    @abstractmethod
    def act(self, observations: ModelInput, deterministic: bool = True) -> torch.Tensor:
        """Actions for a batch of observations (evaluation rollouts)."""

    def selection_metric(self, has_validation: bool) -> tuple[str, str]:
        """Which logged metric picks the best checkpoint, and whether lower ("min") or higher ("max") wins."""
        return ("eval/mean_return", "max")
