"""Behavioural cloning: maximise the likelihood of the expert's actions under the policy.

    loss = -E_(s,a)~D [ log pi(a | s) ]

A categorical head makes this the cross-entropy of the expert's discrete actions; a Gaussian
head the negative log-likelihood of continuous ones. Only the actor learns: the value head of
the same :class:`~mazerun.models.ActorCritic` stays untouched until PPO fine-tunes the clone.
Records written by DAgger carry the expert's label of every state beside the action executed
there (teacher forcing may have executed the learner's); the labels are the targets then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import torch

from mazerun.algorithms.base import OfflineAlgorithm, OfflineConfig
from mazerun.data import TransitionBatch
from mazerun.models import ActorCritic, ModelConfig, ModelInput, Vocabulary, build_actor_critic


@dataclass
class BCConfig(OfflineConfig):
    imitates: ClassVar[bool] = True

    name: str = "bc"
    n_updates: int = 3000
    eval_every: int = 500
    validation_percentage: float = 10.0


def imitation_loss(
    network: ActorCritic, observations: ModelInput, expert_actions: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-mean(log pi(a_expert | s))`` and its metrics (entropy, and accuracy for discrete actions)."""
    distribution = network.distribution(observations)
    loss = -distribution.log_prob(expert_actions).mean()
    metrics = {"policy_loss": loss.detach(), "policy_entropy": distribution.entropy().mean().detach()}
    if network.discrete:
        predicted = distribution.logits.argmax(dim=-1)
        metrics["discrete_accuracy"] = (predicted == expert_actions).float().mean()
    return loss, metrics


class BehaviouralCloning(OfflineAlgorithm):
    network_type = "actor_critic"

    def __init__(
        self,
        config: BCConfig,
        model_config: ModelConfig,
        observation_space: gym.Space,
        action_space: gym.Space,
        vocabulary: Vocabulary | None,
        device: torch.device,
    ) -> None:
        super().__init__(config, model_config, observation_space, action_space, vocabulary, device)
        self.network = build_actor_critic(model_config, observation_space, action_space, vocabulary).to(device)
        self.actor_parameters = self.network.actor_parameters()
        self.optimizer = torch.optim.Adam(self.actor_parameters, lr=config.lr)

    def losses(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = batch.actions if batch.expert_actions is None else batch.expert_actions
        return imitation_loss(self.network, batch.observations, targets)

    def after_backward(self, metrics: dict[str, torch.Tensor]) -> None:
        metrics["policy_grad_norm"] = torch.nn.utils.get_total_norm(
            [parameter.grad for parameter in self.actor_parameters if parameter.grad is not None]
        )

    @torch.no_grad()
    def report_metrics(self) -> dict[str, float]:
        return {"policy_l2_norm": float(torch.sqrt(sum(p.pow(2).sum() for p in self.actor_parameters)))}

    def act(self, observations: ModelInput, deterministic: bool = True) -> torch.Tensor:
        return self.network.act(observations, deterministic)

    def selection_metric(self, has_validation: bool) -> tuple[str, str]:
        return ("validation/policy_loss", "min") if has_validation else ("eval/mean_return", "max")


Config = BCConfig
Algorithm = BehaviouralCloning
