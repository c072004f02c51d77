"""What the offline loop needs from an algorithm, the settings all offline ones share, and their shared step."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import gymnasium as gym
import torch
from torch import nn

from mazerun.config.schemas import check_fields
from mazerun.core.errors import MazerunError
from mazerun.core.schedules import LinearSchedule
from mazerun.data.tensors import SequenceBatch, TransitionBatch
from mazerun.fast.optim import Adam
from mazerun.nn.models import ModelConfig, Vocabulary

Batch = TransitionBatch | SequenceBatch
"""Transitions for networks without memory, chunks of consecutive ones for networks with it."""


@dataclass
class OfflineConfig:
    """Budget and optimiser settings of every algorithm that learns from records."""

    loop: ClassVar[str] = "offline"
    """The training loop that drives the algorithm: offline, on_policy or interactive."""
    budget_key: ClassVar[str] = "n_updates"
    step_unit: ClassVar[str] = "update"
    """What the budget counts."""

    name: str = "bc"
    n_updates: int = 5000
    """Gradient steps in total; a continued run trains up to this many (budgets are totals)."""
    batch_size: int = 256
    lr: float = 3e-4
    lr_schedule: str = "constant"
    """constant, or linear: decays to 0 at n_updates, so the last weights are the settled ones."""
    eval_every: int = 1000
    """Updates between two reports (train/validation metrics, evaluation rollout, checkpoints)."""
    validation_percentage: float = 0.0
    """Share of episodes held out for validation metrics; 0 = none (the best model is then picked by eval return)."""
    rollout_len: int = 32
    """Models with memory: steps per chunk of consecutive transitions (truncated backpropagation through time)."""
    nrollouts: int = 64
    """Models with memory: chunks per batch (batch_size is for models without memory)."""
    burn_in: int = 0
    """Models with memory: steps before each chunk that warm the state without being trained on."""

    @property
    def budget(self) -> int:
        return self.n_updates

    @property
    def needs_dataset(self) -> bool:
        return True

    def check(self, prefix: str = "algorithm") -> None:
        check_fields(self, prefix, positive=("n_updates", "batch_size", "lr", "eval_every", "rollout_len", "nrollouts"),
                     non_negative=("burn_in",), schedules=("lr_schedule",))
        if not 0 <= self.validation_percentage < 100:
            raise MazerunError(
                f"{prefix}.validation_percentage={self.validation_percentage} is outside [0, 100); "
                "use e.g. 10 to hold out a tenth of the episodes, or 0 for no validation"
            )

    def check_spaces(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        """Fail early, in one line, on an environment the algorithm cannot learn in; any fits by default."""

    def check_implicit_dataset(self, prefix: str) -> None:
        """Without runner.dataset.dir_or_file, offline algorithms train on the newest finished recording."""


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

    def check(self, prefix: str = "algorithm") -> None:
        super().check(prefix)
        check_fields(self, prefix, positive=("target_update_interval",), unit_interval=("gamma",))
        if not 0.0 < self.tau <= 1.0:
            raise MazerunError(
                f"{prefix}.tau={self.tau} must lie in (0, 1]: 1 copies the online network into the "
                "target every target_update_interval updates, e.g. 0.005 averages it in slowly"
            )

    def check_spaces(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        if not isinstance(action_space, gym.spaces.Discrete):
            raise MazerunError(
                f"{self.name} learns Q-values of discrete actions and this environment's actions are "
                f"{action_space}; use algorithm=bc or algorithm=ppo for continuous actions"
            )


def warm_state(sequence_fn: Any, batch: SequenceBatch, batch_size: int, state_size: int) -> torch.Tensor:
    """The state each chunk starts from: zeros, run through the burn-in steps (without gradient) if any.

    ``sequence_fn(observations, starts, state)`` returns outputs and the states after every step.
    """
    device = batch.actions.device
    state = torch.zeros(batch_size, state_size, device=device)
    if batch.burn_in_observations is None:
        return state
    with torch.no_grad():
        _, states = sequence_fn(batch.burn_in_observations, batch.burn_in_starts, state)
    return states[-1]


def flat(values: torch.Tensor | None) -> torch.Tensor | None:
    """``(T, B, ...)`` as ``(T * B, ...)``: sequence outputs meet the same loss formulas as transitions."""
    return None if values is None else values.flatten(0, 1)


def flat_transitions(batch: Batch) -> TransitionBatch:
    """Actions, rewards, dones and labels of every transition as ``(N, ...)``, from either kind of batch.

    Observations are left as they are: networks read them by kind (transitions or sequences).
    """
    if isinstance(batch, TransitionBatch):
        return batch
    return TransitionBatch(batch.observations, flat(batch.actions), flat(batch.rewards), batch.next_observations,
                           flat(batch.dones), flat(batch.expert_actions))


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
    """One learner driven by the offline loop: a gradient step per batch.

    ``network`` is what acts and what checkpoints store (its kind in ``network_type``); every
    other network (targets, critics) and the optimiser are part of :meth:`training_state`, so a
    continued run picks up exactly where the last one stopped. Subclasses build their networks
    and ``self.optimizer`` and write their loss in :meth:`losses`; the step around it is shared.
    """

    network: nn.Module
    network_type: str
    """``actor_critic`` or ``q_network``: how :func:`mazerun.nn.models.build_network` rebuilds it."""
    optimizer: Adam
    gradient_sync: Callable[[], None] | None = None
    """Set by the offline loop under torchrun: averages the gradients over the processes after each backward."""
    stack: Any = None
    """The hand-written fast path's state where the algorithm has one for this network (:meth:`build_stack`),
    else None: the autograd path."""
    target_networks: ClassVar[dict[str, str]] = {}
    """Target network attribute -> the online network attribute it follows after each step
    (:func:`follow_target`); a population trains the same pairs in one batched call."""

    def __init__(
        self,
        config: Any,
        model_config: ModelConfig,
        observation_space: gym.Space,
        action_space: gym.Space,
        vocabulary: Vocabulary | None,
        device: torch.device,
    ) -> None:
        self.config = config
        self.updates = 0
        """Gradient steps taken so far (continued runs included)."""
        self.lr_schedule = LinearSchedule.of(config.lr_schedule, config.lr, config.n_updates)
        """The learning rate at each update; ``constant`` leaves the optimiser's own (which a search may mutate)."""

    def build_stack(self) -> Any:
        """Move the networks' parameters into the fast path's storage and return its state; None by default."""
        return None

    def __deepcopy__(self, memo: dict) -> OfflineAlgorithm:
        """A copy with a fast path of its own: ``deepcopy`` copies each parameter out of the storage the fast path
        keeps it in, so the copy's networks are bound into new storage."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in vars(self).items():
            if name != "stack":
                setattr(clone, name, copy.deepcopy(value, memo))
        if self.stack is not None:
            clone.stack = clone.build_stack()
        return clone

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise vector observations in every network of the algorithm with the dataset's statistics."""
        for module in vars(self).values():
            if isinstance(module, nn.Module) and hasattr(module, "set_normalization"):
                module.set_normalization(mean, std)

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start from an earlier run's acting network (``input_dir``)."""
        self.network.load_state_dict(state)

    @abstractmethod
    def losses(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise on ``batch`` and its detached scalar metrics."""

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One gradient step on ``batch``; returns detached scalar metrics (averaged over a report window)."""
        if self.stack is not None and isinstance(batch, TransitionBatch):
            with torch.no_grad():
                metrics = self.fused_gradient(batch)
        else:
            loss, metrics = self.losses(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.gradient_sync is not None:
            self.gradient_sync()
        self.after_backward(metrics)
        if self.config.lr_schedule != "constant":
            self.optimizer.param_groups[0]["lr"] = self.lr_schedule(self.updates)
        self.optimizer.step()
        self.updates += 1
        self.after_step()
        return metrics

    def fused_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """The fast path's part of :meth:`update` (with :attr:`stack`): write the gradient of the loss on ``batch``
        into the parameters' ``.grad`` by hand and return the metrics :meth:`losses` would."""
        raise NotImplementedError(f"{type(self).__name__} has no hand-written step")

    def after_backward(self, metrics: dict[str, torch.Tensor]) -> None:
        """Gradient metrics, read between backward and step; none by default."""

    def after_step(self) -> None:
        """Work due after each gradient step: every target network follows its online one."""
        for target, online in self.target_networks.items():
            follow_target(getattr(self, target), getattr(self, online), self.updates, self.config)

    @torch.no_grad()
    def validation_metrics(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The metrics of :meth:`losses` on held-out transitions, without learning."""
        return self.losses(batch)[1]

    def report_metrics(self) -> dict[str, float]:
        """Metrics of the current weights (not of a batch), computed at report time only."""
        return {}


    def selection_metric(self, has_validation: bool) -> tuple[str, str]:
        """Which logged metric picks the best checkpoint, and whether lower ("min") or higher ("max") wins."""
        return ("eval/mean_return", "max")

    def training_state(self) -> dict[str, Any]:
        """Everything but the acting network that a continued run needs: the other networks, the optimiser, the step count."""
        state: dict[str, Any] = {"updates": self.updates, "lr_schedule": self.lr_schedule.to_list()}
        for name, value in vars(self).items():
            if name != "network" and isinstance(value, (nn.Module, Adam)):
                state[name] = value.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Continue at the saved update; a raised ``n_updates`` stretches the schedule from there, without a jump."""
        self.updates = int(state["updates"])
        if "lr_schedule" in state:  # absent from checkpoints written before schedules: those keep the config's
            self.lr_schedule = LinearSchedule.from_list(state["lr_schedule"]).extended_to(self.updates,
                                                                                            self.config.n_updates)
        for name, value in vars(self).items():
            if name != "network" and isinstance(value, (nn.Module, Adam)):
                value.load_state_dict(state[name])
