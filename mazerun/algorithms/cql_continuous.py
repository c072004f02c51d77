"""Conservative Q-learning, CQL(H), for 1-D Box actions (Kumar et al., 2020), with d3rlpy's defaults:
``algorithm=cql`` on an env with continuous actions (:class:`~mazerun.algorithms.base.BoxVariant`).

SAC's learner (:mod:`mazerun.algorithms.sac`: the squashed Gaussian policy, twin critics ``Q_1, Q_2``, their
Polyak-averaged targets, a learned temperature ``alpha``) on recorded transitions ``(s, a, r, s', done)``,
each critic's TD loss joined by a conservative term that pushes Q down on actions the data did not take:

    y          = r + gamma * (1 - done) * min_j Q'_j(s', a'),   a' ~ pi(. | s')     (no entropy term, as d3rlpy)
    sampled    = N actions of each proposal q, with their log-densities log q(.):
                   a_unif ~ U(box),       log q = log(1 / volume)
                   a_pi   ~ pi(. | s),    log q = log pi(a_pi | s)
                   a_pi'  ~ pi(. | s'),   log q = log pi(a_pi' | s')
    C_j        = E_s[ logsumexp_{3N sampled a} (Q_j(s, a) - log q(a))  -  Q_j(s, a_data) ]
    L_critic   = sum_j ( E[(Q_j(s, a) - y)^2] + lambda * alpha_cql * C_j )           (then a critic step)
    L_lambda   = -lambda * alpha_cql * (mean_j C_j - threshold),   lambda = exp(log lambda), from 1
    L_actor    = E[alpha * log pi(a~ | s) - min_j Q_j(s, a~)],   a~ ~ pi(. | s), reparameterised
    L_alpha    = -E[log alpha * (log pi(a~ | s) + target_entropy)],   target_entropy = -dim(A)
    Q'_j      <- tau * Q_j + (1 - tau) * Q'_j                                         (after every update)

The backup samples ``a'`` where d3rlpy values the policy's squashed mean (its default, ``soft_q_backup`` and
``max_q_backup`` off). d3rlpy's way, tried at 10k updates on our Hopper datasets (3 seeds, one thread), scored
945, 1,317 and 2,683 on ``medium`` against the sample's 2,474, 2,666 and 2,898 (d3rlpy 2,631, 2,796, 2,900), and
299 against 291 on ``medium-replay`` (d3rlpy 317): no better, so the sample stays.

``lambda`` is d3rlpy's Lagrange multiplier (its ``log_alpha``): after the critics' backward, one Adam step of
``box.multiplier_lr`` on ``log lambda`` with the gap just measured raises it while the gap exceeds
``box.gap_threshold`` and lowers it below, so the penalty weakens once the critics are conservative enough.
d3rlpy steps it just before the critic loss reads it; here the critic loss reads the value before that step,
one update's lag of a scalar that moves about ``multiplier_lr`` per update.

The log-sum-exp is an importance-sampled estimate of ``log integral exp Q_j(s, a) da``, the soft maximum of
Q over all actions, so ``C_j`` is the discrete term ``logsumexp_a Q(s, a) - Q(s, a_data)`` with the sum over
actions turned into an integral. Every density is measured in the unit box [-1, 1]^dim(A), where the policy's
log-probabilities live, so the uniform's volume is 2^dim(A); measuring them in the env's box instead would add
one constant to every term, which moves the loss but not its gradient. The sampled actions and their densities
are constants (d3rlpy draws them without gradient). ``alpha`` is held fixed in the critics' and the actor's
loss, as in SAC; the policy and ``log alpha`` share one Adam of ``box.actor_lr``.

Every draw (target actions, the 3N proposals, the actor's actions) comes from the loop's generator, which the
checkpoint keeps, so a continued run draws what the uninterrupted one would.

The critics' pass over ``3N + 1`` actions of every state is almost all of an update's cost. With ``fused`` (MLPs
on vector observations) that step runs on the stacked critics of :mod:`mazerun.fast.stacked_box`, one pass of
both critics over the data's and the sampled actions, with the loss's gradient in the Q-values written by hand
(:meth:`ContinuousConservativeQLearning.fused_gradient`). The actor's step is SAC's, by SAC's hand-written gradient
(:func:`~mazerun.algorithms.sac.soft_actor_gradient`) through the stacked policy and critics. ``matmul_dtype=bfloat16``
multiplies both steps' hidden layers in bfloat16. The offline loop holds both to autograd of
:meth:`ContinuousConservativeQLearning.losses` and :meth:`ContinuousConservativeQLearning.actor_loss` on the first
batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mazerun.algorithms.base import (
    OfflineAlgorithm,
    frozen_copy,
    load_matching_weights,
    product_dtype,
    require_stack,
    standard_normal,
    uniform_in_unit_box,
    update_target,
)
from mazerun.algorithms.cql import CQLConfig
from mazerun.algorithms.protocol import AlgorithmSpec, UpdatePhase
from mazerun.algorithms.sac import (
    Temperature,
    soft_actor_gradient,
    soft_actor_loss,
    temperature_gradient,
    temperature_loss,
)
from mazerun.data.tensors import TransitionBatch
from mazerun.fast.optim import Adam
from mazerun.fast.stacked_box import StackedActor, StackedTwinQ, stackable


def conservative_term(sampled_q: torch.Tensor, log_densities: torch.Tensor, data_q: torch.Tensor) -> torch.Tensor:
    """``sum_j E_s[logsumexp_k (Q_j(s, a_k) - log q(a_k)) - Q_j(s, a_data)]`` from the critics' values of the
    sampled actions ``(2, B, K)``, those actions' log-densities ``(B, K)`` and the critics' values of the data's
    actions ``(2, B)``."""
    return (torch.logsumexp(sampled_q - log_densities, dim=-1) - data_q).mean(dim=-1).sum()


def conservative_gradient(sampled_q: torch.Tensor, log_densities: torch.Tensor,
                          data_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`conservative_term` and its gradient in the sampled and the data's Q-values: the log-sum-exp's is its
    softmax, so with ``B`` states

        d C / d Q_j(s, a_k)    = softmax_k (Q_j(s, a_k) - log q(a_k)) / B
        d C / d Q_j(s, a_data) = -1 / B"""
    rows = data_q.shape[-1]
    return (conservative_term(sampled_q, log_densities, data_q),
            torch.softmax(sampled_q - log_densities, dim=-1) / rows, torch.full_like(data_q, -1.0 / rows))


class ContinuousConservativeQLearning(OfflineAlgorithm):
    """The CQL learner for Box actions: the squashed Gaussian policy that acts, two critics, their targets and the
    entropy temperature."""

    network_type = "squashed_gaussian"
    starts_from = ("tanh_deterministic",)
    phases = (UpdatePhase("losses", "critic_optimizer"), UpdatePhase("actor_loss", "actor_optimizer"))
    target_networks = {"critic_target": "critic"}
    fused_phases = {"losses": "fused_gradient", "actor_loss": "fused_actor_gradient"}

    def __init__(self, config: CQLConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.network = spec.squashed_gaussian_policy()
        self.critic = spec.twin_q_network()
        self.critic_target = frozen_copy(self.critic)
        self.temperature = Temperature(1.0, learned=True).to(spec.device)
        self.multiplier = Temperature(1.0, learned=config.box.multiplier_lr > 0).to(spec.device)
        """``lambda``, the conservative term's Lagrange multiplier (positive: kept as its log)."""
        action_dim = int(spec.action_space.shape[0])
        self.target_entropy = -float(action_dim)
        self.uniform_log_density = -action_dim * math.log(2.0)
        """``log(1 / volume)`` of the unit box [-1, 1]^dim(A), where the policy's densities are measured."""
        self.stack = require_stack(self.build_stack(), config) if config.fused else None
        self.critic_optimizer = Adam(self.critic.parameters(), lr=config.lr)
        self.actor_optimizer = Adam([*self.network.parameters(), self.temperature.log_alpha], lr=config.box.actor_lr)
        self.multiplier_optimizer = Adam([self.multiplier.log_alpha], lr=config.box.multiplier_lr)

    def policy_samples(self, observations: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` reparameterised actions of the policy per state, ``(n, B, A)``, and their log-probabilities
        ``(n, B)``, the noise drawn from the loop's generator."""
        mean, log_std = self.network.gaussian(observations)
        return self.network.squash(mean, log_std, standard_normal((n, *mean.shape), self.generator, mean.device))

    def losses(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The critics' loss: TD error and conservative term."""
        config, n = self.config, self.config.box.n_action_samples
        observations = batch.observations
        with torch.no_grad():
            next_actions, _ = self.policy_samples(batch.next_observations, 1)
            next_q = self.critic_target(batch.next_observations, next_actions[0]).min(dim=0).values
            targets = batch.rewards + config.gamma * (1.0 - batch.dones) * next_q
            sampled_actions, log_densities = self.proposals(batch, n)
        q_values = self.critic(observations, batch.actions)
        td_loss = (q_values - targets).square().mean(dim=1).sum()

        rows = observations.shape[0]
        repeated = observations.expand(3 * n, *observations.shape).reshape(3 * n * rows, *observations.shape[1:])
        sampled_q = self.critic(repeated, sampled_actions.reshape(3 * n * rows, -1)).view(2, 3 * n, rows)
        conservative = conservative_term(sampled_q.transpose(1, 2), log_densities.T, q_values)
        loss = td_loss + self.multiplier.alpha * config.box.alpha * conservative
        return loss, self.critic_metrics(td_loss.detach(), conservative.detach(), q_values.detach())

    def critic_metrics(self, td_loss: torch.Tensor, conservative: torch.Tensor,
                       q_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The critic step's metrics; ``conservative_gap`` (``mean_j C_j``) is what :meth:`after_backward` steps
        ``lambda`` on."""
        return {"td_loss": td_loss, "conservative_loss": conservative, "conservative_gap": conservative / len(q_values),
                "multiplier": self.multiplier.alpha, "mean_q": q_values.mean()}

    def multiplier_loss(self, gap: torch.Tensor) -> torch.Tensor:
        """``L_lambda`` of the critics' conservative gap ``mean_j C_j`` (held fixed)."""
        return -self.multiplier.log_alpha.exp() * self.config.box.alpha * (gap.detach() - self.config.box.gap_threshold)

    def after_backward(self, metrics: dict[str, torch.Tensor]) -> None:
        """After the critics' backward: one step of ``lambda`` on the gap their loss measured (none with
        ``box.multiplier_lr`` 0)."""
        if "conservative_gap" in metrics and self.multiplier.log_alpha.requires_grad:
            self.multiplier_optimizer.zero_grad()
            self.multiplier_loss(metrics["conservative_gap"]).backward()
            self.multiplier_optimizer.step()

    def proposals(self, batch: TransitionBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The conservative term's ``3n`` actions per state, ``(3n, B, A)``, and their log-densities ``(3n, B)``:
        uniform in the box, then the policy's at s, then the policy's at s'."""
        here, here_log_probs = self.policy_samples(batch.observations, n)
        there, there_log_probs = self.policy_samples(batch.next_observations, n)
        unit = uniform_in_unit_box(here.shape, self.generator, here.device)
        uniform_log_densities = torch.full_like(here_log_probs, self.uniform_log_density)
        return (torch.cat([self.network.to_env(unit), here, there]),
                torch.cat([uniform_log_densities, here_log_probs, there_log_probs]))

    def build_stack(self) -> tuple[StackedTwinQ, StackedActor] | None:
        """The critics with their targets, and the policy, in stacked storage (MLPs only)."""
        if not stackable(self.network, self.critic):
            return None
        dtype = product_dtype(self.config)
        return StackedTwinQ(self.critic, self.critic_target, dtype), StackedActor(self.network, matmul_dtype=dtype)

    def fused_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """:meth:`losses`' gradient by hand, from the same draws in the same order. Both critics value the data's
        action and the ``3n`` proposals of every state in one pass; with ``e_j = Q_j(s, a) - y``:

            d L / d Q_j(s, a_data) = (2 e_j - lambda * alpha_cql) / B
            d L / d Q_j(s, a_k)    = lambda * alpha_cql * softmax_k (Q_j(s, a_k) - log q(a_k)) / B"""
        config, critics, n = self.config, self.stack[0], self.config.box.n_action_samples
        observations, rows = batch.observations, batch.observations.shape[0]
        next_actions, _ = self.policy_samples(batch.next_observations, 1)
        critics.load(observations, batch.next_observations)
        next_q = critics.target_q_values(next_actions[0]).min(dim=0).values
        targets = batch.rewards + config.gamma * (1.0 - batch.dones) * next_q
        sampled_actions, log_densities = self.proposals(batch, n)
        critics.load(observations.repeat(3 * n + 1, 1))
        q = critics.q_values(torch.cat([batch.actions, sampled_actions.reshape(3 * n * rows, -1)]))
        q_values, sampled_q = q[:, :rows], q[:, rows:].view(2, 3 * n, rows).transpose(1, 2)
        errors = q_values - targets
        conservative, sampled_grad, data_grad = conservative_gradient(sampled_q, log_densities.T, q_values)
        alpha = self.multiplier.alpha * config.box.alpha
        q_grad = torch.cat([errors * (2.0 / rows) + alpha * data_grad,
                            (alpha * sampled_grad).transpose(1, 2).reshape(2, 3 * n * rows)], dim=1)
        critics.critic_backward(q_grad)
        return self.critic_metrics(errors.square().mean(dim=1).sum(), conservative, q_values)

    def actor_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SAC's actor loss and the temperature's."""
        actions, log_probs = self.policy_samples(batch.observations, 1)
        actions, log_probs = actions[0], log_probs[0]
        alpha = self.temperature.alpha
        actor_loss = soft_actor_loss(self.critic, batch.observations, actions, log_probs, alpha)
        alpha_loss = temperature_loss(self.temperature.log_alpha, log_probs, self.target_entropy)
        return actor_loss + alpha_loss, {"actor_loss": actor_loss.detach(), "entropy": -log_probs.detach().mean(),
                                         "alpha": alpha, "temperature_loss": alpha_loss.detach()}

    def fused_actor_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """:meth:`actor_loss`' gradient by hand, from the same draw: SAC's (:func:`soft_actor_gradient`) for the
        policy, through both critics' action inputs alone (their weights are not trained here), and
        ``d L_alpha / d log alpha = -E[log pi(a~ | s) + target_entropy]``."""
        critics, actor = self.stack
        critics.load(batch.observations)
        actor.load(batch.observations)
        mean, raw_log_std = actor.gaussian()
        noise = standard_normal((1, *mean.shape), self.generator, mean.device)[0]
        alpha = self.temperature.alpha
        actor_loss, log_probs, mean_grad, log_std_grad = soft_actor_gradient(
            self.network, mean, raw_log_std, noise, critics.q_values, critics.action_gradient, alpha)
        actor.backward(mean_grad, log_std_grad)
        log_alpha = self.temperature.log_alpha
        log_alpha.grad = temperature_gradient(log_probs, self.target_entropy)
        return {"actor_loss": actor_loss, "entropy": -log_probs.mean(), "alpha": alpha,
                "temperature_loss": temperature_loss(log_alpha.detach(), log_probs, self.target_entropy)}

    def before_step(self, optimizer: Adam) -> None:
        """A linear schedule decays each optimiser from its own learning rate (the actor's and the critics'
        differ)."""
        if self.config.lr_schedule != "constant":
            start = self.config.lr if optimizer is self.critic_optimizer else self.config.box.actor_lr
            for group in optimizer.param_groups:
                group["lr"] = start * self.lr_schedule(self.updates) / self.config.lr

    def after_step(self) -> None:
        """The target critics follow after every update, by ``box.tau``."""
        update_target(self.critic_target, self.critic, self.config.box.tau)

    def load_training_state(self, state: dict[str, Any], progress: int | None = None) -> None:
        """A run saved before ``lambda`` was learned goes on from ``lambda`` = 1, where its fixed weight stood."""
        fresh = {"multiplier": self.multiplier.state_dict(),
                 "multiplier_optimizer": self.multiplier_optimizer.state_dict()}
        super().load_training_state({**fresh, **state}, progress)

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start from an earlier run's policy (a SAC policy, a TD3+BC one): its matching weights."""
        load_matching_weights(self.network, state, self.critic, self.critic_target)
