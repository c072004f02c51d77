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
shared keys; ``box.beta`` (3.0) is CORL's, ``box.log_std_init`` (-1.5) d3rlpy's. Acting greedily takes the policy's
mean.

With ``fused`` (MLPs on vector observations) the gradient of the three losses is written by hand on the stacks of
:mod:`mazerun.fast.stacked_box` (:meth:`ContinuousImplicitQLearning.fused_gradient`); the offline loop holds it to
autograd of :meth:`ContinuousImplicitQLearning.losses` on the first batch.
"""

from __future__ import annotations

import torch

from mazerun.algorithms.base import (
    OfflineAlgorithm,
    frozen_copy,
    load_matching_weights,
    product_dtype,
    require_stack,
)
from mazerun.algorithms.iql import IQLConfig, advantage_weights, expectile_loss, weighted_log_likelihood_loss
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.data.tensors import TransitionBatch
from mazerun.fast.fused import LOG_SQRT_2PI
from mazerun.fast.optim import Adam
from mazerun.fast.stacked_box import StackedActor, StackedTwinQ, StackedValue, stackable
from mazerun.nn.models import IQL_LOG_STD_RANGE, TanhMeanGaussianPolicy, ValueNetwork


class ContinuousImplicitQLearning(OfflineAlgorithm):
    """The IQL learner for Box actions: the Gaussian policy that acts, twin critics, their targets and V."""

    network_type = "tanh_mean_gaussian"
    starts_from = ("actor_critic", "squashed_gaussian", "tanh_deterministic")
    target_networks = {"critic_target": "critic"}

    def __init__(self, config: IQLConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.network = TanhMeanGaussianPolicy(spec.model_config, spec.observation_space, spec.action_space,
                                              spec.vocabulary, config.box.log_std_init).to(spec.device)
        self.critic = spec.twin_q_network()
        self.critic_target = frozen_copy(self.critic)
        self.value_network = ValueNetwork(spec.model_config, spec.observation_space, spec.vocabulary).to(spec.device)
        self.stack = require_stack(self.build_stack(), config) if config.fused else None
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

    def build_stack(self) -> tuple[StackedTwinQ, StackedActor, StackedValue] | None:
        """The critics with their targets, the policy and V in stacked storage (MLPs only)."""
        if not (stackable(self.network, self.critic, self.network.log_std_logit) and
                StackedValue.stackable(self.value_network)):
            return None
        dtype = product_dtype(self.config)
        return (StackedTwinQ(self.critic, self.critic_target, dtype), StackedActor(self.network, matmul_dtype=dtype),
                StackedValue(self.value_network, dtype))

    def fused_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """:meth:`losses`' gradient by hand. With ``u = min_j Q'_j(s, a) - V(s)``, ``w = min(exp(beta u), max_weight)``,
        the policy's mean ``m = centre + h * tanh(z)`` and std ``sigma``, per row:

            d L / d V(s)      = -2 |expectile - 1(u < 0)| u / B
            d L / d Q_j(s, a) = 2 (Q_j(s, a) - y) / B
            d L / d z         = -w / B * (a - m) / sigma^2 * h * (1 - tanh(z)^2)
            d L / d log sigma = -sum_rows w / B * ((a - m)^2 / sigma^2 - 1)
            d L / d logit     = d L / d log sigma * 7 * sigmoid(logit) * (1 - sigmoid(logit))    (log sigma's range is 7)
        """
        config, (critics, actor, value) = self.config, self.stack
        rows = len(batch.actions)
        critics.load(batch.observations, batch.observations)  # the targets value the recorded (s, a)
        target_q = critics.target_q_values(batch.actions).min(dim=0).values
        q_targets = batch.rewards + config.gamma * (1.0 - batch.dones) * value.next_values(batch.next_observations)
        values = value.values(batch.observations)
        advantages = target_q - values
        expectiles = torch.where(advantages < 0, 1.0 - config.expectile, config.expectile)
        value.backward(expectiles * advantages * (-2.0 / rows))
        q_values = critics.q_values(batch.actions)
        errors = q_values - q_targets
        critics.critic_backward(errors * (2.0 / rows))

        policy, weights = self.network, advantage_weights(advantages, config.box.beta, config.max_weight)
        actor.load(batch.observations)
        squashed = torch.tanh(actor.heads())
        log_std = policy.log_std
        residuals = batch.actions - policy.to_env(squashed)
        scaled = residuals * torch.exp(-2.0 * log_std)
        log_probs = (-0.5 * residuals * scaled - log_std - LOG_SQRT_2PI).sum(dim=-1)
        row_weights = (weights / rows)[:, None]
        half_width = (policy.action_high - policy.action_low) / 2
        actor.backward(-row_weights * scaled * half_width * (1.0 - squashed.square()))
        low, high = IQL_LOG_STD_RANGE
        fraction = torch.sigmoid(policy.log_std_logit)
        policy.log_std_logit.grad = (-(row_weights * (residuals * scaled - 1.0)).sum(dim=0) *
                                     (high - low) * fraction * (1.0 - fraction))
        return {
            "td_loss": errors.square().mean(dim=1).sum(),
            "expectile_loss": (expectiles * advantages.square()).mean(),
            "policy_loss": -(weights * log_probs).mean(),
            "mean_q": q_values.mean(),
            "mean_v": values.mean(),
            "mean_weight": weights.mean(),
        }

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start from an earlier run's policy (a continuous BC clone, a SAC or TD3+BC policy): its matching
        weights; the critics and V, trained from scratch, read observations with its statistics."""
        load_matching_weights(self.network, state, self.critic, self.critic_target, self.value_network)
