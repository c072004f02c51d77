"""The one protocol every algorithm follows, whichever loop feeds it.

An algorithm module (found through :mod:`mazerun.algorithms`, or a plugin's entry point) holds:

- ``Config``: a dataclass of its settings, with ``check(prefix)`` and the class attributes
  ``loop`` (what feeds it: ``offline`` batches of records, ``on_policy`` rollouts of its own
  policy, ``interactive`` states an expert labelled), ``budget_key`` and ``step_unit``, and
  optionally ``model_activation(action_space)``, the MLP activation its reference implementation
  uses where ``model=auto`` leaves it unset (SAC and the Box-action offline learners: ReLU, as SB3's
  and d3rlpy's; None: the model kind's own);
- ``Algorithm``: a subclass of :class:`Algorithm`, built as ``Algorithm(config, spec, generator)``.

The class declares, as plain attributes:

- its networks: ``network`` is the one that acts and that checkpoints hold; every other
  ``nn.Module`` attribute (critics, targets, value networks) is training state;
- its optimisers: any number, every attribute with an optimiser's ``state_dict``;
- its update phases (:class:`UpdatePhase`): which loss each optimiser minimises and how often,
  as d3rlpy's ``inner_update`` does (a delayed actor every second update); target networks follow
  their online ones after the phases (``target_networks``);
- the state that makes a continued run exact (:meth:`Algorithm.training_state`).

Loops build algorithms through :func:`mazerun.algorithms.build_algorithm` and never import one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import torch
from torch import nn

from mazerun.core.numerics import subnormals_flushed
from mazerun.nn.models import (
    ActorCritic,
    ModelConfig,
    QNetwork,
    SquashedGaussianPolicy,
    TanhPolicy,
    TwinQNetwork,
    Vocabulary,
    build_actor_critic,
    build_q_network,
)


@dataclass(frozen=True)
class AlgorithmSpec:
    """What an algorithm is built for: the env's spaces, the mission vocabulary, the model settings, the device."""

    observation_space: gym.Space
    action_space: gym.Space
    model_config: ModelConfig
    vocabulary: Vocabulary | None = None
    device: torch.device = torch.device("cpu")

    def actor_critic(self) -> ActorCritic:
        """A fresh policy with its value head, on the device."""
        return build_actor_critic(self.model_config, self.observation_space, self.action_space,
                                  self.vocabulary).to(self.device)

    def q_network(self) -> QNetwork:
        """A fresh Q-network over the discrete actions, on the device."""
        return build_q_network(self.model_config, self.observation_space, self.action_space,
                               self.vocabulary).to(self.device)

    def tanh_policy(self) -> TanhPolicy:
        """A fresh deterministic tanh-squashed policy over the Box actions, on the device."""
        return TanhPolicy(self.model_config, self.observation_space, self.action_space, self.vocabulary).to(self.device)

    def squashed_gaussian_policy(self) -> SquashedGaussianPolicy:
        """A fresh tanh-squashed Gaussian policy over the Box actions, on the device."""
        return SquashedGaussianPolicy(self.model_config, self.observation_space, self.action_space,
                                      self.vocabulary).to(self.device)

    def twin_q_network(self) -> TwinQNetwork:
        """Two fresh Q(s, a) networks over the Box actions, on the device."""
        return TwinQNetwork(self.model_config, self.observation_space, self.action_space,
                            self.vocabulary).to(self.device)


@dataclass(frozen=True)
class UpdatePhase:
    """One optimiser's step within an update: ``loss`` is the name of a method ``(batch) -> (loss, metrics)``,
    ``optimizer`` the attribute holding the optimiser that minimises it; the phase runs on the updates whose
    number (counted from 0) is a multiple of ``every``."""

    loss: str = "losses"
    optimizer: str = "optimizer"
    every: int = 1


def gradient_mismatch(fast: list[torch.Tensor], reference: list[torch.Tensor], floor: float = 1e-3) -> float:
    """How far a hand-written gradient strays from autograd's: the largest ``|g_fast - g| / |g|`` over the
    parameters, each ``|g|`` floored at ``floor`` times the whole gradient's norm (so rounding in a gradient near 0
    does not count). Per parameter, so that an edited small term (an entropy bonus beside a large value loss)
    shows; ``floor=1`` measures every parameter's error against the whole norm (for low-precision products)."""
    with torch.no_grad():
        total = torch.sqrt(sum((theirs.double() ** 2).sum() for theirs in reference))
        floor = torch.clamp(floor * total, min=1e-12)
        worst = max(float(torch.linalg.vector_norm((ours - theirs).double()) /
                          torch.maximum(torch.linalg.vector_norm(theirs.double()), floor))
                    for ours, theirs in zip(fast, reference))
    return worst


def mismatch_line(name: str, loss: str, mismatch: float, tolerance: float) -> str:
    """The one line a run says when its fast path and its readable loss disagree."""
    return (f"{name}'s hand-written gradient differs from autograd of its loss ({loss}) by {mismatch:.2g} "
            f"(tolerance {tolerance:.0e}): the loss was changed and its fast path was not; training on autograd "
            "(set algorithm.fused=false to skip this check)")


def has_state(value: Any) -> bool:
    """A network or an optimiser: something whose ``state_dict`` a checkpoint keeps."""
    return isinstance(value, nn.Module) or (hasattr(value, "state_dict") and hasattr(value, "param_groups"))


class Algorithm(ABC):
    """The learner a loop drives: it acts through ``network`` and learns from what the loop hands :meth:`update`.

    ``generator`` is the loop's seeded generator, for whatever the algorithm draws (minibatch
    order); the loop saves its state, so a continued run draws what the uninterrupted one would.
    """

    network: nn.Module
    network_type: ClassVar[str]
    """``actor_critic``, ``q_network``, ``squashed_gaussian`` or ``tanh_deterministic``: how
    :func:`mazerun.nn.models.build_network` rebuilds ``network``."""
    starts_from: ClassVar[tuple[str, ...]] = ()
    """Other network types whose weights :meth:`load_network_state` can start from (``input_dir`` of another
    algorithm's run), besides ``network_type``."""
    target_networks: ClassVar[dict[str, str]] = {}
    """Target network attribute -> the online network attribute it follows after each update."""
    fast_actor: Any = None
    """A faster view of ``network`` that acts (actions, log-probabilities and values in one pass), if the
    algorithm keeps one: the on-policy loop acts through it."""
    searchable: ClassVar[bool] = False
    """Whether ``hpo=evolution`` can train a population of it, where its loop is ``offline``: one optimiser, whose
    agents a stacked cohort steps together (mazerun.compose)."""

    def __init__(self, config: Any, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        self.config = config
        self.spec = spec
        self.generator = generator
        self.updates = 0
        """Updates taken so far (continued runs included)."""

    @abstractmethod
    def update(self, batch: Any) -> dict[str, Any]:
        """Learn from one batch of what the loop feeds; returns scalar metrics (tensors or floats)."""

    def learn(self, batch: Any) -> dict[str, Any]:
        """What every loop calls: :meth:`update` with subnormal floats read and written as zero.

        Trained networks drift into subnormals, which x86 cores compute many times slower
        (:func:`mazerun.core.numerics.subnormals_flushed`); an algorithm writes ``update`` and gets this for free.
        """
        with subnormals_flushed():
            return self.update(batch)

    def networks(self) -> dict[str, nn.Module]:
        """Every network of the algorithm by attribute name, the acting one first."""
        found = {name: value for name, value in vars(self).items() if isinstance(value, nn.Module)}
        return {"network": self.network, **{name: value for name, value in found.items() if name != "network"}}

    def optimizers(self) -> dict[str, Any]:
        """Every optimiser of the algorithm by attribute name."""
        return {name: value for name, value in vars(self).items()
                if not isinstance(value, nn.Module) and has_state(value)}

    def trained_parameters(self) -> list[nn.Parameter]:
        """Every parameter some optimiser steps, each once (what data-parallel training averages)."""
        seen: dict[int, nn.Parameter] = {}
        for optimizer in self.optimizers().values():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    seen.setdefault(id(parameter), parameter)
        return list(seen.values())

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise vector observations in every network with the data's statistics."""
        for module in self.networks().values():
            if hasattr(module, "set_normalization"):
                module.set_normalization(mean, std)

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start from an earlier run's acting network (``input_dir``)."""
        self.network.load_state_dict(state)

    def training_state(self) -> dict[str, Any]:
        """Everything but the acting network that a continued run needs: the other networks, the optimisers,
        the update count."""
        state: dict[str, Any] = {"updates": self.updates}
        for name, value in vars(self).items():
            if name != "network" and has_state(value):
                state[name] = value.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any], progress: int) -> None:
        """Continue from :meth:`training_state`; ``progress`` is where the loop's budget stands (updates or env
        steps), for schedules that a raised budget stretches from there."""
        self.updates = int(state.get("updates", 0))
        for name, value in vars(self).items():
            if name != "network" and has_state(value):
                value.load_state_dict(state[name])

    def check_fast_path(self, batch: Any) -> str | None:
        """Hold a hand-written gradient, if the algorithm has one, against autograd of its readable loss on the
        run's first batch; on a mismatch drop it and return the one line that says so. None: nothing to say."""
        return None

    def set_progress(self, progress: int) -> dict[str, float]:
        """Apply what is scheduled by the loop's budget (env steps) before the next update; returns the values."""
        return {}

    def selection_metric(self, has_validation: bool) -> tuple[str, str]:
        """Which logged metric picks the best checkpoint, and whether lower ("min") or higher ("max") wins."""
        return ("eval/mean_return", "max")

    def report_metrics(self) -> dict[str, float]:
        """Metrics of the current weights (not of a batch), computed at report time only."""
        return {}
