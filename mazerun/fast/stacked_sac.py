"""SAC's networks in stacked storage: the twin critics as one two-row :class:`StackedMLP`, their targets as
another, the actor as a one-row one whose head is the mean head and the log-std head side by side.

An update of SAC's defaults (batch 256, 256-256 MLPs) on a CPU costs about 0.6 GFLOP of matrix
products and, through ``nn.Module``s and autograd, a few hundred small operations besides. Here
a pass of both critics is one ``baddbmm`` per layer, a backward two ``bmm`` per layer, the actor's
step reads the critics through their action inputs only (autograd would also compute the gradient
of every critic weight, which the actor's optimiser never reads), the target update is one
``lerp_`` of the storage, and each optimiser step one fused Adam call (:class:`FlatAdam`). The
algorithm (:mod:`mazerun.algorithms.sac`) turns these passes into the gradients of its losses.

The modules' parameters and observation statistics become views of this storage, so the modules,
their checkpoints and the readable losses see the weights trained here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mazerun.fast.fused import StackedMLP, bind, bind_row, bind_statistics, mlp_layers, normalize
from mazerun.nn.models import SquashedGaussianPolicy, TwinQNetwork


def stackable(policy: SquashedGaussianPolicy, critic: TwinQNetwork) -> bool:
    """Whether the policy and the critics are float32 MLPs of one activation on vector observations, every
    parameter in a Linear layer: what :class:`StackedSAC` runs."""
    actor = mlp_layers(policy.actor_encoder, None, policy.actor_trunk, policy.policy_head)
    critics = [mlp_layers(encoder, None, trunk, head)
               for encoder, trunk, head in zip(critic.encoders, critic.trunks, critic.heads)]
    if actor is None or None in critics or critics[0][1] != critics[1][1]:
        return False
    actor_parameters = [parameter for layer in [*actor[0], policy.log_std_head] for parameter in layer.parameters()]
    critic_parameters = [parameter for layers, _ in critics for layer in layers for parameter in layer.parameters()]
    return (policy.log_std_head.bias is not None and policy.log_std_head.weight.dtype == torch.float32
            and len(actor_parameters) == len(list(policy.parameters()))
            and len(critic_parameters) == len(list(critic.parameters())))


def _critic_stack(critic: TwinQNetwork, gradients: bool) -> StackedMLP:
    """The two critics of ``critic`` as the rows of a new :class:`StackedMLP` their parameters now live in."""
    (first, activation), (second, _) = [mlp_layers(encoder, None, trunk, head)
                                         for encoder, trunk, head in zip(critic.encoders, critic.trunks, critic.heads)]
    layers = [first, second]
    size = sum(layer.weight.numel() + layer.bias.numel() for layer in layers[0])
    device = layers[0][0].weight.device
    flat = torch.zeros(2, size, device=device)
    stack = StackedMLP(flat, torch.zeros_like(flat) if gradients else None,
                       [tuple(layer.weight.shape) for layer in layers[0]], activation)
    for row, row_layers in enumerate(layers):
        bind_row(stack, row, row_layers)
    return stack


@dataclass
class _Inputs:
    """One batch's observations as each network reads them (:meth:`StackedSAC.load`)."""

    actor: torch.Tensor
    """``s`` by the actor's statistics, ``(1, B, D)``."""
    next_actor: torch.Tensor
    """``s'`` by the actor's statistics, ``(1, B, D)``."""
    critic: torch.Tensor
    """``(2, B, D + A)``: ``s`` by each critic's statistics, then the actions of the last :meth:`StackedSAC.q_values`."""
    target: torch.Tensor
    """``(2, B, D + A)``: ``s'`` by each target's statistics, then the actions of the last target pass."""


class StackedSAC:
    """The policy, the twin critics and their targets of a SAC learner, each in its stacked storage.

    ``actor.flat`` row 0 holds the actor's trunk, then its head: the mean head's weight rows over the
    log-std head's, and their biases likewise, then (where the temperature is learned) ``log alpha``,
    which the actor's optimiser steps with it. ``critic.flat`` rows 0 and 1 hold the two critics, and
    ``target.flat`` their targets. An update standardises its batch's observations once (:meth:`load`);
    its passes read them and write into workspaces of their batch size, valid until the next pass of the
    same network.
    """

    def __init__(self, policy: SquashedGaussianPolicy, critic: TwinQNetwork, target: TwinQNetwork,
                 log_alpha: nn.Parameter | None) -> None:
        if not stackable(policy, critic):
            raise ValueError("only float32 MLPs on vector observations can be stacked")
        trunk, activation = mlp_layers(policy.actor_encoder, None, policy.actor_trunk, policy.policy_head)
        trunk = trunk[:-1]
        self.action_width = policy.policy_head.out_features
        device = policy.policy_head.weight.device
        shapes = [tuple(layer.weight.shape) for layer in trunk] + [(2 * self.action_width, policy.features_dim)]
        layers_size = sum(out * inp + out for out, inp in shapes)
        size = layers_size + (log_alpha is not None)
        self.actor = StackedMLP(torch.zeros(1, size, device=device), torch.zeros(1, size, device=device), shapes,
                                activation)
        bind_row(self.actor, 0, trunk)
        head, width = self.actor.head, self.action_width
        for half, layer in zip((slice(0, width), slice(width, 2 * width)), (policy.policy_head, policy.log_std_head)):
            bind(layer.weight, head.weight[0, half])
            bind(layer.bias, head.bias[0, 0, half])
        self.log_alpha_grad: torch.Tensor | None = None
        if log_alpha is not None:
            bind(log_alpha, self.actor.flat[0, layers_size])
            self.log_alpha_grad = self.actor.flat_grad[0, layers_size]
        self.critic = _critic_stack(critic, gradients=True)
        self.target = _critic_stack(target, gradients=False)
        self.actor_mean, self.actor_std = bind_statistics([policy.actor_encoder])
        self.critic_mean, self.critic_std = bind_statistics(list(critic.encoders))
        self.target_mean, self.target_std = bind_statistics(list(target.encoders))
        self.observation_width = self.actor_mean.shape[-1]
        self._inputs: dict[int, _Inputs] = {}
        """The standardised inputs of each batch size, kept between updates."""
        self._loaded: _Inputs | None = None

    def load(self, observations: torch.Tensor, next_observations: torch.Tensor) -> None:
        """Standardise an update's ``(B, D)`` observations once for all its passes, each by its networks'
        statistics: ``s`` and ``s'`` for the actor, ``s`` beside the actions for the critics, ``s'`` for the
        targets. The passes after read them, until the next load."""
        rows = len(observations)
        inputs = self._inputs.get(rows)
        if inputs is None:
            device, width = observations.device, self.observation_width
            inputs = self._inputs[rows] = _Inputs(
                torch.zeros(1, rows, width, device=device), torch.zeros(1, rows, width, device=device),
                torch.zeros(2, rows, width + self.action_width, device=device),
                torch.zeros(2, rows, width + self.action_width, device=device))
        self._loaded = inputs
        columns = slice(None, self.observation_width)
        normalize(observations, self.actor_mean, self.actor_std, out=inputs.actor)
        normalize(next_observations, self.actor_mean, self.actor_std, out=inputs.next_actor)
        normalize(observations, self.critic_mean, self.critic_std, out=inputs.critic[:, :, columns])
        normalize(next_observations, self.target_mean, self.target_std, out=inputs.target[:, :, columns])

    def policy(self, next_states: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian's mean and its log-std before the clamp, ``(B, A)`` each, at the loaded ``s`` (or ``s'``)."""
        inputs = self._loaded.next_actor if next_states else self._loaded.actor
        out = self.actor.forward(self.actor.workspace(inputs.shape[1]), inputs)[0]
        return out[:, :self.action_width], out[:, self.action_width:]

    def actor_backward(self, mean_grad: torch.Tensor, log_std_grad: torch.Tensor) -> None:
        """The actor's weight gradients into ``actor.flat_grad`` from d loss / d the mean and the log-std before the
        clamp, after :meth:`policy` at ``s``."""
        inputs = self._loaded.actor
        workspace = self.actor.workspace(inputs.shape[1])
        workspace.out_grad[0, :, :self.action_width] = mean_grad
        workspace.out_grad[0, :, self.action_width:] = log_std_grad
        self.actor.backward(workspace, inputs)

    def q_values(self, actions: torch.Tensor) -> torch.Tensor:
        """Both critics' ``(2, B)`` values of the loaded ``s`` and ``(B, A)`` actions."""
        inputs = self._loaded.critic
        inputs[:, :, self.observation_width:] = actions
        return self.critic.forward(self.critic.workspace(len(actions)), inputs)[..., 0]

    def target_q_values(self, actions: torch.Tensor) -> torch.Tensor:
        """Both target critics' ``(2, B)`` values of the loaded ``s'`` and ``(B, A)`` actions."""
        inputs = self._loaded.target
        inputs[:, :, self.observation_width:] = actions
        return self.target.forward(self.target.workspace(len(actions)), inputs)[..., 0]

    def critic_backward(self, q_grad: torch.Tensor) -> None:
        """Both critics' weight gradients into ``critic.flat_grad`` from d loss / d their ``(2, B)`` values, after
        :meth:`q_values`."""
        rows = q_grad.shape[1]
        workspace = self.critic.workspace(rows)
        workspace.out_grad[..., 0] = q_grad
        self.critic.backward(workspace, self._loaded.critic)

    def action_gradient(self, q_grad: torch.Tensor) -> torch.Tensor:
        """d loss / d the ``(B, A)`` actions of the last :meth:`q_values`, from d loss / d its ``(2, B)`` values."""
        workspace = self.critic.workspace(q_grad.shape[1])
        workspace.out_grad[..., 0] = q_grad
        return self.critic.input_gradient(workspace, slice(self.observation_width, None)).sum(dim=0)

    def follow(self, tau: float) -> None:
        """``target <- tau * critic + (1 - tau) * target``, every weight at once; tau = 1 copies."""
        if tau == 1.0:
            self.target.flat.copy_(self.critic.flat)
        else:
            self.target.flat.lerp_(self.critic.flat, tau)
