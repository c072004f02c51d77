"""Implicit Q-learning for 1-D Box actions (Kostrikov, Nair & Levine, 2021), as CORL writes it: ``algorithm=iql``
on an env with continuous actions (:class:`~mazerun.algorithms.base.BoxVariant`).

Twin critics ``Q_1, Q_2`` of state and action, their Polyak-averaged targets ``Q'_j``, a state value ``V`` and
a Gaussian policy whose mean is squashed into the box (:class:`~mazerun.nn.models.TanhMeanGaussianPolicy`).
On a batch of recorded transitions ``(s, a, r, s', done)``:

    u        = min_j Q'_j(s, a) - V(s)                                            (no gradient into Q')
    L_V      = E[ |expectile - 1(u < 0)| * u^2 ]
    y        = r + gamma * (1 - done) * V(s')                                     (held fixed)
    L_Q      = sum_j E[ (Q_j(s, a) - y)^2 ]
    L_pi     = -E[ min(exp(beta * u), max_weight) * log pi(a | s) ]               (u held fixed)
    Q'_j    <- tau * Q_j + (1 - tau) * Q'_j                                       (after every update)

As in the discrete variant (:mod:`mazerun.algorithms.iql`), every term reads the networks as they were before
the update and the three losses train disjoint parameters, so one Adam step on their sum equals CORL's three
optimisers of one learning rate. Only recorded actions are ever valued, and the policy clones them weighted by
their advantage. ``expectile``, ``max_weight``, ``gamma``, ``tau``, ``target_update_interval`` and ``lr`` are the
shared keys; ``box.beta`` (3.0) is CORL's. Acting greedily takes the policy's mean.
"""

from __future__ import annotations

import torch

from mazerun.algorithms.base import OfflineAlgorithm, frozen_copy, load_matching_weights
from mazerun.algorithms.iql import IQLConfig, advantage_weights, expectile_loss, weighted_log_likelihood_loss
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.data.tensors import TransitionBatch
from mazerun.fast.optim import Adam
from mazerun.nn.models import TanhMeanGaussianPolicy, ValueNetwork


class ContinuousImplicitQLearning(OfflineAlgorithm):
    """The IQL learner for Box actions: the Gaussian policy that acts, twin critics, their targets and V."""

    network_type = "tanh_mean_gaussian"
    starts_from = ("actor_critic", "squashed_gaussian", "tanh_deterministic")
    target_networks = {"critic_target": "critic"}

    def __init__(self, config: IQLConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.network = TanhMeanGaussianPolicy(spec.model_config, spec.observation_space, spec.action_space,
                                              spec.vocabulary).to(spec.device)
        self.critic = spec.twin_q_network()
        self.critic_target = frozen_copy(self.critic)
        self.value_network = ValueNetwork(spec.model_config, spec.observation_space, spec.vocabulary).to(spec.device)
        parameters = [*self.network.parameters(), *self.critic.parameters(), *self.value_network.parameters()]
        self.optimizer = Adam(parameters, lr=config.lr)

    def losses(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = self.config
        with torch.no_grad():
            target_q = self.critic_target(batch.observations, batch.actions).min(dim=0).values
            q_targets = batch.rewards + config.gamma * (1.0 - batch.dones) * self.value_network(batch.next_observations)

        values = self.value_network(batch.observations)
        value_loss = expectile_loss(target_q - values, config.expectile)

        q_values = self.critic(batch.observations, batch.actions)
        td_loss = (q_values - q_targets).square().mean(dim=1).sum()

        weights = advantage_weights((target_q - values).detach(), config.box.beta, config.max_weight)
        policy_loss = weighted_log_likelihood_loss(self.network.distribution(batch.observations), batch.actions,
                                                   weights)

        metrics = {
            "td_loss": td_loss.detach(),
            "expectile_loss": value_loss.detach(),
            "policy_loss": policy_loss.detach(),
            "mean_q": q_values.detach().mean(),
            "mean_v": values.detach().mean(),
            "mean_weight": weights.mean(),
        }
        return value_loss + td_loss + policy_loss, metrics

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start from an earlier run's policy (a continuous BC clone, a SAC or TD3+BC policy): its matching
        weights; the critics and V, trained from scratch, read observations with its statistics."""
        load_matching_weights(self.network, state, self.critic, self.critic_target, self.value_network)
