"""Advantage-weighted regression (AWR; Peng, Kumar, Zhang and Levine 2019, https://arxiv.org/abs/1910.00177) from
records, as a mazerun algorithm plugin.

    y           = r + gamma * (1 - done) * V_target(s')                  (the value target; no gradient)
    value_loss  = E_D [ (V(s) - y)^2 ]
    A(s, a)     = y - V(s)                                               (the advantage; no gradient)
    policy_loss = -E_D [ min(exp(A(s, a) / beta), max_weight) * log pi(a | s) ]

The best policy that stays within a KL budget of the policy that recorded the data (mu) is
pi*(a | s) ~ mu(a | s) * exp(A(s, a) / beta); weighted maximum likelihood on the recorded actions
fits pi to it without ever querying an action the data did not take. Small beta follows the
advantages greedily, large beta is plain behavioural cloning; the cap keeps a few transitions
from dominating a batch. The paper estimates returns by TD(lambda) over whole trajectories it
collects itself; from batches of single recorded transitions this file takes the one-step
target y (lambda = 0), bootstrapped from a Polyak-averaged copy of V (``tau``), as offline
value learners do.

Two optimisers, two :class:`UpdatePhase` s: each update steps V on ``value_loss``, then the policy
on ``policy_loss``, whose advantages read the V just stepped; the target follows after both.
Policy and V are the two halves of one :class:`~mazerun.nn.models.ActorCritic` (its actor and
its value head), so the checkpoints hold both, and ``policy=torch_policy`` and
``algorithm=ppo input_dir=<awr run>`` take the policy as they take a clone's. Discrete and
continuous actions alike (``log pi`` of either head).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import torch
import torch.nn.functional as F

from mazerun.algorithms.base import OfflineAlgorithm, ValueLearningConfig, frozen_copy
from mazerun.algorithms.protocol import AlgorithmSpec, UpdatePhase
from mazerun.config.schemas import check_fields
from mazerun.core.errors import MazerunError
from mazerun.data.tensors import TransitionBatch
from mazerun.fast.optim import Adam


@dataclass
class AWRConfig(ValueLearningConfig):
    name: str = "awr"
    n_updates: int = 10000
    eval_every: int = 1000
    tau: float = 0.005
    target_update_interval: int = 1
    beta: float = 10.0
    """Temperature of the advantage weights ``exp(A / beta)``: small follows the advantages, large is plain cloning.
    10 rather than 1: until V has learned, A is mostly the step's own reward (LunarLander charges every firing of
    the main engine), and sharp weights clone that. On 100 noisy heuristic episodes (epsilon 0.3), 5,000 updates,
    one seed, 20 evaluation episodes: beta 1 reached a return of 43, 3 (with tau 0.05) 177, 10 210."""
    max_weight: float = 20.0
    """Cap of the advantage weights, so that a few transitions cannot dominate a batch."""

    def check(self, prefix: str = "algorithm") -> None:
        super().check(prefix)
        check_fields(self, prefix, positive=("beta", "max_weight"))

    def check_spaces(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        """V and log pi need no discrete actions (unlike the Q-learners this config's base serves): any space fits."""


class AdvantageWeightedRegression(OfflineAlgorithm):
    network_type = "actor_critic"
    target_networks = {"target_network": "network"}
    phases = (UpdatePhase(loss="value_loss", optimizer="value_optimizer"),
              UpdatePhase(loss="policy_loss", optimizer="policy_optimizer"))

    def __init__(self, config: AWRConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        if spec.model_config.recurrent:
            raise MazerunError("awr learns from single transitions, without memory: drop model.memory "
                               "(algorithm=iql also weights cloning by advantages, with memory)")
        self.network = spec.actor_critic()
        self.target_network = frozen_copy(self.network)  # only its V is read
        policy = self.network.actor_parameters()
        in_policy = {id(parameter) for parameter in policy}
        value = [parameter for parameter in self.network.parameters() if id(parameter) not in in_policy]
        self.value_optimizer = Adam(value, lr=config.lr)
        self.policy_optimizer = Adam(policy, lr=config.lr)

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start from an earlier run's policy and V; the target V starts equal to that V."""
        super().load_network_state(state)
        self.target_network.load_state_dict(state)

    @torch.no_grad()
    def value_target(self, batch: TransitionBatch) -> torch.Tensor:
        """``y = r + gamma * (1 - done) * V_target(s')``: only termination ends the bootstrap, a time limit does not."""
        next_values = self.target_network.value(batch.next_observations)
        return batch.rewards + self.config.gamma * (1.0 - batch.dones) * next_values

    def value_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = self.network.value(batch.observations)
        loss = F.mse_loss(values, self.value_target(batch))
        return loss, {"value_loss": loss.detach(), "mean_v": values.detach().mean()}

    def policy_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            advantages = self.value_target(batch) - self.network.value(batch.observations)
            weights = torch.exp(advantages / self.config.beta).clamp(max=self.config.max_weight)
        log_probs = self.network.distribution(batch.observations).log_prob(batch.actions)
        loss = -(weights * log_probs).mean()
        return loss, {"policy_loss": loss.detach(), "mean_advantage": advantages.mean(), "mean_weight": weights.mean()}

    def losses(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Both losses on the same V, and their metrics: what validation reports."""
        value_loss, value_metrics = self.value_loss(batch)
        policy_loss, policy_metrics = self.policy_loss(batch)
        return value_loss + policy_loss, {**value_metrics, **policy_metrics}


Config = AWRConfig
Algorithm = AdvantageWeightedRegression
