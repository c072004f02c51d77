"""The algorithms fed batches (records, labelled states, a replay buffer): their shared settings and their step."""

from __future__ import annotations

import copy
import dataclasses
import importlib
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import gymnasium as gym
import torch
from torch import nn

from mazerun.algorithms.protocol import Algorithm, AlgorithmSpec, UpdatePhase, gradient_mismatch, mismatch_line
from mazerun.config.schemas import check_fields
from mazerun.core.errors import MazerunError
from mazerun.core.schedules import LinearSchedule
from mazerun.data.tensors import SequenceBatch, TransitionBatch
from mazerun.fast.fused import native_low_precision
from mazerun.nn.models import ModelConfig

Batch = TransitionBatch | SequenceBatch
"""Transitions for networks without memory, chunks of consecutive ones for networks with it."""


class EnvStepBudget:
    """What the algorithms that step envs themselves (PPO, DAgger, SAC) share in their configs: a budget of
    ``total_steps`` env steps, and no dataset they must be given. A mixin of their dataclasses; it adds no field."""

    budget_key: ClassVar[str] = "total_steps"
    step_unit: ClassVar[str] = "step"
    total_steps: int

    @property
    def budget(self) -> int:
        return self.total_steps

    @property
    def needs_dataset(self) -> bool:
        return False


@dataclass
class OfflineConfig:
    """Budget and optimiser settings of every algorithm that learns from records."""

    loop: ClassVar[str] = "offline"
    """The training loop that drives the algorithm: offline, on_policy or interactive."""
    budget_key: ClassVar[str] = "n_updates"
    step_unit: ClassVar[str] = "update"
    """What the budget counts."""

    name: str = "bc"
    """Which algorithm this section configures, as chosen by ``algorithm=<name>``."""
    n_updates: int = 5000
    """Gradient steps in total; a continued run trains up to this many (budgets are totals)."""
    batch_size: int = 256
    """Transitions per gradient step (models without memory; nrollouts sizes the batches of those with it)."""
    lr: float = 3e-4
    """Adam's learning rate."""
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


ACTION_KINDS = {"discrete": "discrete-action", "box": "1-D Box"}
"""The two kinds of actions the value learners (CQL, IQL) have a variant for, as their messages name them."""


@dataclass
class ValueLearningConfig(OfflineConfig):
    """Settings of the offline algorithms that learn Q-values (CQL, IQL): of discrete actions, or of a 1-D Box's
    in their continuous variants (:class:`BoxVariant`)."""

    fused_actions: ClassVar[tuple[str, ...]]
    """The variants, ``discrete`` and/or ``box``, with the fused step that ``matmul_dtype`` applies to."""

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
        if not (isinstance(action_space, gym.spaces.Discrete) or is_box_of_actions(action_space)):
            raise MazerunError(
                f"algorithm={self.name} learns Q-values of Discrete or 1-D Box actions and this env's actions are "
                f"{action_space}; wrap the env so that its actions are one of those (flatten a Box of several "
                "dimensions into one)"
            )
        actions = "box" if is_box_of_actions(action_space) else "discrete"
        if self.matmul_dtype == "bfloat16" and actions not in self.fused_actions:
            fused = " and ".join(ACTION_KINDS[kind] for kind in self.fused_actions)
            raise MazerunError(f"algorithm.matmul_dtype={self.matmul_dtype} applies to {self.name.upper()}'s {fused} "
                               f"variant only (the {ACTION_KINDS[actions]} one has no fused step); use "
                               "algorithm.matmul_dtype=float32")

    def model_activation(self, action_space: gym.Space) -> str | None:
        """The MLP activation where the model config leaves it unset (``model=auto``): for 1-D Box actions ReLU, as
        d3rlpy's and CORL's; for discrete ones the model kind's own."""
        return "relu" if is_box_of_actions(action_space) else None


def is_box_of_actions(action_space: gym.Space) -> bool:
    """Whether the actions are a 1-D Box, the continuous actions the tanh-squashed policies act in."""
    return isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1


def check_box_actions(name: str, action_space: gym.Space) -> None:
    """Refuse, in one line, an env whose actions are not a 1-D Box (SAC's and TD3+BC's tanh-squashed policies)."""
    if not is_box_of_actions(action_space):
        raise MazerunError(f"algorithm={name} acts in 1-D Box (continuous) action spaces and this env's actions are "
                           f"{action_space}; use algorithm=ppo, or a Box env such as env.name=Pendulum-v1")


def check_polyak_tau(tau: float, prefix: str) -> None:
    """``tau`` of targets averaged in after every update must lie in (0, 1]."""
    if not 0.0 < tau <= 1.0:
        raise MazerunError(f"{prefix}.tau={tau} must lie in (0, 1]: e.g. 0.005 averages the online networks into "
                           "their targets slowly, 1 copies them")


MATMUL_DTYPES = ("auto", "float32", "bfloat16")
"""What a fused step's hidden layers may multiply in (``algorithm.matmul_dtype``); ``run`` makes ``auto`` one of the
others (:func:`resolve_matmul_dtype`)."""


def check_matmul_dtype(config: Any, prefix: str) -> None:
    """``config.matmul_dtype`` must be one of :data:`MATMUL_DTYPES`, and bfloat16 needs ``config.fused``."""
    if config.matmul_dtype not in MATMUL_DTYPES:
        raise MazerunError(f"{prefix}.matmul_dtype={config.matmul_dtype!r} is unknown; use {', '.join(MATMUL_DTYPES)}")
    if config.matmul_dtype == "bfloat16" and not config.fused:
        raise MazerunError(f"{prefix}.matmul_dtype={config.matmul_dtype} needs the fused step; "
                           f"set {prefix}.fused=true or {prefix}.matmul_dtype=float32")


def resolve_matmul_dtype(config: Any, action_space: gym.Space, model_config: ModelConfig, device: torch.device) -> Any:
    """``config`` with ``matmul_dtype=auto`` made concrete for this run. bfloat16 for the fused step of a Box-action
    learner (SAC, TD3+BC, the Box IQL and CQL: MLPs on vector observations) on a CPU that multiplies bfloat16
    natively (AVX512-BF16 or AMX): on Hopper their returns with it were level with float32's, their whole runs
    faster (the README's "bfloat16 products"). float32 everywhere else: discrete actions (their bfloat16 returns
    are not measured), a CPU without those products (there they run many times slower), a GPU, ``fused=false``."""
    if getattr(config, "matmul_dtype", None) != "auto":
        return config
    low = (config.fused and is_box_of_actions(action_space) and model_config.kind == "vector_obs"
           and not model_config.recurrent and device.type == "cpu" and native_low_precision(torch.bfloat16, device))
    return dataclasses.replace(config, matmul_dtype="bfloat16" if low else "float32")


def product_dtype(config: Any) -> torch.dtype:
    """What the fused step multiplies in: ``config.matmul_dtype``; float32 where the config has none, or where
    ``auto`` was not resolved (a learner built without ``run``)."""
    name = getattr(config, "matmul_dtype", "float32")
    return torch.float32 if name == "auto" else getattr(torch, name)


def float32_twin(algorithm: Any) -> Any:
    """A copy of ``algorithm`` whose config multiplies in float32, its fast path still to rebuild. Low-precision
    products round by up to several percent of a parameter's gradient, which would hide an edited loss, so the
    fast-path check holds this twin's float32 kernel to autograd instead."""
    twin = copy.deepcopy(algorithm)
    twin.config = dataclasses.replace(algorithm.config, matmul_dtype="float32")
    return twin


def require_stack(stack: Any, config: Any) -> Any:
    """``stack``, refused in one line where it is None and ``config`` asks for low-precision products: the fused
    step is the only one that multiplies in them."""
    if stack is None and product_dtype(config) != torch.float32:
        raise MazerunError(f"algorithm.matmul_dtype={config.matmul_dtype} needs the fused step, which runs MLPs on "
                           "vector observations without memory; use algorithm.matmul_dtype=float32")
    return stack


def standard_normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal draws from the loop's ``generator``, made on its device and moved to ``device`` (a
    memory-mapped store's sampler draws on the CPU while the networks may be on a GPU)."""
    return torch.randn(shape, generator=generator, device=device if generator is None else generator.device).to(device)


def uniform_in_unit_box(shape: tuple[int, ...], generator: torch.Generator | None,
                        device: torch.device) -> torch.Tensor:
    """Uniform draws in [-1, 1] from the loop's ``generator``, as :func:`standard_normal` makes them."""
    draws = torch.rand(shape, generator=generator, device=device if generator is None else generator.device)
    return (2.0 * draws - 1.0).to(device)


def load_matching_weights(policy: nn.Module, state: dict[str, torch.Tensor], *readers: nn.Module) -> None:
    """Start a tanh-squashed policy from another run's acting network: every weight whose name and shape match (a
    clone's encoder, trunk and mean head, and its observation statistics); ``readers`` (critics, targets) then read
    observations with the policy's statistics."""
    own = policy.state_dict()
    policy.load_state_dict({**own, **{name: value for name, value in state.items()
                                      if name in own and own[name].shape == value.shape}})
    encoder = policy.actor_encoder
    if encoder.kind == "vector_obs":
        for reader in readers:
            reader.set_normalization(encoder.obs_mean, encoder.obs_std)


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


def follow_target(target: nn.Module, online: nn.Module, update: int, config: Any) -> None:
    """The target update due after gradient step number ``update`` (counted from 1), if any, by ``config.tau`` and
    ``config.target_update_interval``."""
    if update % config.target_update_interval == 0:
        update_target(target, online, config.tau)


class BatchAlgorithm(Algorithm):
    """An algorithm fed batches of transitions (records, labelled states, a replay buffer): each update runs its
    phases in order, then its target networks follow.

    Subclasses build their networks and optimisers and write each phase's loss as a method; the
    step around a loss is shared here: zero the gradients, backward, average them over data-parallel
    ranks, step, then let the target networks follow (:func:`follow_target`, by the config's ``tau``
    and ``target_update_interval``).
    """

    phases: ClassVar[tuple[UpdatePhase, ...]] = (UpdatePhase(),)
    """The optimiser steps of one update, in order."""
    gradient_sync: Callable[[], None] | None = None
    """Set by the offline loop under torchrun: averages the gradients over the processes after each backward."""

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One update on ``batch``: every phase due, then the targets; returns detached scalar metrics."""
        metrics: dict[str, torch.Tensor] = {}
        for phase in self.phases:
            if self.updates % phase.every == 0:
                metrics.update(self.step_phase(phase, batch))
        self.updates += 1
        self.after_step()
        return metrics

    def step_phase(self, phase: UpdatePhase, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimiser's step on the gradient of its phase's loss."""
        optimizer = getattr(self, phase.optimizer)
        metrics = self.phase_gradient(phase, optimizer, batch)
        if self.gradient_sync is not None:
            self.gradient_sync()
        self.after_backward(metrics)
        self.before_step(optimizer)
        optimizer.step()
        return metrics

    def phase_gradient(self, phase: UpdatePhase, optimizer: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """The gradient of the phase's loss in the parameters' ``.grad``; returns the loss's metrics."""
        loss, metrics = getattr(self, phase.loss)(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return metrics

    def before_step(self, optimizer: Any) -> None:
        """Work due between a phase's gradient and its step (a scheduled learning rate); none by default."""

    def after_backward(self, metrics: dict[str, torch.Tensor]) -> None:
        """Gradient metrics, read between backward and step; none by default."""

    def after_step(self) -> None:
        """Work due after each update: every target network follows its online one."""
        for target, online in self.target_networks.items():
            follow_target(getattr(self, target), getattr(self, online), self.updates, self.config)

    def generator_state(self) -> torch.Tensor:
        """Where the algorithm's draws stand: a fast path's check draws twice from here, and leaves it here."""
        return self.generator.get_state() if self.generator is not None else torch.get_rng_state()

    def restore_generator(self, state: torch.Tensor) -> None:
        """Put the algorithm's draws back to :meth:`generator_state`'s ``state``."""
        if self.generator is not None:
            self.generator.set_state(state)
        else:
            torch.set_rng_state(state)


class OfflineAlgorithm(BatchAlgorithm):
    """An algorithm fed batches of records (or of labelled states), on :class:`BatchAlgorithm`'s step.

    It adds what learning from a fixed budget of updates brings: a learning rate that may decay to
    0 at ``n_updates``, and hand-written gradients of its phases' losses (:attr:`fused_phases`, where
    :attr:`stack` is set): the same losses, faster, never different ones.
    """

    searchable = True
    stack: Any = None
    """The hand-written fast path's state where the algorithm has one for this network (:meth:`build_stack`),
    else None: the autograd path."""
    fused_phases: ClassVar[dict[str, str]] = {"losses": "fused_gradient"}
    """Each phase's loss method with a hand-written gradient, and the method that writes it (with :attr:`stack`)."""

    def __init__(self, config: Any, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.lr_schedule = LinearSchedule.of(config.lr_schedule, config.lr, config.n_updates)
        """The learning rate at each update; ``constant`` leaves the optimisers' own (which a search may mutate)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if len(cls.phases) > 1 or cls.phases[0].optimizer != "optimizer":
            cls.searchable = False  # the population's stacked cohorts train one optimiser per agent

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

    @abstractmethod
    def losses(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise on ``batch`` and its detached scalar metrics (the first phase's loss)."""

    def phase_gradient(self, phase: UpdatePhase, optimizer: Any, batch: Batch) -> dict[str, torch.Tensor]:
        if self.stack is not None and phase.loss in self.fused_phases and isinstance(batch, TransitionBatch):
            with torch.no_grad():
                return getattr(self, self.fused_phases[phase.loss])(batch)
        return super().phase_gradient(phase, optimizer, batch)

    def before_step(self, optimizer: Any) -> None:
        if self.config.lr_schedule != "constant":
            for group in optimizer.param_groups:
                group["lr"] = self.lr_schedule(self.updates)

    def fast_path_tolerance(self) -> tuple[float, float]:
        """How far the hand-written gradient may stray from autograd's, and the floor of :func:`gradient_mismatch`:
        float32 rounding, parameter by parameter (measured: about 2e-7)."""
        return 1e-4, 1e-3

    def check_fast_path(self, batch: Batch) -> str | None:
        """Hold each hand-written gradient against autograd of its phase's loss on ``batch`` (the run's first one),
        every phase at the current weights and from the same draws; the generator is left where it was.

        They must agree within :meth:`fast_path_tolerance` (:func:`~mazerun.algorithms.protocol.gradient_mismatch`,
        parameter by parameter). If they do not, a loss was edited and its fast path was not: the fast path
        is dropped, so training follows the readable losses, and the returned line says so. None when
        they agree or there is no fast path for this batch.
        """
        if self.stack is None or not isinstance(batch, TransitionBatch):
            return None
        if product_dtype(self.config) != torch.float32:
            twin = float32_twin(self)
            twin.stack = twin.build_stack()
            problem = twin.check_fast_path(batch)
            if problem is not None:
                self.stack = None
            return problem
        tolerance, floor = self.fast_path_tolerance()
        for phase in self.phases:
            if phase.loss not in self.fused_phases:
                continue
            mismatch = gradient_mismatch(*self.phase_gradients(phase, batch), floor)
            if mismatch > tolerance:
                self.stack = None
                return mismatch_line(self.config.name, f"{phase.loss}()", mismatch, tolerance)
        return None

    def phase_gradients(self, phase: UpdatePhase, batch: TransitionBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The phase's hand-written gradient and autograd's of its loss, parameter by parameter, from the same
        draws; the parameters' gradients and the generator are left as they were."""
        optimizer = getattr(self, phase.optimizer)
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        drawn = self.generator_state()
        loss, _ = getattr(self, phase.loss)(batch)
        expected = torch.autograd.grad(loss, parameters, allow_unused=True)
        kept = [None if parameter.grad is None else parameter.grad.clone() for parameter in parameters]
        self.restore_generator(drawn)
        with torch.no_grad():
            getattr(self, self.fused_phases[phase.loss])(batch)
            fast = [torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.clone()
                    for parameter in parameters]
            for parameter, grad in zip(parameters, kept):  # the check leaves the gradients as it found them
                if parameter.grad is not None:
                    parameter.grad.copy_(grad) if grad is not None else parameter.grad.zero_()
        self.restore_generator(drawn)
        return fast, [torch.zeros_like(parameter) if grad is None else grad for parameter, grad in zip(parameters, expected)]

    def fused_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """The fast path's part of :meth:`update` (with :attr:`stack`): write the gradient of the loss on ``batch``
        into the parameters' ``.grad`` by hand and return the metrics :meth:`losses` would."""
        raise NotImplementedError(f"{type(self).__name__} has no hand-written step")

    @torch.no_grad()
    def validation_metrics(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The metrics of :meth:`losses` on held-out transitions, without learning."""
        return self.losses(batch)[1]

    def training_state(self) -> dict[str, Any]:
        return {**super().training_state(), "lr_schedule": self.lr_schedule.to_list()}

    def load_training_state(self, state: dict[str, Any], progress: int | None = None) -> None:
        """Continue at the saved update; a raised ``n_updates`` stretches the schedule from there, without a jump."""
        super().load_training_state({name: value for name, value in state.items() if name != "lr_schedule"},
                                    int(state["updates"]))
        if "lr_schedule" in state:  # absent from checkpoints written before schedules: those keep the config's
            self.lr_schedule = LinearSchedule.from_list(state["lr_schedule"]).extended_to(self.updates,
                                                                                            self.config.n_updates)


class BoxVariant:
    """Mixin of a discrete-action algorithm that has a continuous variant under the same name (CQL, IQL): built
    for a 1-D Box of actions, the class builds its :attr:`box_variant` instead.

    The registry hands the loops one ``Algorithm`` per name, and the action space is known only when it is built,
    so the choice is made here, at construction; each variant keeps its own file and loss maths. The class
    attributes a loop reads before building (``network_type``, ``starts_from``) are the discrete class's, whose
    ``starts_from`` also names the continuous networks the Box variant continues or starts from (a run of the
    other kind of actions is refused by the setup's check of the action kinds).
    """

    box_variant: ClassVar[str]
    """``module:Class`` of the continuous variant, imported on first use."""

    def __new__(cls, config: Any = None, spec: AlgorithmSpec | None = None,
                generator: torch.Generator | None = None) -> Any:
        if spec is not None and is_box_of_actions(spec.action_space):
            module, name = cls.box_variant.split(":")
            return getattr(importlib.import_module(module), name)(config, spec, generator)
        return super().__new__(cls)
