"""Behavioural cloning: maximise the likelihood of the recorded actions under the policy.

    loss = -E_(s,a)~D [ log pi(a | s) ]

A categorical head makes this the cross-entropy of the expert's discrete actions; a Gaussian
head the negative log-likelihood of continuous ones. Only the actor learns: the value head of
the same :class:`~mazerun.models.ActorCritic` stays untouched until PPO fine-tunes the clone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mazerun.algorithms.base import OfflineAlgorithm, OfflineConfig
from mazerun.data import TransitionBatch
import gymnasium as gym

from mazerun.models import ModelConfig, ModelInput, Vocabulary, build_actor_critic


@dataclass
class BCConfig(OfflineConfig):
    name: str = "bc"
    n_updates: int = 3000
    eval_every: int = 500
    validation_percentage: float = 10.0


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
        self.config = config
        self.network = network = build_actor_critic(model_config, observation_space, action_space, vocabulary).to(device)
        self.actor_parameters = [
            parameter for name, parameter in network.named_parameters() if not name.startswith(("critic_", "value_"))
        ]
        self.optimizer = torch.optim.Adam(self.actor_parameters, lr=config.lr)

    def losses(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        distribution = self.network.distribution(batch.observations)
        loss = -distribution.log_prob(batch.actions).mean()
        metrics = {"policy_loss": loss.detach(), "policy_entropy": distribution.entropy().mean().detach()}
        if self.network.discrete:
            predicted = distribution.logits.argmax(dim=-1)
            metrics["discrete_accuracy"] = (predicted == batch.actions).float().mean()
        return loss, metrics

    def update(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        loss, metrics = self.losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["policy_grad_norm"] = torch.nn.utils.get_total_norm(
            [parameter.grad for parameter in self.actor_parameters if parameter.grad is not None]
        )
        self.optimizer.step()
        return metrics

    @torch.no_grad()
    def report_metrics(self) -> dict[str, float]:
        return {"policy_l2_norm": float(torch.sqrt(sum(p.pow(2).sum() for p in self.actor_parameters)))}

    def act(self, observations: ModelInput, deterministic: bool = True) -> torch.Tensor:
        return self.network.act(observations, deterministic)

    def selection_metric(self, has_validation: bool) -> tuple[str, str]:
        return ("validation/policy_loss", "min") if has_validation else ("eval/mean_return", "max")


Config = BCConfig
Algorithm = BehaviouralCloning
