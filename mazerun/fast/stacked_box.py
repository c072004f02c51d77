"""Box-action learners' networks in stacked storage (SAC, TD3+BC, IQL): the twin critics as one two-row
:class:`StackedMLP`, their targets as another, and each learner's actor beside them.

An update of these learners' defaults (batch 256, 256-256 MLPs) on a CPU costs 0.4 to 0.6 GFLOP of
matrix products and, through ``nn.Module``s and autograd, a few hundred small operations besides.
Here a pass of both critics is one ``baddbmm`` per layer, a backward two ``bmm`` per layer, an actor's
step reads the critics through their action inputs only (autograd would also compute the gradient of
every critic weight, which the actor's optimiser never reads), and the target update is one ``lerp_``
of the storage. The algorithms (:mod:`mazerun.algorithms.sac`, :mod:`mazerun.algorithms.td3_bc`,
:mod:`mazerun.algorithms.iql_continuous`) turn these passes into the gradients of their losses.

With ``matmul_dtype`` bfloat16 (``algorithm.matmul_dtype``) each stack is a
:class:`~mazerun.fast.fused.LowPrecisionMLP`: the hidden layers multiply in bfloat16, the storage stays float32.

The modules' parameters and observation statistics become views of this storage, and each trained
parameter's ``.grad`` a view of the stack's ``flat_grad``, so the modules, their checkpoints, the
readable losses and an optimiser over the parameters all see what is trained here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mazerun.fast.fused import (
    StackedMLP,
    Workspace,
    bind,
    bind_row,
    bind_statistics,
    mlp_layers,
    normalize,
    single_stack,
    stacked_mlp,
)
from mazerun.nn.models import SquashedGaussianPolicy, TanhPolicy, TwinQNetwork, ValueNetwork


def policy_heads(policy: TanhPolicy) -> list[nn.Linear]:
    """The policy's output layers, side by side in its stack's head: the action (or mean) head, then SAC's log-std
    head where it has one."""
    return [policy.policy_head, *([policy.log_std_head] if isinstance(policy, SquashedGaussianPolicy) else [])]


def _layer_parameters(layers: list[nn.Linear]) -> list[nn.Parameter]:
    return [parameter for layer in layers for parameter in layer.parameters()]


def stackable(policy: TanhPolicy, critic: TwinQNetwork, *loose: nn.Parameter) -> bool:
    """Whether the policy and the critics are float32 MLPs of one activation on vector observations, every
    parameter in a Linear layer but ``loose`` (ones the algorithm's fast path writes the gradient of itself)."""
    actor = mlp_layers(policy.actor_encoder, None, policy.actor_trunk, policy.policy_head)
    critics = [mlp_layers(encoder, None, trunk, head)
               for encoder, trunk, head in zip(critic.encoders, critic.trunks, critic.heads)]
    if actor is None or None in critics or critics[0][1] != critics[1][1]:
        return False
    heads = policy_heads(policy)[1:]
    actor_parameters = {id(parameter) for parameter in [*_layer_parameters([*actor[0], *heads]), *loose]}
    critic_parameters = _layer_parameters([layer for layers, _ in critics for layer in layers])
    return (all(layer.bias is not None and layer.weight.dtype == torch.float32 for layer in heads)
            and actor_parameters == {id(parameter) for parameter in policy.parameters()}
            and len(critic_parameters) == len(list(critic.parameters())))


def bind_gradients(stack: StackedMLP, row: int, layers: list[nn.Linear]) -> None:
    """Bind ``layers`` into ``stack``'s row, their ``.grad`` too where the stack has gradients."""
    bind_row(stack, row, layers, gradients=stack.flat_grad is not None)


def critic_stack(critic: TwinQNetwork, gradients: bool, matmul_dtype: torch.dtype = torch.float32) -> StackedMLP:
    """The two critics of ``critic`` as the rows of a new :class:`StackedMLP` their parameters now live in."""
    (first, activation), (second, _) = [mlp_layers(encoder, None, trunk, head)
                                         for encoder, trunk, head in zip(critic.encoders, critic.trunks, critic.heads)]
    size = sum(layer.weight.numel() + layer.bias.numel() for layer in first)
    flat = torch.zeros(2, size, device=first[0].weight.device)
    stack = stacked_mlp(flat, torch.zeros_like(flat) if gradients else None,
                        [tuple(layer.weight.shape) for layer in first], activation, matmul_dtype)
    for row, row_layers in enumerate((first, second)):
        bind_gradients(stack, row, row_layers)
    return stack


def actor_stack(policy: TanhPolicy, gradients: bool, extra: int = 0,
                matmul_dtype: torch.dtype = torch.float32) -> StackedMLP:
    """A one-row :class:`StackedMLP` the policy's trunk and heads (side by side, :func:`policy_heads`) now live in,
    with ``extra`` columns after them for the caller (SAC's ``log alpha``)."""
    trunk, activation = mlp_layers(policy.actor_encoder, None, policy.actor_trunk, policy.policy_head)
    trunk, heads = trunk[:-1], policy_heads(policy)
    shapes = [tuple(layer.weight.shape) for layer in trunk] + [(sum(head.out_features for head in heads),
                                                                 policy.features_dim)]
    size = sum(out * inp + out for out, inp in shapes) + extra
    device = policy.policy_head.weight.device
    stack = stacked_mlp(torch.zeros(1, size, device=device), torch.zeros(1, size, device=device) if gradients else None,
                        shapes, activation, matmul_dtype)
    bind_gradients(stack, 0, trunk)
    start, head = 0, stack.head
    for layer in heads:
        rows = slice(start, start + layer.out_features)
        bind(layer.weight, head.weight[0, rows])
        bind(layer.bias, head.bias[0, 0, rows])
        if gradients:
            layer.weight.grad, layer.bias.grad = head.weight_grad[0, rows], head.bias_grad[0, 0, rows]
        start = rows.stop
    return stack


@dataclass
class _CriticInputs:
    """One batch's observations as the critics read them (:meth:`StackedTwinQ.load`), actions after them."""

    critic: torch.Tensor
    """``(2, B, D + A)``: the observations by each critic's statistics, then the actions of the last critic pass."""
    target: torch.Tensor
    """``(2, B, D + A)``: the target observations by each target's statistics, then the last target pass's actions."""


class StackedTwinQ:
    """Twin critics and their targets, each pair in stacked storage: ``critic.flat`` rows 0 and 1 hold the two
    critics, ``target.flat`` their targets.

    An update standardises its batch's observations once (:meth:`load`); the passes after read them and
    write into workspaces of their batch size, valid until the next pass of the same network.
    """

    def __init__(self, critic: TwinQNetwork, target: TwinQNetwork, matmul_dtype: torch.dtype = torch.float32) -> None:
        self.critic = critic_stack(critic, gradients=True, matmul_dtype=matmul_dtype)
        self.target = critic_stack(target, gradients=False, matmul_dtype=matmul_dtype)
        self.first = stacked_mlp(self.critic.flat[:1], self.critic.flat_grad[:1], self.critic.shapes,
                                 self.critic.activation, matmul_dtype)
        """The first critic alone (its row of the same storage): TD3+BC's actor reads ``Q_1`` only."""
        self.critic_mean, self.critic_std = bind_statistics(list(critic.encoders))
        self.target_mean, self.target_std = bind_statistics(list(target.encoders))
        self.observation_width = self.critic_mean.shape[-1]
        self.action_width = self.critic.layers[0].weight.shape[2] - self.observation_width
        self._critic_inputs: dict[int, _CriticInputs] = {}
        self._loaded_critic: _CriticInputs | None = None

    def load(self, observations: torch.Tensor, target_observations: torch.Tensor | None = None) -> None:
        """Standardise an update's ``(B, D)`` observations for the critics and ``target_observations`` (``s'`` for a
        TD target; IQL's targets value ``s``; None where no target pass follows) for their targets, each by its
        networks' statistics."""
        rows = len(observations)
        inputs = self._critic_inputs.get(rows)
        if inputs is None:
            width, device = self.observation_width + self.action_width, observations.device
            inputs = self._critic_inputs[rows] = _CriticInputs(torch.zeros(2, rows, width, device=device),
                                                               torch.zeros(2, rows, width, device=device))
        self._loaded_critic = inputs
        columns = slice(None, self.observation_width)
        normalize(observations, self.critic_mean, self.critic_std, out=inputs.critic[:, :, columns])
        if target_observations is not None:
            normalize(target_observations, self.target_mean, self.target_std, out=inputs.target[:, :, columns])

    def q_values(self, actions: torch.Tensor) -> torch.Tensor:
        """Both critics' ``(2, B)`` values of the loaded observations and ``(B, A)`` actions."""
        inputs = self._loaded_critic.critic
        inputs[:, :, self.observation_width:] = actions
        return self.critic.forward(self.critic.workspace(len(actions)), inputs)[..., 0]

    def target_q_values(self, actions: torch.Tensor) -> torch.Tensor:
        """Both target critics' ``(2, B)`` values of the loaded target observations and ``(B, A)`` actions."""
        inputs = self._loaded_critic.target
        inputs[:, :, self.observation_width:] = actions
        return self.target.forward(self.target.workspace(len(actions)), inputs)[..., 0]

    def critic_backward(self, q_grad: torch.Tensor) -> None:
        """Both critics' weight gradients into ``critic.flat_grad`` from d loss / d their ``(2, B)`` values, after
        :meth:`q_values`."""
        workspace = self.critic.workspace(q_grad.shape[1])
        workspace.out_grad[..., 0] = q_grad
        self.critic.backward(workspace, self._loaded_critic.critic)

    def action_gradient(self, q_grad: torch.Tensor) -> torch.Tensor:
        """d loss / d the ``(B, A)`` actions of the last :meth:`q_values`, from d loss / d its ``(2, B)`` values."""
        workspace = self.critic.workspace(q_grad.shape[1])
        workspace.out_grad[..., 0] = q_grad
        return self.critic.input_gradient(workspace, slice(self.observation_width, None)).sum(dim=0)

    def first_q_values(self, actions: torch.Tensor) -> torch.Tensor:
        """The first critic's ``(B,)`` values of the loaded observations and ``(B, A)`` actions."""
        inputs = self._loaded_critic.critic[:1]
        inputs[:, :, self.observation_width:] = actions
        return self.first.forward(self.first.workspace(len(actions)), inputs)[0, :, 0]

    def first_action_gradient(self, q_grad: torch.Tensor) -> torch.Tensor:
        """d loss / d the ``(B, A)`` actions of the last :meth:`first_q_values`, from d loss / d its ``(B,)`` values."""
        workspace = self.first.workspace(len(q_grad))
        workspace.out_grad[0, :, 0] = q_grad
        return self.first.input_gradient(workspace, slice(self.observation_width, None))[0]

    def follow(self, tau: float) -> None:
        """``target <- tau * critic + (1 - tau) * target``, every weight at once; tau = 1 copies."""
        follow(self.target, self.critic, tau)


def follow(target: StackedMLP, online: StackedMLP, tau: float) -> None:
    """``target <- tau * online + (1 - tau) * target`` over a whole storage; tau = 1 copies."""
    if tau == 1.0:
        target.flat.copy_(online.flat)
    else:
        target.flat.lerp_(online.flat, tau)


class StackedActor:
    """A policy (and, for TD3, its target) in one-row stacks beside :class:`StackedTwinQ`: its trunk, then its heads
    side by side (:func:`policy_heads`), then ``extra`` columns (SAC's ``log alpha``)."""

    def __init__(self, policy: TanhPolicy, target: TanhPolicy | None = None, extra: int = 0,
                 matmul_dtype: torch.dtype = torch.float32) -> None:
        self.actor = actor_stack(policy, gradients=True, extra=extra, matmul_dtype=matmul_dtype)
        self.actor_target = None if target is None else actor_stack(target, gradients=False, extra=extra,
                                                                    matmul_dtype=matmul_dtype)
        self.mean, self.std = bind_statistics([policy.actor_encoder])
        self.target_mean, self.target_std = (self.mean, self.std) if target is None else bind_statistics(
            [target.actor_encoder])
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._loaded: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def extra_columns(self) -> slice:
        """Where the caller's ``extra`` columns lie in ``actor.flat`` and ``actor.flat_grad``."""
        return slice(sum(out * inp + out for out, inp in self.actor.shapes), self.actor.flat.shape[1])

    def load(self, observations: torch.Tensor, next_observations: torch.Tensor | None = None) -> None:
        """Standardise an update's ``s`` by the policy's statistics and its ``s'`` (where the learner acts there) by
        its target's (the policy's own without a target: SAC samples its next actions from the policy itself)."""
        rows, width = observations.shape
        inputs = self._inputs.get(rows)
        if inputs is None:
            inputs = self._inputs[rows] = (torch.zeros(1, rows, width, device=observations.device),
                                           torch.zeros(1, rows, width, device=observations.device))
        self._loaded = inputs
        normalize(observations, self.mean, self.std, out=inputs[0])
        if next_observations is not None:
            normalize(next_observations, self.target_mean, self.target_std, out=inputs[1])

    def heads(self, next_states: bool = False) -> torch.Tensor:
        """The policy's head outputs ``(B, H)`` at the loaded ``s``, or its target's (its own without one) at ``s'``."""
        network = self.actor if not next_states or self.actor_target is None else self.actor_target
        inputs = self._loaded[1 if next_states else 0]
        return network.forward(network.workspace(inputs.shape[1]), inputs)[0]

    def gaussian(self, next_states: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A Gaussian policy's mean and its log-std before any clamp, ``(B, A)`` each, from its two heads (mean first,
        as :func:`policy_heads` orders them) at the loaded ``s`` (or ``s'``)."""
        heads = self.heads(next_states)
        width = heads.shape[1] // 2
        return heads[:, :width], heads[:, width:]

    def backward(self, *head_grads: torch.Tensor) -> None:
        """The policy's weight gradients into ``actor.flat_grad`` from d loss / d its head outputs, after :meth:`heads`
        at ``s``: one ``(B, width)`` block per head, in :func:`policy_heads`' order."""
        inputs = self._loaded[0]
        workspace = self.actor.workspace(inputs.shape[1])
        start = 0
        for grad in head_grads:
            workspace.out_grad[0, :, start:start + grad.shape[1]] = grad
            start += grad.shape[1]
        self.actor.backward(workspace, inputs)

    def follow(self, tau: float) -> None:
        """The policy's target moves ``tau`` of the way to it."""
        follow(self.actor_target, self.actor, tau)


class StackedValue:
    """A state-value network ``V(s)`` (IQL's) in a one-row stack: its values of ``s``, trained through, and of
    ``s'``, read only."""

    def __init__(self, value: ValueNetwork, matmul_dtype: torch.dtype = torch.float32) -> None:
        self.stack = single_stack(*mlp_layers(value.encoder, value.memory, value.trunk, value.head),
                                  matmul_dtype=matmul_dtype)
        self.mean, self.std = bind_statistics([value.encoder])
        self._next: dict[int, Workspace] = {}
        self._inputs: torch.Tensor | None = None

    @staticmethod
    def stackable(value: ValueNetwork) -> bool:
        """Whether ``value`` is a float32 MLP on vector observations without memory, every parameter in it."""
        layers = mlp_layers(value.encoder, value.memory, value.trunk, value.head)
        return layers is not None and len(_layer_parameters(layers[0])) == len(list(value.parameters()))

    def values(self, observations: torch.Tensor) -> torch.Tensor:
        """``V(s)`` of ``(B, D)`` observations, ``(B,)``; :meth:`backward` trains through it."""
        self._inputs = normalize(observations[None], self.mean, self.std)
        return self.stack.forward(self.stack.workspace(len(observations)), self._inputs)[0, :, 0]

    def next_values(self, observations: torch.Tensor) -> torch.Tensor:
        """``V(s')`` of ``(B, D)`` observations, ``(B,)``, without touching what :meth:`backward` reads."""
        rows = len(observations)
        workspace = self._next.get(rows)
        if workspace is None:
            workspace = self._next[rows] = self.stack.allocate(rows, gradients=False)
        return self.stack.forward(workspace, normalize(observations[None], self.mean, self.std))[0, :, 0]

    def backward(self, value_grad: torch.Tensor) -> None:
        """V's weight gradients into its ``.grad`` from d loss / d the ``(B,)`` values of the last :meth:`values`."""
        workspace = self.stack.workspace(len(value_grad))
        workspace.out_grad[0, :, 0] = value_grad
        self.stack.backward(workspace, self._inputs)
