"""Soft Actor-Critic (Haarnoja et al., 2018) with twin critics and a learned entropy temperature, SB3's defaults.

The off-policy loop (:mod:`mazerun.training.loops.offpolicy`) steps ``runner.n_envs`` env copies
into a replay buffer and hands this algorithm batches of its transitions. The policy is a
Gaussian over ``u`` squashed into the action box (:class:`~mazerun.nn.models.SquashedGaussianPolicy`):

    u = mu(s) + sigma(s) * eps,  eps ~ N(0, I)        a = centre + half_width * tanh(u)
    log pi(a | s) = log N(u; mu(s), sigma(s)) - sum_i log(1 - tanh(u_i)^2 + epsilon)      (epsilon = 1e-6, SB3's)

Each update takes, on one batch of transitions ``(s, a, r, s', terminated)``:

    y          = r + gamma * (1 - terminated) * (min_j Q'_j(s', a') - alpha * log pi(a' | s')),   a' ~ pi(. | s')
    L_critic   = 1/2 * sum_j E[(Q_j(s, a) - y)^2]                                 (then a critic step)
    L_actor    = E[alpha * log pi(a~ | s) - min_j Q_j(s, a~)],       a~ ~ pi(. | s), reparameterised
    L_alpha    = -E[log alpha * (log pi(a~ | s) + target_entropy)],     target_entropy = -dim(A)
    Q'_j      <- tau * Q_j + (1 - tau) * Q'_j                            (every target_update_interval updates)

``alpha`` is held fixed in the critic's and the actor's loss, and ``log pi`` in the temperature's,
so each loss moves only its own parameters. One Adam steps the actor and ``log alpha`` together:
Adam's step is per parameter, so that is SB3's two optimisers of equal settings, in one step, and
both losses see the alpha of before the step, as SB3's do. Alpha shrinks while the policy's
entropy is above the target and grows while it is below. ``terminated`` is 1 only where the
episode ended; an episode cut off by a time limit bootstraps from its final observation.

With ``fused`` (MLPs on vector observations) an update runs on the stacks of :mod:`mazerun.fast.stacked_box`
with the gradients of these losses written by hand (:func:`soft_q_gradient`, :func:`soft_actor_gradient`);
:meth:`SoftActorCritic.check_fast_path` holds them to autograd of the losses on a run's first batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import gymnasium as gym
import torch
from torch import nn

from mazerun.algorithms.base import (
    BatchAlgorithm,
    EnvStepBudget,
    check_box_actions,
    check_matmul_dtype,
    check_polyak_tau,
    float32_twin,
    frozen_copy,
    load_matching_weights,
    product_dtype,
    require_stack,
)
from mazerun.algorithms.protocol import AlgorithmSpec, UpdatePhase, gradient_mismatch, mismatch_line
from mazerun.config.schemas import check_fields
from mazerun.core.errors import MazerunError
from mazerun.data.replay import STORES
from mazerun.data.tensors import TransitionBatch
from mazerun.fast.fused import FlatAdam, bind
from mazerun.fast.optim import Adam
from mazerun.fast.stacked_box import StackedActor, StackedTwinQ, stackable
from mazerun.nn.models import LOG_STD_BOUNDS, squashed_log_prob

FAST_PATH_TOLERANCE = 1e-4
"""How far the hand-written gradients may stray from autograd's (:func:`gradient_mismatch`): float32 rounding."""


@dataclass
class SACConfig(EnvStepBudget):
    """SAC's settings; the defaults are Stable-Baselines3's.

    From scratch: run algorithm=sac env=Pendulum-v1 (one env copy, as SB3: conf/algorithm_runner/sac_runner.yaml);
    fine-tune a clone of Box actions: run algorithm=sac input_dir=outputs/<continuous bc run>;
    continue a SAC run: run algorithm=sac env=Pendulum-v1 input_dir=outputs/<sac run> (the same runner.n_envs;
    total_steps is the total). A clone lends its encoder, trunk and mean head; the std head and the critics start
    fresh. With gradient_steps=-1, any runner.n_envs takes one update per transition, as SB3's one copy.
    """

    loop: ClassVar[str] = "off_policy"

    name: str = "sac"
    """Which algorithm this section configures, as chosen by ``algorithm=<name>``."""
    total_steps: int = 1_000_000
    """Environment steps in total, over all envs; rounded up to a whole step of every env copy.
    A continued run trains up to this many (budgets are totals)."""
    buffer_size: int = 1_000_000
    """Transitions the replay buffer keeps (the oldest are overwritten)."""
    buffer_store: str = "auto"
    """Where the replay buffer lives: memory (on the training device), disk (memory-mapped files in
    <run dir>/replay_buffer/, removed when the run ends; CPU only) or auto (disk where it would take more than
    half of the memory available). last.pt holds the buffer either way, and a continued run may switch."""
    learning_starts: int = 100
    """Transitions collected with uniformly random actions before the first update."""
    batch_size: int = 256
    """Transitions per gradient step, drawn uniformly from the replay buffer."""
    lr: float = 3e-4
    """Adam's learning rate, for the critics, the actor and the temperature alike."""
    tau: float = 0.005
    """Share of the way the target critics move to the online ones at each target update (Polyak averaging)."""
    gamma: float = 0.99
    """Discount of the soft Q targets."""
    train_freq: int = 1
    """Steps of the vector env (each one step of every copy) between two trainings."""
    gradient_steps: int = -1
    """Gradient steps per training; -1 (SB3's meaning): one per transition collected since the last, train_freq x
    runner.n_envs, so every runner.n_envs takes as many updates per transition as SB3's one env copy."""
    ent_coef: str = "auto"
    """The entropy temperature alpha: auto (learned towards an entropy of -dim(A), from 1), auto_<start> (learned,
    from <start>, e.g. auto_0.1) or a number (fixed)."""
    target_update_interval: int = 1
    """Updates between two target updates."""
    log_prob_epsilon: float = 1e-6
    """Added inside the log of tanh's correction, log pi = log N(u) - sum log(1 - tanh(u)^2 + epsilon), as SB3's
    SAC does, so that an update is SB3's step for step; 0: the exact correction (d3rlpy's). They differ by about
    epsilon / (1 - tanh(u)^2): 1e-4 at |u| = 3, 1% past |u| of about 5.3; beyond about 7 epsilon caps the correction
    at log(epsilon) per dimension."""
    eval_every: int = 10_000
    """Environment steps between two reports (train metrics, an evaluation, last.pt with the replay buffer);
    the first evaluation is at step 0."""
    fused: bool = True
    """MLPs on vector observations: both critics evaluated as one (mazerun.fast.stacked_box), with hand-written
    gradients of the same losses, checked against autograd on the first batch; false: the plain autograd path."""
    matmul_dtype: str = "auto"
    """float32, or bfloat16: the fused step's hidden layers multiply in bfloat16 with float32 accumulation
    (mazerun.fast.fused.LowPrecisionMLP); weights, gradients, Adam, acting and checkpoints stay float32. Needs the
    fused step, and a CPU with AVX512-BF16 or AMX to be faster (many times slower without; a warning says so).
    auto: bfloat16 on such a CPU, float32 elsewhere (run.log says which)."""

    def model_activation(self, action_space: gym.Space) -> str:
        """The MLP activation where the model config leaves it unset (``model=auto``): ReLU, as SB3's SAC."""
        return "relu"

    def check(self, prefix: str = "algorithm") -> None:
        check_fields(self, prefix, positive=("total_steps", "buffer_size", "batch_size", "lr", "train_freq",
                                             "target_update_interval", "eval_every"),
                     non_negative=("learning_starts", "log_prob_epsilon"), unit_interval=("gamma",))
        if self.gradient_steps == 0 or self.gradient_steps < -1:
            raise MazerunError(f"{prefix}.gradient_steps={self.gradient_steps} must be > 0, or -1 for one per "
                               "transition collected")
        if self.buffer_store not in STORES:
            raise MazerunError(f"{prefix}.buffer_store={self.buffer_store!r} is unknown; use {' or '.join(STORES)}")
        check_polyak_tau(self.tau, prefix)
        check_matmul_dtype(self, prefix)
        temperature(self.ent_coef, prefix)

    def check_spaces(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        check_box_actions(self.name, action_space)


def temperature(ent_coef: str, prefix: str = "algorithm") -> tuple[float, bool]:
    """The alpha that ``ent_coef`` starts from, and whether it is learned."""
    learned = ent_coef == "auto" or ent_coef.startswith("auto_")
    start = "1.0" if ent_coef == "auto" else ent_coef.removeprefix("auto_")
    try:
        value = float(start)
    except ValueError:
        value = math.nan
    if not 0.0 < value < math.inf:
        raise MazerunError(f"{prefix}.ent_coef={ent_coef!r} is not auto, auto_<start> (e.g. auto_0.1) or a positive "
                           "number; use auto to learn the temperature")
    return value, learned


def soft_q_target(next_q: torch.Tensor, next_log_probs: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor,
                  gamma: float, alpha: torch.Tensor | float) -> torch.Tensor:
    """``y = r + gamma * (1 - done) * (min_j Q'_j(s', a') - alpha * log pi(a' | s'))`` from both target critics'
    ``(2, B)`` values of the next state and ``(B,)`` log-probabilities of the actions sampled there."""
    return rewards + gamma * (1.0 - dones) * (next_q.min(dim=0).values - alpha * next_log_probs)


def soft_actor_loss(critic: nn.Module, observations: torch.Tensor, actions: torch.Tensor, log_probs: torch.Tensor,
                    alpha: torch.Tensor | float) -> torch.Tensor:
    """``E[alpha * log pi(a~ | s) - min_j Q_j(s, a~)]`` for reparameterised actions ``a~`` of the policy."""
    return (alpha * log_probs - critic(observations, actions).min(dim=0).values).mean()


def temperature_loss(log_alpha: torch.Tensor, log_probs: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """``-E[log alpha * (log pi(a | s) + target_entropy)]``, the log-probabilities held fixed: its gradient in
    ``log alpha`` is the policy's entropy minus the target."""
    return -(log_alpha * (log_probs.detach() + target_entropy)).mean()


def temperature_gradient(log_probs: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """:func:`temperature_loss`' gradient in ``log alpha``, ``-E[log pi(a | s) + target_entropy]``: the policy's
    entropy minus the target."""
    return -(log_probs + target_entropy).mean()


def soft_q_gradient(q_values: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The critics' loss ``1/2 * sum_j E[(Q_j - y)^2]`` of their ``(2, B)`` values and its gradient in them,
    ``(Q_j - y) / B``."""
    errors = q_values - targets
    return 0.5 * errors.square().mean(dim=1).sum(), errors / q_values.shape[1]


def soft_actor_gradient(policy: nn.Module, mean: torch.Tensor, raw_log_std: torch.Tensor, noise: torch.Tensor,
                        q_of: Callable[[torch.Tensor], torch.Tensor],
                        action_gradient: Callable[[torch.Tensor], torch.Tensor], alpha: torch.Tensor,
                        epsilon: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`soft_actor_loss` of the squashed Gaussian (``mean``, log-std before its clamp) and its gradient in
    them, by hand; returns the loss, the log-probabilities, d loss / d mean and d loss / d the raw log-std.

    With ``u = mean + sigma * eps``, ``t = tanh(u)``, ``a = centre + h * t`` and ``c = alpha / B``,
    ``log pi = sum_i [log N(eps) - log sigma_i - log(1 - t_i^2 + epsilon)]``, so per row and action dimension:

        d L / d mean      = g_a * h * (1 - t^2) + 2 c t (1 - t^2) / (1 - t^2 + epsilon),
                            g_a = -1/B * d min_j Q_j(s, a) / d a
        d L / d log sigma = (d L / d mean) * sigma * eps - c       (0 where the clamp holds log sigma)

    (with ``epsilon`` 0 the correction's term is ``2 c t``, computed so where ``1 - t^2`` rounds to 0).

    ``q_of(actions)`` gives both critics' ``(2, B)`` values, ``action_gradient(d L / d Q)`` the ``(B, A)``
    gradient in the actions through them (the critic of the smaller value takes each row's)."""
    log_std = raw_log_std.clamp(*LOG_STD_BOUNDS)
    std = log_std.exp()
    pre_squash = mean + std * noise
    squashed = torch.tanh(pre_squash)
    log_probs = squashed_log_prob(mean, log_std, pre_squash, epsilon)
    min_q, chosen = q_of(policy.to_env(squashed)).min(dim=0)
    rows = len(mean)
    loss = (alpha * log_probs - min_q).mean()
    q_grad = torch.zeros(2, rows, device=mean.device).scatter_(0, chosen[None], -1.0 / rows)
    half_width = (policy.action_high - policy.action_low) / 2
    weight = alpha / rows
    tanh_slope = 1.0 - squashed.square()
    correction_grad = 2.0 * weight * squashed
    if epsilon > 0.0:
        correction_grad = correction_grad * tanh_slope / (tanh_slope + epsilon)
    mean_grad = action_gradient(q_grad) * half_width * tanh_slope + correction_grad
    in_bounds = (raw_log_std >= LOG_STD_BOUNDS[0]) & (raw_log_std <= LOG_STD_BOUNDS[1])
    log_std_grad = (mean_grad * std * noise - weight) * in_bounds
    return loss, log_probs, mean_grad, log_std_grad


class Temperature(nn.Module):
    """The entropy weight alpha, kept as ``log alpha`` so that it stays positive; learned or fixed."""

    def __init__(self, alpha: float, learned: bool) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)), requires_grad=learned)

    @property
    def alpha(self) -> torch.Tensor:
        """Alpha, detached: the critic's and the actor's losses hold it fixed."""
        return self.log_alpha.detach().exp()


class SoftActorCritic(BatchAlgorithm):
    """The SAC learner: the squashed Gaussian policy that acts, two critics, their targets and the temperature.

    ``generator`` (the loop's) draws the policy's noise, so a continued run samples what the
    uninterrupted one would.
    """

    network_type = "squashed_gaussian"
    starts_from = ("actor_critic", "tanh_deterministic")
    phases = (UpdatePhase("critic_loss", "critic_optimizer"), UpdatePhase("actor_loss", "actor_optimizer"))
    target_networks = {"critic_target": "critic"}

    def __init__(self, config: SACConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.network = spec.squashed_gaussian_policy()
        self.critic = spec.twin_q_network()
        self.critic_target = frozen_copy(self.critic)
        self.temperature = Temperature(*temperature(config.ent_coef)).to(spec.device)
        self.target_entropy = -float(spec.action_space.shape[0])
        learned = [self.temperature.log_alpha] if self.temperature.log_alpha.requires_grad else []
        self.actor_parameters = [*self.network.parameters(), *learned]
        self.stacks: tuple[StackedTwinQ, StackedActor] | None = None
        """The fast path's networks (:mod:`mazerun.fast.stacked_box`): the critics, then the policy with ``log
        alpha`` (where it is learned) in the column after it; None: the autograd path."""
        self.log_alpha_grad: torch.Tensor | None = None
        if config.fused:
            self.build_stacks()
        if self.stacks is not None:
            critics, actor = self.stacks
            self.critic_optimizer: Adam | FlatAdam = FlatAdam(critics.critic.flat, critics.critic.flat_grad,
                                                              list(self.critic.parameters()), config.lr)
            self.actor_optimizer: Adam | FlatAdam = FlatAdam(actor.actor.flat, actor.actor.flat_grad,
                                                             self.actor_parameters, config.lr)
        else:
            self.critic_optimizer = Adam(self.critic.parameters(), lr=config.lr)
            self.actor_optimizer = Adam(self.actor_parameters, lr=config.lr)

    def build_stacks(self) -> None:
        """Move the critics, and the policy with ``log alpha`` where it is learned, into :attr:`stacks` (their
        hidden layers multiplying in ``matmul_dtype``); :attr:`stacks` stays None where they are not MLPs."""
        self.stacks, self.log_alpha_grad = None, None
        if not stackable(self.network, self.critic):
            require_stack(None, self.config)
            return
        dtype, log_alpha = product_dtype(self.config), self.temperature.log_alpha
        critics = StackedTwinQ(self.critic, self.critic_target, dtype)
        actor = StackedActor(self.network, extra=int(log_alpha.requires_grad), matmul_dtype=dtype)
        self.stacks = critics, actor
        if log_alpha.requires_grad:
            bind(log_alpha, actor.actor.flat[0, actor.extra_columns][0])
            self.log_alpha_grad = actor.actor.flat_grad[0, actor.extra_columns][0]

    def critic_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            next_actions, next_log_probs = self.network.sample(batch.next_observations, self.generator,
                                                                 self.config.log_prob_epsilon)
            next_q = self.critic_target(batch.next_observations, next_actions)
            targets = soft_q_target(next_q, next_log_probs, batch.rewards, batch.dones, self.config.gamma,
                                    self.temperature.alpha)
        q_values = self.critic(batch.observations, batch.actions)
        loss = 0.5 * (q_values - targets).square().mean(dim=1).sum()
        return loss, {"critic_loss": loss.detach(), "mean_q": q_values.detach().mean()}

    def actor_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        actions, log_probs = self.network.sample(batch.observations, self.generator, self.config.log_prob_epsilon)
        alpha = self.temperature.alpha
        actor_loss = soft_actor_loss(self.critic, batch.observations, actions, log_probs, alpha)
        metrics = {"actor_loss": actor_loss.detach(), "entropy": -log_probs.detach().mean(), "alpha": alpha}
        if not self.temperature.log_alpha.requires_grad:
            return actor_loss, metrics
        alpha_loss = temperature_loss(self.temperature.log_alpha, log_probs, self.target_entropy)
        return actor_loss + alpha_loss, {**metrics, "temperature_loss": alpha_loss.detach()}

    def update(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        if self.stacks is None:
            return super().update(batch)
        with torch.no_grad():
            self._load(batch)
            metrics = self._critic_gradient(batch)
            self.critic_optimizer.step()
            metrics.update(self._actor_gradient(batch))
            self.actor_optimizer.step()
            self.updates += 1
            if self.updates % self.config.target_update_interval == 0:
                self.stacks[0].follow(self.config.tau)
        return metrics

    def _load(self, batch: TransitionBatch) -> None:
        """Standardise the batch's observations once for every pass of an update."""
        critics, actor = self.stacks
        critics.load(batch.observations, batch.next_observations)
        actor.load(batch.observations, batch.next_observations)

    def _critic_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """:meth:`critic_loss`'s gradient into the stacked critics' ``flat_grad``, ``batch`` loaded; its metrics."""
        critics = self.stacks[0]
        mean, raw_log_std = self.stacks[1].gaussian(next_states=True)
        noise = torch.randn(mean.shape, generator=self.generator, device=mean.device, dtype=mean.dtype)
        next_actions, next_log_probs = self.network.squash(mean, raw_log_std.clamp(*LOG_STD_BOUNDS), noise,
                                                           self.config.log_prob_epsilon)
        targets = soft_q_target(critics.target_q_values(next_actions), next_log_probs,
                                batch.rewards, batch.dones, self.config.gamma, self.temperature.alpha)
        q_values = critics.q_values(batch.actions)
        loss, q_grad = soft_q_gradient(q_values, targets)
        critics.critic_backward(q_grad)
        return {"critic_loss": loss, "mean_q": q_values.mean()}

    def _actor_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """:meth:`actor_loss`'s gradient into the stacked actor's ``flat_grad`` (``log alpha``'s included), ``batch``
        loaded; its metrics."""
        critics, actor = self.stacks
        mean, raw_log_std = actor.gaussian()
        noise = torch.randn(mean.shape, generator=self.generator, device=mean.device, dtype=mean.dtype)
        alpha = self.temperature.alpha
        loss, log_probs, mean_grad, log_std_grad = soft_actor_gradient(
            self.network, mean, raw_log_std, noise, critics.q_values, critics.action_gradient,
            alpha, self.config.log_prob_epsilon)
        actor.backward(mean_grad, log_std_grad)
        metrics = {"actor_loss": loss, "entropy": -log_probs.mean(), "alpha": alpha}
        if self.log_alpha_grad is not None:
            log_alpha = self.temperature.log_alpha
            self.log_alpha_grad.copy_(temperature_gradient(log_probs, self.target_entropy))
            metrics["temperature_loss"] = temperature_loss(log_alpha.detach(), log_probs, self.target_entropy)
        return metrics

    def check_fast_path(self, batch: TransitionBatch) -> str | None:
        """Hold the hand-written gradients against autograd of :meth:`critic_loss` and :meth:`actor_loss` on
        ``batch`` (the run's first), both at the current weights, from the same noise; the generator is left
        where it was. If they differ, a loss was edited and its fast path was not: the stacks are dropped
        (the optimisers' states carry over), training follows the readable losses, and the line says so."""
        if self.stacks is None:
            return None
        if product_dtype(self.config) != torch.float32:
            twin = float32_twin(self)
            twin.build_stacks()
            problem = twin.check_fast_path(batch)
            if problem is not None:
                self.drop_stacks()
            return problem
        mismatch = gradient_mismatch(*self.fast_path_gradients(batch))
        if mismatch <= FAST_PATH_TOLERANCE:
            return None
        self.drop_stacks()
        return mismatch_line(self.config.name, "critic_loss() and actor_loss()", mismatch, FAST_PATH_TOLERANCE)

    def fast_path_gradients(self, batch: TransitionBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stacks' hand-written gradients of :meth:`critic_loss` and :meth:`actor_loss` and autograd's, parameter
        by parameter (the critics', then the actor's), at the current weights and from the same noise; the generator
        is left where it was."""
        critic_parameters = list(self.critic.parameters())
        drawn = self.generator_state()
        expected = [*torch.autograd.grad(self.critic_loss(batch)[0], critic_parameters),
                    *torch.autograd.grad(self.actor_loss(batch)[0], self.actor_parameters)]
        self.restore_generator(drawn)
        with torch.no_grad():
            self._load(batch)
            self._critic_gradient(batch)
            self._actor_gradient(batch)
        self.restore_generator(drawn)
        critics, actor = self.stacks
        fast = [flat_grad.as_strided(parameter.shape, parameter.stride(), parameter.storage_offset())
                for parameters, flat_grad in ((critic_parameters, critics.critic.flat_grad),
                                              (self.actor_parameters, actor.actor.flat_grad))
                for parameter in parameters]
        return fast, expected

    def drop_stacks(self) -> None:
        """Train on the readable losses from here: the stacks go, the optimisers' states carry over."""
        states = self.critic_optimizer.state_dict(), self.actor_optimizer.state_dict()
        self.stacks = None
        self.critic_optimizer = Adam(self.critic.parameters(), lr=self.config.lr)
        self.actor_optimizer = Adam(self.actor_parameters, lr=self.config.lr)
        self.critic_optimizer.load_state_dict(states[0])
        self.actor_optimizer.load_state_dict(states[1])

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start from an earlier run's policy (a BC clone, a TD3+BC policy, a SAC run's own): its matching weights.

        A clone's Gaussian mean becomes the mean of ``u`` before the tanh: where the clone's actions
        lie well inside the box they stay close, near its edges tanh bends them inwards.
        """
        load_matching_weights(self.network, state, self.critic, self.critic_target)

Config = SACConfig
Algorithm = SoftActorCritic
