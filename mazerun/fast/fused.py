"""An actor-critic's two MLPs evaluated as one: a batched matrix product per layer, a hand-written backward.

PPO's minibatches are small (64 rows) and its networks smaller (8-64-64-4 and 8-64-64-1), so
on a CPU a minibatch step is bound by the number of operations, not by arithmetic: with two
``nn.Sequential`` networks, a ``Distribution`` and autograd it is a few hundred eager ops. The
actor and the critic of an :class:`~mazerun.nn.models.ActorCritic` without memory have the same
layer widths (the heads aside), so here they live side by side in one tensor ``(2, S)``: row 0
holds the actor's weights, row 1 the critic's. Layer ``l`` of both is then one ``baddbmm`` of a
``(2, B, in)`` input with the stacked ``(2, out, in)`` weights, and its gradient two ``bmm``
calls. The two networks stay separate in value: nothing mixes the rows.

The module's own parameters and normalisation buffers become views into this storage, so the
module, its checkpoints and every plain-code path see the weights this class trains, and
``load_state_dict`` writes into it. The critic's head (1 output) is padded to the actor's head
width with zeros that no loss reads: their gradients are 0, Adam leaves them at 0.

:class:`FlatAdam` steps such a storage (this one, or SAC's stacked networks) with torch's fused Adam
kernel, one call for all rows (or one per row while their step counts differ, after a critic burn-in),
and reads and writes the ``state_dict`` of :class:`mazerun.fast.optim.Adam` over the module's parameters.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from mazerun.fast.optim import GROUP_DEFAULTS, adam_kernel
from mazerun.nn.models import NORMALIZED_OBS_CLIP, ActorCritic

log = logging.getLogger(__name__)
_warned_slow_dtypes: set[torch.dtype] = set()
"""Low-precision dtypes this process has already warned about: a population builds many learners."""

ACTIVATION_KINDS = {nn.Tanh: "tanh", nn.ReLU: "relu"}
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _linear_layers(trunk: nn.Sequential) -> tuple[list[nn.Linear], str | None]:
    """The Linear layers of an MLP trunk and its activation, or ``([], None)`` if it is anything else."""
    layers, kinds = [], set()
    for module in trunk:
        if isinstance(module, nn.Linear):
            layers.append(module)
        elif type(module) in ACTIVATION_KINDS:
            kinds.add(ACTIVATION_KINDS[type(module)])
        else:
            return [], None
    if len(kinds) > 1 or (layers and not kinds):
        return [], None
    return layers, next(iter(kinds), "tanh")


def fusable(network: nn.Module) -> bool:
    """Whether ``network`` is an :class:`ActorCritic` this module can fuse: vector observations, no memory, MLPs."""
    if not isinstance(network, ActorCritic) or network.recurrent:
        return False
    if network.actor_encoder.kind != "vector_obs" or network.critic_encoder.kind != "vector_obs":
        return False
    actor, actor_kind = _linear_layers(network.actor_trunk)
    critic, critic_kind = _linear_layers(network.critic_trunk)
    if actor_kind is None or critic_kind != actor_kind or len(actor) != len(critic):
        return False
    shapes = [tuple(layer.weight.shape) for layer in actor]
    if shapes != [tuple(layer.weight.shape) for layer in critic]:
        return False
    parameters = [*network.parameters()]
    return all(parameter.dtype == torch.float32 for parameter in parameters) and all(
        layer.bias is not None for layer in [*actor, *critic, network.policy_head, network.value_head])


@dataclass
class _Layer:
    weight: torch.Tensor
    """``(K, out, in)``, a view of the storage."""
    weight_t: torch.Tensor
    """The same, ``(K, in, out)``: what a forward multiplies by."""
    bias: torch.Tensor
    """``(K, 1, out)``."""
    weight_grad: torch.Tensor | None
    bias_grad: torch.Tensor | None


@dataclass
class Workspace:
    """What one pass of ``B`` rows writes, allocated once, so that a step allocates nothing for it."""

    hidden: list[torch.Tensor]
    """Each hidden layer's activations, ``(K, B, width)``."""
    hidden_grad: list[torch.Tensor]
    """d loss / d each hidden layer's pre-activations; empty in a workspace of forward passes only."""
    hidden_grad_t: list[torch.Tensor]
    out: torch.Tensor
    """The heads' outputs ``(K, B, head width)``."""
    out_grad: torch.Tensor | None
    """d loss / d ``out``: what :meth:`StackedMLP.backward` starts from; None for forward passes only."""
    out_grad_t: torch.Tensor | None


class StackedMLP:
    """``K`` MLPs of one layout whose weights are the rows of one ``(K, S)`` storage.

    Each row holds ``[W_0, b_0, W_1, b_1, ..., W_n, b_n]`` (``W_l`` of shape ``(out, in)``, as
    ``nn.Linear`` stores it) from column 0, the last layer being the head (no activation); the
    columns after them are the caller's. A forward is one ``baddbmm`` per layer for all ``K``
    networks, a backward two ``bmm`` per layer into the same layout of ``flat_grad``.
    """

    hidden_dtype = torch.float32
    """What the hidden layers' activations and their gradients are held in."""

    def __init__(self, flat: torch.Tensor, flat_grad: torch.Tensor | None, shapes: list[tuple[int, int]],
                 activation: str) -> None:
        count = flat.shape[0]
        self.flat, self.flat_grad, self.shapes, self.activation = flat, flat_grad, list(shapes), activation
        self.layers: list[_Layer] = []
        offset = 0
        for out, inp in shapes:
            weight = slice(offset, offset + out * inp)
            bias = slice(weight.stop, weight.stop + out)
            offset = bias.stop
            stacked = flat[:, weight].view(count, out, inp)
            self.layers.append(_Layer(
                stacked, stacked.transpose(1, 2), flat[:, bias].view(count, 1, out),
                None if flat_grad is None else flat_grad[:, weight].view(count, out, inp),
                None if flat_grad is None else flat_grad[:, bias].view(count, 1, out)))
        self.count = count
        self.hidden, self.head = self.layers[:-1], self.layers[-1]
        self._activate_ = torch.tanh_ if activation == "tanh" else torch.relu_
        self._activation_backward = (torch.ops.aten.tanh_backward.grad_input if activation == "tanh" else
                                     partial(torch.ops.aten.threshold_backward.grad_input, threshold=0))
        self._workspaces: dict[int, Workspace] = {}

    def workspace(self, rows: int) -> Workspace:
        """The workspace of passes over ``rows`` rows, allocated on first use and reused after; without gradient
        buffers where the stack has no gradients (a target network)."""
        workspace = self._workspaces.get(rows)
        if workspace is None:
            workspace = self._workspaces[rows] = self.allocate(rows, gradients=self.flat_grad is not None)
        return workspace

    def allocate(self, rows: int, gradients: bool = True) -> Workspace:
        """A new workspace for passes over ``rows`` rows; ``gradients=False``: for forward passes only."""
        device, count = self.head.weight.device, self.count
        widths = [layer.weight.shape[1] for layer in self.hidden]  # (K, out, in)
        hidden = [torch.zeros(count, rows, width, device=device, dtype=self.hidden_dtype) for width in widths]
        out = torch.zeros(count, rows, self.head.weight.shape[1], device=device)
        if not gradients:
            return Workspace(hidden, [], [], out, None, None)
        hidden_grad = [torch.zeros_like(activations) for activations in hidden]
        out_grad = torch.zeros_like(out)
        return Workspace(hidden, hidden_grad, [grad.transpose(1, 2) for grad in hidden_grad], out, out_grad,
                         out_grad.transpose(1, 2))

    def forward(self, workspace: Workspace, inputs: torch.Tensor) -> torch.Tensor:
        """Every network on its ``(K, B, D)`` inputs: activations and head outputs into ``workspace``; returns ``out``."""
        activate = self._activate_
        hidden = inputs
        for layer, output in zip(self.hidden, workspace.hidden):
            activate(torch.baddbmm(layer.bias, hidden, layer.weight_t, out=output))
            hidden = output
        return torch.baddbmm(self.head.bias, hidden, self.head.weight_t, out=workspace.out)

    def backward(self, workspace: Workspace, inputs: torch.Tensor) -> None:
        """Write the gradient of every weight and bias into ``flat_grad``, from ``workspace.out_grad`` (d loss /
        d head outputs) and the activations :meth:`forward` left there for the same ``inputs``."""
        grad, grad_t = workspace.out_grad, workspace.out_grad_t
        for index in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[index]
            layer_input = workspace.hidden[index - 1] if index else inputs
            torch.bmm(grad_t, layer_input, out=layer.weight_grad)
            torch.sum(grad, 1, keepdim=True, out=layer.bias_grad)
            if index:
                previous = workspace.hidden_grad[index - 1]
                torch.bmm(grad, layer.weight, out=previous)
                self._activation_backward(previous, layer_input, grad_input=previous)
                grad, grad_t = previous, workspace.hidden_grad_t[index - 1]

    def input_gradient(self, workspace: Workspace, columns: slice) -> torch.Tensor:
        """d loss / d the inputs' ``columns``, ``(K, B, len)``, from ``workspace.out_grad`` and the activations
        :meth:`forward` left there; no weight's gradient is computed (SAC's actor step reads the critics through
        their inputs, without training them)."""
        grad = workspace.out_grad
        for index in range(len(self.layers) - 1, 0, -1):
            previous = workspace.hidden_grad[index - 1]
            torch.bmm(grad, self.layers[index].weight, out=previous)
            self._activation_backward(previous, workspace.hidden[index - 1], grad_input=previous)
            grad = previous
        return torch.bmm(grad, self.layers[0].weight[:, :, columns])


@dataclass
class LowPrecisionWorkspace(Workspace):
    """A :class:`Workspace` of :class:`LowPrecisionMLP`: ``hidden`` and ``hidden_grad`` hold the low dtype."""

    low_inputs: torch.Tensor
    """The first layer's inputs in the low dtype, ``(K, B, D)``."""
    head_inputs: torch.Tensor
    """The last hidden layer's activations in float32: what the head multiplies."""
    head_inputs_grad: torch.Tensor | None
    """d loss / d the last hidden layer's pre-activations in float32, before rounding; None for forward passes only."""
    weight_grads: list[torch.Tensor]
    """Each hidden layer's weight gradient in the low dtype, copied into ``flat_grad`` after."""


class LowPrecisionMLP(StackedMLP):
    """A :class:`StackedMLP` whose hidden layers multiply in ``dtype`` (bfloat16): float32 accumulation over
    inputs rounded to 8 bits of mantissa, 2-4x float32's speed on a CPU with AVX512-BF16 or AMX (slower on
    one without), as ``torch.autocast`` would do it.

    What is stored stays float32: the weights (each pass multiplies a fresh low copy of them), the
    gradients in ``flat_grad``, and therefore Adam and every checkpoint. The head is small and its
    outputs are Q-values or logits whose differences decide actions, so it runs in float32 on float32
    copies of the last activations. The cost is a relative error of about 2^-8 per hidden activation
    and gradient entry, the noise mixed-precision training accepts everywhere.
    """

    def __init__(self, flat: torch.Tensor, flat_grad: torch.Tensor | None, shapes: list[tuple[int, int]],
                 activation: str, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(flat, flat_grad, shapes, activation)
        self.hidden_dtype = dtype
        self.low_layers = []
        for layer in self.hidden:
            weight = torch.empty(layer.weight.shape, dtype=dtype, device=flat.device)
            self.low_layers.append(_Layer(weight, weight.transpose(1, 2),
                                          torch.empty(layer.bias.shape, dtype=dtype, device=flat.device), None, None))

    def allocate(self, rows: int, gradients: bool = True) -> LowPrecisionWorkspace:
        base, device, count = super().allocate(rows, gradients), self.head.weight.device, self.count
        head_width = self.head.weight.shape[2]
        return LowPrecisionWorkspace(
            **vars(base),
            low_inputs=torch.zeros(count, rows, self.layers[0].weight.shape[2], device=device, dtype=self.hidden_dtype),
            head_inputs=torch.zeros(count, rows, head_width, device=device),
            head_inputs_grad=torch.zeros(count, rows, head_width, device=device) if gradients else None,
            weight_grads=[torch.zeros_like(low.weight) for low in self.low_layers] if gradients else [])

    def forward(self, workspace: LowPrecisionWorkspace, inputs: torch.Tensor) -> torch.Tensor:
        if not self.hidden:
            return super().forward(workspace, inputs)
        activate = self._activate_
        hidden = workspace.low_inputs.copy_(inputs)
        for layer, low, output in zip(self.hidden, self.low_layers, workspace.hidden):
            low.weight.copy_(layer.weight)
            low.bias.copy_(layer.bias)
            activate(torch.baddbmm(low.bias, hidden, low.weight_t, out=output))
            hidden = output
        head_inputs = workspace.head_inputs.copy_(hidden)
        return torch.baddbmm(self.head.bias, head_inputs, self.head.weight_t, out=workspace.out)

    def backward(self, workspace: LowPrecisionWorkspace, inputs: torch.Tensor) -> None:
        if not self.hidden:
            return super().backward(workspace, inputs)
        head = self.head
        torch.bmm(workspace.out_grad_t, workspace.head_inputs, out=head.weight_grad)
        torch.sum(workspace.out_grad, 1, keepdim=True, out=head.bias_grad)
        grad = self._head_input_gradient(workspace)
        for index in range(len(self.hidden) - 1, -1, -1):
            layer, low = self.hidden[index], self.low_layers[index]
            layer_input = workspace.hidden[index - 1] if index else workspace.low_inputs
            torch.bmm(workspace.hidden_grad_t[index], layer_input, out=workspace.weight_grads[index])
            layer.weight_grad.copy_(workspace.weight_grads[index])
            # summed in the low dtype with float32 accumulation, rounded once, as the weight gradient is: asking the
            # sum for float32 would first copy the whole (rows, width) gradient into float32
            layer.bias_grad.copy_(grad.sum(1, keepdim=True))
            if index:
                previous = workspace.hidden_grad[index - 1]
                torch.bmm(grad, low.weight, out=previous)
                self._activation_backward(previous, layer_input, grad_input=previous)
                grad = previous

    def input_gradient(self, workspace: LowPrecisionWorkspace, columns: slice) -> torch.Tensor:
        if not self.hidden:
            return super().input_gradient(workspace, columns)
        grad = self._head_input_gradient(workspace)
        for index in range(len(self.hidden) - 1, 0, -1):
            previous = workspace.hidden_grad[index - 1]
            torch.bmm(grad, self.low_layers[index].weight, out=previous)
            self._activation_backward(previous, workspace.hidden[index - 1], grad_input=previous)
            grad = previous
        return torch.bmm(grad, self.low_layers[0].weight[:, :, columns]).float()

    def _head_input_gradient(self, workspace: LowPrecisionWorkspace) -> torch.Tensor:
        """d loss / d the last hidden layer's pre-activations from ``workspace.out_grad``, through the float32 head,
        rounded into ``hidden_grad[-1]`` (returned) for the low products before it."""
        head_inputs_grad = workspace.head_inputs_grad
        torch.bmm(workspace.out_grad, self.head.weight, out=head_inputs_grad)
        self._activation_backward(head_inputs_grad, workspace.head_inputs, grad_input=head_inputs_grad)
        return workspace.hidden_grad[-1].copy_(head_inputs_grad)


def native_low_precision(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` multiplies ``dtype`` in hardware. A CPU without AVX512-BF16 or AMX (an AVX2-only
    one, say) falls back to a scalar bfloat16 matrix product about 20x slower than float32's."""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported() and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def stacked_mlp(flat: torch.Tensor, flat_grad: torch.Tensor | None, shapes: list[tuple[int, int]], activation: str,
                matmul_dtype: torch.dtype = torch.float32) -> StackedMLP:
    """A :class:`StackedMLP` over ``flat``, or a :class:`LowPrecisionMLP` for a ``matmul_dtype`` other than float32
    (with one warning per process where the device has no native products of that dtype)."""
    if matmul_dtype == torch.float32:
        return StackedMLP(flat, flat_grad, shapes, activation)
    if not native_low_precision(matmul_dtype, flat.device) and matmul_dtype not in _warned_slow_dtypes:
        _warned_slow_dtypes.add(matmul_dtype)
        name = str(matmul_dtype).removeprefix("torch.")
        log.warning("algorithm.matmul_dtype=%s: this %s has no native %s matrix products%s, so they run "
                    "many times slower than float32's; set algorithm.matmul_dtype=float32", name,
                    flat.device.type, name, " (AVX512-BF16 or AMX)" if flat.device.type == "cpu" else "")
    return LowPrecisionMLP(flat, flat_grad, shapes, activation, matmul_dtype)


def mlp_layers(encoder: nn.Module, memory: nn.Module | None, trunk: nn.Sequential, head: nn.Linear
               ) -> tuple[list[nn.Linear], str] | None:
    """The Linear layers (trunk, then head) and activation of a network :class:`StackedMLP` can run, else None:
    vector observations, no memory, a float32 MLP trunk of one activation (tanh or ReLU), biases everywhere."""
    if getattr(encoder, "kind", None) != "vector_obs" or memory is not None:
        return None
    layers, activation = _linear_layers(trunk)
    if activation is None:
        return None
    layers = [*layers, head]
    if any(layer.bias is None or layer.weight.dtype != torch.float32 for layer in layers):
        return None
    return layers, activation


def bind_row(stack: StackedMLP, row: int, layers: list[nn.Linear], gradients: bool = False) -> None:
    """Make ``layers``' weights and biases (values kept) live in row ``row`` of ``stack``; with ``gradients``,
    their ``.grad`` too, so an optimiser over the parameters steps what :meth:`StackedMLP.backward` writes.
    A layer with fewer outputs than the stack's (the critic's value head) takes the first rows of its slot."""
    for slot, layer in zip(stack.layers, layers):
        rows = layer.weight.shape[0]
        bind(layer.weight, slot.weight[row, :rows])
        bind(layer.bias, slot.bias[row, 0, :rows])
        if gradients:
            layer.weight.grad, layer.bias.grad = slot.weight_grad[row, :rows], slot.bias_grad[row, 0, :rows]


def single_stack(layers: list[nn.Linear], activation: str, matmul_dtype: torch.dtype = torch.float32) -> StackedMLP:
    """A one-row :class:`StackedMLP` (see :func:`stacked_mlp` for ``matmul_dtype``) in new storage that ``layers``'
    parameters (values kept) and their ``.grad`` now live in: an optimiser over those parameters steps what its
    backward writes."""
    size = sum(layer.weight.numel() + layer.bias.numel() for layer in layers)
    flat, flat_grad = torch.zeros(2, 1, size, device=layers[0].weight.device)
    stack = stacked_mlp(flat, flat_grad, [tuple(layer.weight.shape) for layer in layers], activation, matmul_dtype)
    bind_row(stack, 0, layers, gradients=True)
    return stack


def normalize(observations: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """What :class:`~mazerun.nn.models.ObservationEncoder` does to vector observations, for stacked ``(K, B, D)``;
    into ``out`` (e.g. the columns of a wider input) where given, the same values without a copy."""
    if out is None:
        return ((observations - mean) / std).clamp_(-NORMALIZED_OBS_CLIP, NORMALIZED_OBS_CLIP)
    return torch.sub(observations, mean, out=out).div_(std).clamp_(-NORMALIZED_OBS_CLIP, NORMALIZED_OBS_CLIP)


HeadGradient = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                        tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``(Q(s), Q_online(s'), Q_target(s'), out) -> (losses (K,), metrics)``, writing d loss / d Q(s) into ``out``."""


class StackedQLearner:
    """``K`` Q-networks (rows of ``flat``) and their targets (rows of ``target_flat``), one learn step's passes.

    A value-learning step reads three passes: the online network on s (trained), on s' (to pick
    the next action) and the target network on s' (to value it). Here each is three ``baddbmm``
    for all ``K`` agents; the algorithm's :data:`HeadGradient` turns the Q-values into losses and
    d loss / d Q(s), and :meth:`StackedMLP.backward` into ``flat_grad``. One agent is ``K = 1``
    (:meth:`of_networks`); a population's cohort hands its stacked storage in.
    """

    def __init__(self, flat: torch.Tensor, flat_grad: torch.Tensor, target_flat: torch.Tensor,
                 shapes: list[tuple[int, int]], activation: str, matmul_dtype: torch.dtype = torch.float32) -> None:
        self.matmul_dtype = matmul_dtype
        self.online = stacked_mlp(flat, flat_grad, shapes, activation, matmul_dtype)
        self.target = stacked_mlp(target_flat, None, shapes, activation, matmul_dtype)
        self._workspaces: dict[int, tuple[Workspace, Workspace]] = {}
        """The online network's two workspaces per batch size: on s (trained through) and on s'."""

    @classmethod
    def of_networks(cls, network: nn.Module, target: nn.Module, matmul_dtype: torch.dtype = torch.float32
                    ) -> StackedQLearner | None:
        """One :class:`~mazerun.nn.models.QNetwork` and its target, their parameters (and the online one's
        gradients) moved into new storage; None when the network is not an MLP on vector observations.
        A ``matmul_dtype`` other than float32 runs the hidden layers as :class:`LowPrecisionMLP`."""
        online_layers = mlp_layers(network.encoder, network.memory, network.trunk, network.head)
        target_layers = mlp_layers(target.encoder, target.memory, target.trunk, target.head)
        if online_layers is None or target_layers is None:
            return None
        online = single_stack(*online_layers)
        learner = cls(online.flat, online.flat_grad, torch.zeros_like(online.flat), online.shapes, online.activation,
                      matmul_dtype)
        bind_row(learner.target, 0, target_layers[0])
        return learner

    def gradient(self, observations: torch.Tensor, next_observations: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, head_gradient: HeadGradient, next_target: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Losses ``(K,)`` and metrics of ``(K, B, D)`` transitions (raw observations, statistics ``(K, 1, D)``);
        the gradient of each agent's loss goes into its row of ``flat_grad``. ``next_target``, the target
        network's ``(K, B, A)`` Q-values of the next observations where the caller has them, skips that pass."""
        rows = observations.shape[1]
        workspaces = self._workspaces.get(rows)
        if workspaces is None:
            workspaces = self._workspaces[rows] = (self.online.allocate(rows),
                                                   self.online.allocate(rows, gradients=False))
        trained, chooser = workspaces
        inputs, next_inputs = normalize(observations, mean, std), normalize(next_observations, mean, std)
        q_values = self.online.forward(trained, inputs)
        next_online = self.online.forward(chooser, next_inputs)
        if next_target is None:
            next_target = self.target.forward(self.target.workspace(rows), next_inputs)
        losses, metrics = head_gradient(q_values, next_online, next_target, trained.out_grad)
        self.online.backward(trained, inputs)
        return losses, metrics

    def target_values(self, next_observations: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      out: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """The target networks' Q-values ``(K, N, A)`` of ``N`` shared next observations ``(N, D)``, into
        ``out``, ``chunk`` rows at a time: a table a learner that copies its target rarely can read
        :meth:`gradient`'s ``next_target`` from."""
        for start in range(0, next_observations.shape[0], chunk):
            rows = next_observations[start:start + chunk]
            inputs = normalize(rows.expand(self.target.count, -1, -1), mean, std)
            out[:, start:start + rows.shape[0]] = self.target.forward(self.target.workspace(rows.shape[0]), inputs)
        return out


class FusedActorCritic:
    """The actor (row 0) and critic (row 1) of ``network`` in one ``(2, S)`` storage; see the module docstring.

    Layout of each row: every trunk layer's weight and bias, then the head's weight and bias
    (the critic's padded to the actor's width), then the actor's ``log_std`` for continuous
    actions (padding in the critic's row).
    """

    def __init__(self, network: ActorCritic) -> None:
        if not fusable(network):
            raise ValueError("only an ActorCritic with vector observations, no memory and MLP trunks can be fused")
        self.network = network
        actor_layers, self.activation = _linear_layers(network.actor_trunk)
        critic_layers, _ = _linear_layers(network.critic_trunk)
        actor_layers = [*actor_layers, network.policy_head]
        critic_layers = [*critic_layers, network.value_head]
        self.discrete = network.discrete
        self.action_width = network.policy_head.out_features
        device = network.policy_head.weight.device
        shapes = [tuple(layer.weight.shape) for layer in actor_layers]
        size = sum(out * inp + out for out, inp in shapes) + (0 if self.discrete else self.action_width)
        self.flat = torch.zeros(2, size, device=device)
        self.flat_grad = torch.zeros(2, size, device=device)
        self.stack = StackedMLP(self.flat, self.flat_grad, shapes, self.activation)
        for row, layers in enumerate((actor_layers, critic_layers)):
            bind_row(self.stack, row, layers)  # the critic's head has fewer outputs than the actor's
        self.log_std: torch.Tensor | None = None
        self.log_std_grad: torch.Tensor | None = None
        if not self.discrete:
            layers_end = size - self.action_width
            self.log_std = self.flat[0, layers_end:]
            self.log_std_grad = self.flat_grad[0, layers_end:]
            bind(network.log_std, self.log_std)
        self.obs_mean, self.obs_std = bind_statistics([network.actor_encoder, network.critic_encoder])
        self.forward, self.backward = self.stack.forward, self.stack.backward
        self._workspaces: dict[int, ActorCriticWorkspace] = {}

    def normalize(self, observations: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` observations as each encoder standardises them: ``(2, N, D)``."""
        return normalize(observations, self.obs_mean, self.obs_std)

    def workspace(self, rows: int) -> ActorCriticWorkspace:
        """The tensors a pass over ``rows`` rows writes, allocated on first use and reused after."""
        workspace = self._workspaces.get(rows)
        if workspace is None:
            base = self.stack.allocate(rows)
            out, out_grad = base.out, base.out_grad
            workspace = self._workspaces[rows] = ActorCriticWorkspace(
                **vars(base), head=out[0], values=out[1, :, :1], head_grad=out_grad[0], value_grad=out_grad[1, :, :1])
        return workspace

    @torch.no_grad()
    def heads(self, observations: torch.Tensor) -> ActorCriticWorkspace:
        """The actor's head (``.head``: logits or means) and the critic's values (``.values``, ``(B, 1)``) of
        ``(B, D)`` observations, in the workspace of ``B`` rows: valid until the next pass of that many rows."""
        workspace = self.workspace(len(observations))
        self.forward(workspace, self.normalize(observations))
        return workspace


@dataclass
class ActorCriticWorkspace(Workspace):
    """A :class:`Workspace` of the two rows, with views of each network's part of the head outputs."""

    head: torch.Tensor
    """``out[0]``: the actor's logits or means."""
    values: torch.Tensor
    """``out[1, :, :1]``: the critic's values, ``(B, 1)``."""
    head_grad: torch.Tensor
    value_grad: torch.Tensor


def bind_statistics(encoders: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """The vector encoders' observation statistics stacked ``(K, 1, D)``, for :func:`normalize`; the encoders'
    buffers become views of them, so ``set_normalization`` and ``load_state_dict`` (which copy) write into them."""
    width, device = encoders[0].obs_mean.shape[0], encoders[0].obs_mean.device
    mean = torch.zeros(len(encoders), 1, width, device=device)
    std = torch.ones(len(encoders), 1, width, device=device)
    for row, encoder in enumerate(encoders):
        for name, storage in (("obs_mean", mean), ("obs_std", std)):
            storage[row, 0].copy_(getattr(encoder, name))
            setattr(encoder, name, storage[row, 0])
    return mean, std


def bind(parameter: torch.Tensor, view: torch.Tensor) -> None:
    """Make ``parameter`` (same object, same value) live in ``view``."""
    with torch.no_grad():
        view.copy_(parameter)
    parameter.data = view


class FlatAdam:
    """Adam over a ``(K, S)`` storage that ``parameters`` live in (a :class:`FusedActorCritic`'s, a
    :class:`StackedMLP`'s), stepped from ``flat_grad``, each row with its own step count.

    The state is that of :class:`mazerun.fast.optim.Adam` (torch's layout) over ``parameters``, the
    module's parameters in their usual order; a row never stepped has no state, as a parameter
    never given a gradient has none.
    """

    def __init__(self, flat: torch.Tensor, flat_grad: torch.Tensor, parameters: list[torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.flat, self.flat_grad = flat, flat_grad
        self.parameters = parameters
        self.param_groups: list[dict[str, Any]] = [
            {"lr": lr, "betas": tuple(betas), "eps": eps, **GROUP_DEFAULTS, "params": parameters}
        ]
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        self.counts = [0] * flat.shape[0]
        """Each row's step count."""
        self._step = torch.zeros((), device=flat.device)
        """The count the kernel reads (it takes a tensor)."""
        self._rows = [_row_of(parameter, flat) for parameter in parameters]

    def step(self, rows: tuple[int, ...] | None = None) -> None:
        """One step of the rows given (all by default; e.g. the critic's alone); the gradients are ``flat_grad``'s."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        counts = self.counts
        rows = tuple(range(len(counts))) if rows is None else rows
        if len(rows) == len(counts) and len(set(counts)) == 1:  # one kernel call for every row
            groups = [(self.flat, self.flat_grad, self.exp_avg, self.exp_avg_sq, counts[0] + 1)]
        else:
            groups = [(self.flat[row], self.flat_grad[row], self.exp_avg[row], self.exp_avg_sq[row], counts[row] + 1)
                      for row in rows]
        for parameter, grad, exp_avg, exp_avg_sq, count in groups:
            self._step.fill_(count)
            adam_kernel([parameter], [grad], [exp_avg], [exp_avg_sq], [self._step], lr=group["lr"], beta1=beta1,
                        beta2=beta2, eps=group["eps"])
        for row in rows:
            counts[row] += 1

    def _views(self, tensor: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
        """``parameter``'s part of a storage-shaped ``tensor``."""
        offset = parameter.storage_offset() - self.flat.storage_offset()
        row, start = divmod(offset, self.flat.shape[1])
        return tensor[row, start:start + parameter.numel()].view_as(parameter)

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for index, (parameter, row) in enumerate(zip(self.parameters, self._rows)):
            if self.counts[row] > 0:
                state[index] = {"step": torch.tensor(float(self.counts[row])),
                                "exp_avg": self._views(self.exp_avg, parameter).clone(),
                                "exp_avg_sq": self._views(self.exp_avg_sq, parameter).clone()}
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.parameters)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state of an Adam over the same parameters; each row's parameters must share one step count."""
        (saved,) = state_dict["param_groups"]
        if len(saved["params"]) != len(self.parameters):
            raise ValueError(f"the saved optimiser state holds {len(saved['params'])} parameters, this one "
                             f"{len(self.parameters)}")
        if saved.get("weight_decay") or saved.get("amsgrad") or saved.get("maximize"):
            raise ValueError("the saved optimiser state uses weight decay, amsgrad or maximize, which this Adam lacks")
        self.param_groups[0].update(lr=saved["lr"], betas=tuple(saved["betas"]), eps=saved["eps"])
        steps: list[set[float]] = [set() for _ in self.counts]
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        by_index = dict(zip(saved["params"], range(len(self.parameters))))
        for index, values in state_dict["state"].items():
            position = by_index[index]
            parameter, row = self.parameters[position], self._rows[position]
            steps[row].add(float(values["step"]))
            self._views(self.exp_avg, parameter).copy_(values["exp_avg"])
            self._views(self.exp_avg_sq, parameter).copy_(values["exp_avg_sq"])
        for row, counts in enumerate(steps):
            missing = any(self._rows[position] == row and index not in state_dict["state"]
                          for index, position in by_index.items())
            if len(counts) > 1 or (counts and missing):
                raise ValueError("the saved optimiser state has different step counts within row "
                                 f"{row} of the storage (a network); it cannot be stepped as one")
            self.counts[row] = int(counts.pop()) if counts else 0


def _row_of(parameter: torch.Tensor, storage: torch.Tensor) -> int:
    if parameter.untyped_storage().data_ptr() != storage.untyped_storage().data_ptr():
        raise ValueError("a parameter outside the fused storage")
    return (parameter.storage_offset() - storage.storage_offset()) // storage.shape[1]
