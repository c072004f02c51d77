"""TD3+BC (Fujimoto & Gu, 2021): TD3 on logged transitions, its actor held near the data by a cloning term.

The policy is deterministic, ``pi(s) = centre + half_width * tanh(u(s))``
(:class:`~mazerun.nn.models.TanhPolicy`); the targets are smoothed in the unit box [-1, 1]:

    a'       = clip(tanh(u'(s')) + clip(sigma * eps, -c, c), -1, 1),  eps ~ N(0, I)   (target policy smoothing)
    y        = r + gamma * (1 - done) * min_j Q'_j(s', a')
    L_critic = sum_j E[(Q_j(s, a) - y)^2]                                                (every update)
    lambda   = alpha / E[|Q_1(s, pi(s))|]                                               (held fixed)
    L_actor  = -lambda * E[Q_1(s, pi(s))] + E[(pi(s) - a)^2]                            (every second update)

and after each actor step the actor's and the critics' targets move ``tau`` of the way to them.
Dividing by the mean ``|Q|`` makes the Q term's scale independent of the rewards', so one
``alpha`` (2.5) weighs it against the cloning term on every task; ``alpha = 0`` is plain
cloning. Observations are standardised with the data's statistics, as the paper does (the
offline loop sets them). ``sigma``, ``c``, ``alpha``, ``tau``, ``gamma``, the learning rate and
the batch size are the paper's.

With ``fused`` (MLPs on vector observations) both losses' gradients are written by hand on the stacks
of :mod:`mazerun.fast.stacked_box` (:meth:`TD3BC.fused_gradient`, :meth:`TD3BC.fused_actor_gradient`); the
offline loop holds them to autograd of :meth:`TD3BC.losses` and :meth:`TD3BC.actor_loss` on the first batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import torch

from mazerun.algorithms.base import (
    OfflineAlgorithm,
    OfflineConfig,
    check_box_actions,
    check_matmul_dtype,
    check_polyak_tau,
    frozen_copy,
    load_matching_weights,
    product_dtype,
    require_stack,
    standard_normal,
    update_target,
)
from mazerun.algorithms.protocol import AlgorithmSpec, UpdatePhase
from mazerun.config.schemas import check_fields
from mazerun.data.tensors import TransitionBatch
from mazerun.fast.optim import Adam
from mazerun.fast.stacked_box import StackedActor, StackedTwinQ, stackable

ACTOR_EVERY = 2
"""TD3's delayed policy update: the actor and the targets move on every second update."""


@dataclass
class TD3BCConfig(OfflineConfig):
    """TD3+BC's settings; the defaults are the paper's (1M updates on D4RL, evaluated every 5,000).

    run -cn conf_train algorithm=td3_bc runner.dataset.dir_or_file=<continuous records>
    """

    name: str = "td3_bc"
    n_updates: int = 1_000_000
    eval_every: int = 5000
    gamma: float = 0.99
    """Discount of the TD targets."""
    tau: float = 0.005
    """Share of the way the targets move to the online networks after each actor step."""
    alpha: float = 2.5
    """Weight of the normalised Q term against the cloning term; 0 is plain cloning."""
    policy_noise: float = 0.2
    """Std of the noise on the target policy's actions, in the unit box [-1, 1]."""
    noise_clip: float = 0.5
    """That noise is clipped to +-this."""
    fused: bool = True
    """MLPs on vector observations: both critics evaluated as one (mazerun.fast.stacked_box), with hand-written
    gradients of the same losses, checked against autograd on the first batch; false: the plain autograd path."""
    matmul_dtype: str = "auto"
    """float32, or bfloat16: the fused step's hidden layers multiply in bfloat16 with float32 accumulation
    (mazerun.fast.fused.LowPrecisionMLP); weights, gradients, Adam and checkpoints stay float32. Needs the fused
    step, and a CPU with AVX512-BF16 or AMX to be faster (many times slower without; a warning says so).
    auto: bfloat16 on such a CPU, float32 elsewhere (run.log says which)."""

    def check(self, prefix: str = "algorithm") -> None:
        super().check(prefix)
        check_fields(self, prefix, unit_interval=("gamma",), non_negative=("alpha", "policy_noise", "noise_clip"))
        check_polyak_tau(self.tau, prefix)
        check_matmul_dtype(self, prefix)

    def check_spaces(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        check_box_actions(self.name, action_space)

    def model_activation(self, action_space: gym.Space) -> str:
        """The MLP activation where the model config leaves it unset (``model=auto``): ReLU, as the paper's, d3rlpy's
        and CORL's."""
        return "relu"


def smoothed_target_actions(squashed: torch.Tensor, noise: torch.Tensor, policy_noise: float,
                            noise_clip: float) -> torch.Tensor:
    """``clip(a + clip(sigma * eps, -c, c), -1, 1)``: the target policy's actions in the unit box, smoothed by the
    standard normal draws ``noise``."""
    return (squashed + (policy_noise * noise).clamp(-noise_clip, noise_clip)).clamp(-1.0, 1.0)


def normalized_q_term(q_values: torch.Tensor, alpha: float) -> torch.Tensor:
    """``-lambda * E[Q]`` with ``lambda = alpha / E[|Q|]`` held fixed: the actor's Q term, free of the rewards'
    scale."""
    return -(alpha / q_values.abs().mean().detach()) * q_values.mean()


class TD3BC(OfflineAlgorithm):
    """The TD3+BC learner: the deterministic policy that acts, two critics, and a target of each.

    ``generator`` (the offline loop's sampler's) draws the target smoothing noise; the loop saves its
    state, so a continued run draws what the uninterrupted one would.
    """

    network_type = "tanh_deterministic"
    starts_from = ("actor_critic", "squashed_gaussian")
    phases = (UpdatePhase("losses", "critic_optimizer"), UpdatePhase("actor_loss", "actor_optimizer", ACTOR_EVERY))
    target_networks = {"actor_target": "network", "critic_target": "critic"}
    fused_phases = {"losses": "fused_gradient", "actor_loss": "fused_actor_gradient"}

    def __init__(self, config: TD3BCConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.network = spec.tanh_policy()
        self.actor_target = frozen_copy(self.network)
        self.critic = spec.twin_q_network()
        self.critic_target = frozen_copy(self.critic)
        self.stack = require_stack(self.build_stack(), config) if config.fused else None
        self.critic_optimizer = Adam(self.critic.parameters(), lr=config.lr)
        self.actor_optimizer = Adam(self.network.parameters(), lr=config.lr)

    def losses(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The critics' loss."""
        config = self.config
        with torch.no_grad():
            squashed = self.actor_target(batch.next_observations)
            noise = standard_normal(squashed.shape, self.generator, squashed.device)
            next_actions = self.actor_target.to_env(smoothed_target_actions(squashed, noise, config.policy_noise,
                                                                            config.noise_clip))
            next_q = self.critic_target(batch.next_observations, next_actions).min(dim=0).values
            targets = batch.rewards + config.gamma * (1.0 - batch.dones) * next_q
        q_values = self.critic(batch.observations, batch.actions)
        loss = (q_values - targets).square().mean(dim=1).sum()
        return loss, {"critic_loss": loss.detach(), "mean_q": q_values.detach().mean()}

    def actor_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        actions = self.network.to_env(self.network(batch.observations))
        q_term = normalized_q_term(self.critic(batch.observations, actions)[0], self.config.alpha)
        cloning = (actions - batch.actions).square().mean()
        return q_term + cloning, {"q_term": q_term.detach(), "cloning_loss": cloning.detach()}

    def build_stack(self) -> tuple[StackedTwinQ, StackedActor] | None:
        """The critics with their targets, and the policy with its target, in stacked storage (MLPs only)."""
        if not stackable(self.network, self.critic):
            return None
        dtype = product_dtype(self.config)
        return (StackedTwinQ(self.critic, self.critic_target, dtype),
                StackedActor(self.network, self.actor_target, matmul_dtype=dtype))

    def fused_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """:meth:`losses`' gradient by hand: ``d L_critic / d Q_j = 2 (Q_j - y) / B``, through both critics at once."""
        config, (critics, actor) = self.config, self.stack
        critics.load(batch.observations, batch.next_observations)
        actor.load(batch.observations, batch.next_observations)
        squashed = torch.tanh(actor.heads(next_states=True))
        noise = standard_normal(squashed.shape, self.generator, squashed.device)
        next_actions = self.actor_target.to_env(smoothed_target_actions(squashed, noise, config.policy_noise,
                                                                        config.noise_clip))
        next_q = critics.target_q_values(next_actions).min(dim=0).values
        targets = batch.rewards + config.gamma * (1.0 - batch.dones) * next_q
        q_values = critics.q_values(batch.actions)
        errors = q_values - targets
        critics.critic_backward(errors * (2.0 / q_values.shape[1]))
        return {"critic_loss": errors.square().mean(dim=1).sum(), "mean_q": q_values.mean()}

    def fused_actor_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """:meth:`actor_loss`' gradient by hand. With ``t = tanh(u)``, ``a = centre + h * t`` and ``lambda`` fixed:

            d L / d a = -lambda / B * d Q_1(s, a) / d a + 2 (a - a_data) / (B * dim(A))
            d L / d u = d L / d a * h * (1 - t^2)

        the first term through the first critic's action inputs alone (its weights are not trained here)."""
        critics, actor = self.stack
        critics.load(batch.observations)
        actor.load(batch.observations)
        squashed = torch.tanh(actor.heads())
        actions = self.network.to_env(squashed)
        q_values = critics.first_q_values(actions)
        scale = self.config.alpha / q_values.abs().mean()
        errors = actions - batch.actions
        action_grad = critics.first_action_gradient((-scale / len(q_values)).expand_as(q_values))
        action_grad += (2.0 / errors.numel()) * errors
        half_width = (self.network.action_high - self.network.action_low) / 2
        actor.backward(action_grad * half_width * (1.0 - squashed.square()))
        return {"q_term": -scale * q_values.mean(), "cloning_loss": errors.square().mean()}

    def after_step(self) -> None:
        """The targets follow right after each actor step (updates 0, 2, 4, ... counted from 0)."""
        if (self.updates - 1) % ACTOR_EVERY == 0:
            for target, online in self.target_networks.items():
                update_target(getattr(self, target), getattr(self, online), self.config.tau)

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start from an earlier run's policy (a BC clone, a SAC policy, a TD3+BC run's own): its matching weights."""
        load_matching_weights(self.network, state, self.critic, self.critic_target)
        self.actor_target.load_state_dict(self.network.state_dict())


Config = TD3BCConfig
Algorithm = TD3BC
