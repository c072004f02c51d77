"""Behavioural cloning: maximise the likelihood of the expert's actions under the policy.

    loss = -E_(s,a)~D [ log pi(a | s) ]

A categorical head makes this the cross-entropy of the expert's discrete actions; a Gaussian
head the negative log-likelihood of continuous ones. Only the actor learns: the value head of
the same :class:`~mazerun.nn.models.ActorCritic` stays untouched until PPO fine-tunes the clone.
Records written by DAgger carry the expert's label of every state beside the action executed
there (teacher forcing may have executed the learner's); the labels are the targets then, and
states the expert could not label are left out of the mean. A policy with memory reads chunks
of consecutive steps (truncated backpropagation through time), its state warmed by ``burn_in``
steps before each chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.distributions import Distribution

from mazerun.algorithms.base import Batch, OfflineAlgorithm, OfflineConfig, flat, warm_state
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.data.records import NO_LABEL
from mazerun.data.tensors import SequenceBatch, TransitionBatch
from mazerun.fast.fused import StackedMLP, mlp_layers, normalize, single_stack
from mazerun.fast.optim import Adam
from mazerun.nn.models import (
    ActorCritic,
    flatten_distribution,
    log_probs_and_entropies,
)


@dataclass
class BCConfig(OfflineConfig):
    kind_defaults: ClassVar[dict[str, dict[str, Any]]] = {"minigrid": {
        "n_updates": 10_000, "lr": 1e-3, "lr_schedule": "linear", "eval_every": 2000, "validation_percentage": 0.0,
        "rollout_len": 16, "nrollouts": 16, "runner.eval_repeats": 100}}
    """On MiniGrid and BabyAI (a GRU by default): chunks of 16 steps cover most episodes, and 16 of them make
    the 256 steps of a feed-forward batch; a rate 3x the plain one decaying to 0 ends on settled weights;
    success is 0 or 1 per episode, so 100 evaluation episodes (not 10) pick ``best.pt``, and no data is held
    out. 10k demos: 0.996 success on GoToRedBallGrey (6 min on 2 cores; the plain defaults 0.99 in 12 min),
    0.976 on GoToLocal (:mod:`bench.ladder`, :mod:`bench.defaults`)."""

    name: str = "bc"
    n_updates: int = 3000
    eval_every: int = 500
    validation_percentage: float = 10.0
    fused: bool = True
    """A categorical MLP policy on vector observations learns through :class:`mazerun.fast.fused.StackedMLP` (the
    same loss and Adam, the gradient by hand: :func:`imitation_gradient`); false: the autograd path."""


def imitation_loss(
    distribution: Distribution, targets: torch.Tensor, discrete: bool, labelled_only: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-mean(log pi(a_expert | s))`` and its metrics (entropy, and accuracy for discrete actions).

    With ``labelled_only`` the mean skips states the expert gave no label (``NO_LABEL``, or NaN
    for continuous actions); without it every target counts, which is the cheaper sum.
    """
    if labelled_only:
        valid = targets != NO_LABEL if discrete else ~torch.isnan(targets).any(dim=-1)
        targets = targets.clamp(min=0) if discrete else torch.nan_to_num(targets)
        weights = valid.to(torch.float32) / valid.sum().clamp(min=1)
        mean = lambda values: (values * weights).sum()  # noqa: E731
    else:
        mean = torch.mean
    log_probs, entropies = log_probs_and_entropies(distribution, targets)
    loss = -mean(log_probs)
    metrics = {"policy_loss": loss.detach(), "policy_entropy": mean(entropies.detach())}
    if discrete:
        predicted = distribution.logits.argmax(dim=-1)
        metrics["discrete_accuracy"] = mean((predicted == targets).to(torch.float32))
    return loss, metrics


def imitation_gradient(logits: torch.Tensor, targets: torch.Tensor, labelled_only: bool, out: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """The metrics of :func:`imitation_loss` for a categorical policy's ``(B, A)`` logits, and its gradient by hand:
    with weights ``w`` (``1 / B``, or over labelled states only), ``d loss / d logits = w * (softmax - onehot(a))``,
    written into ``out``."""
    if labelled_only:
        valid = targets != NO_LABEL
        weights = (valid.to(torch.float32) / valid.sum().clamp(min=1)).unsqueeze(1)
        targets = targets.clamp(min=0)
    else:
        weights = torch.full((1, 1), 1.0 / len(targets), device=logits.device)
    targets = targets.unsqueeze(1)
    log_p = torch.log_softmax(logits, 1)
    p = log_p.exp()
    torch.mul(p, weights, out=out).scatter_add_(1, targets, -weights.expand_as(targets))
    weighted_sum = lambda values: (values * weights).sum()  # noqa: E731
    correct = logits.argmax(dim=1, keepdim=True) == targets
    return {"policy_loss": -weighted_sum(log_p.gather(1, targets)),
            "policy_entropy": -weighted_sum((p * log_p).sum(1, keepdim=True)),
            "discrete_accuracy": weighted_sum(correct.to(torch.float32))}


def policy_of(network: ActorCritic, batch: Batch) -> Distribution:
    """The policy at every transition of ``batch``, over ``(B,)`` or ``(T * B,)`` of them."""
    if not isinstance(batch, SequenceBatch):
        return network.distribution(batch.observations)
    state = warm_state(network.distribution_sequence, batch, batch.actions.shape[1], network.actor_state_size)
    distribution, _ = network.distribution_sequence(batch.observations, batch.starts, state)
    return flatten_distribution(distribution)


def cloning_loss(network: ActorCritic, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The imitation loss of ``network`` on ``batch``: the expert's labels where the records have them."""
    labelled = batch.expert_actions is not None
    targets = batch.expert_actions if labelled else batch.actions
    if isinstance(batch, SequenceBatch):
        targets = flat(targets)
    return imitation_loss(policy_of(network, batch), targets, network.discrete, labelled_only=labelled)


class BehaviouralCloning(OfflineAlgorithm):
    network_type = "actor_critic"

    def __init__(self, config: BCConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.network = spec.actor_critic()
        self.actor_parameters = self.network.actor_parameters()
        self.stack = self.build_stack() if config.fused else None
        self.optimizer = Adam(self.actor_parameters, lr=config.lr)

    def build_stack(self) -> StackedMLP | None:
        network = self.network
        layers = mlp_layers(network.actor_encoder, network.actor_memory, network.actor_trunk, network.policy_head)
        return single_stack(*layers) if layers is not None and network.discrete else None

    def fused_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        stack, encoder = self.stack, self.network.actor_encoder
        workspace = stack.workspace(len(batch.actions))
        inputs = normalize(batch.observations[None], encoder.obs_mean, encoder.obs_std)
        labelled = batch.expert_actions is not None
        logits = stack.forward(workspace, inputs)[0]
        metrics = imitation_gradient(logits, batch.expert_actions if labelled else batch.actions, labelled,
                                     workspace.out_grad[0])
        stack.backward(workspace, inputs)
        return metrics

    def losses(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return cloning_loss(self.network, batch)

    def after_backward(self, metrics: dict[str, torch.Tensor]) -> None:
        metrics["policy_grad_norm"] = torch.nn.utils.get_total_norm(
            [parameter.grad for parameter in self.actor_parameters if parameter.grad is not None]
        )

    @torch.no_grad()
    def report_metrics(self) -> dict[str, float]:
        return {"policy_l2_norm": float(torch.sqrt(sum(p.pow(2).sum() for p in self.actor_parameters)))}

    def selection_metric(self, has_validation: bool) -> tuple[str, str]:
        return ("validation/policy_loss", "min") if has_validation else ("eval/mean_return", "max")


Config = BCConfig
Algorithm = BehaviouralCloning
