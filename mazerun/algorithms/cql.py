"""Conservative Q-learning for discrete actions: double DQN plus a penalty on unseen actions.

    y        = r + gamma * (1 - done) * Q_target(s', argmax_a' Q(s', a'))        (double-DQN target)
    td_loss  = E_D [ huber(Q(s, a) - y) ]      (or the squared error, td_loss=mse)
    cql_loss = E_D [ logsumexp_a Q(s, a) - Q(s, a_data) ]
    loss     = td_loss + alpha * cql_loss

Plain Q-learning on logged data over-estimates actions the data never took (nothing corrects
them); the conservative term pushes every action's Q down (a soft maximum) and the recorded
action's back up, so the greedy policy stays close to what the data supports. ``alpha = 0`` is
double DQN. The term is at least 0 and equals ``log(n_actions)`` when all Q-values are equal.

The target network follows the online one as :func:`mazerun.algorithms.base.follow_target`
says (hard copy every ``target_update_interval`` updates by default). The acting network is the
:class:`~mazerun.nn.models.QNetwork` (``network_type = "q_network"``), greedy in Q at test time.

For a 1-D Box of actions ``algorithm=cql`` builds :mod:`mazerun.algorithms.cql_continuous` instead
(:class:`~mazerun.algorithms.base.BoxVariant`), with the settings under ``box``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F

from mazerun.algorithms.base import (
    Batch,
    BoxVariant,
    OfflineAlgorithm,
    ValueLearningConfig,
    check_matmul_dtype,
    check_polyak_tau,
    flat,
    flat_transitions,
    frozen_copy,
    product_dtype,
    require_stack,
    warm_state,
)
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.config.schemas import check_fields
from mazerun.core.errors import MazerunError
from mazerun.data.tensors import SequenceBatch, TransitionBatch
from mazerun.fast.fused import HeadGradient, StackedQLearner
from mazerun.fast.optim import Adam

TD_LOSSES = ("huber", "mse")


@dataclass
class CQLBoxConfig:
    """Settings of CQL for 1-D Box actions (d3rlpy's defaults) that the discrete variant has not, or whose defaults
    differ from its; ``lr`` (the critics'), ``gamma``, ``batch_size``, ``fused`` and ``matmul_dtype`` mean the same
    for both, and the discrete variant's ``tau``, ``target_update_interval`` and ``td_loss`` do not apply."""

    alpha: float = 5.0
    """Weight of the conservative term (d3rlpy's conservative_weight), times the learned multiplier below; 0 is SAC
    without the entropy backup."""
    multiplier_lr: float = 1e-4
    """Adam's learning rate of ``log`` of the multiplier of ``alpha`` (d3rlpy's alpha_learning_rate; it starts at
    1): the multiplier grows while the critics' conservative gap exceeds ``gap_threshold`` and shrinks while it
    stays below, the Lagrangian form of CQL. 0 holds it at 1 (a fixed weight)."""
    gap_threshold: float = 10.0
    """The conservative gap the multiplier steers towards (d3rlpy's alpha_threshold)."""
    actor_lr: float = 1e-4
    """Adam's learning rate of the policy and of its entropy temperature."""
    tau: float = 0.005
    """Share of the way the target critics move to the online ones after every update."""
    n_action_samples: int = 10
    """Actions per state drawn from each of the three proposals of the conservative term's log-sum-exp."""


@dataclass
class CQLConfig(ValueLearningConfig):
    fused_actions: ClassVar[tuple[str, ...]] = ("discrete", "box")

    name: str = "cql"
    n_updates: int = 20000
    eval_every: int = 2000
    alpha: float = 1.5
    """Weight of the conservative term; 0 is plain double DQN. 1.5 rather than the usual 1: on LunarLander's
    noisy heuristic data (bench/offline.py) 1 let one run in six at 2,000 updates learn to hover (greedy
    return -40), 2 cost about 15 return at 20,000 updates, 1.5 did neither (12 seeds at 2k, 2 at 20k)."""
    td_loss: str = "huber"
    """huber (robust to the large rewards of crashes and landings) or mse."""
    fused: bool = True
    """An MLP on vector observations learns through :class:`mazerun.fast.fused.StackedQLearner` (the same
    loss and Adam, the gradient by hand: :func:`conservative_q_gradient`; 1-D Box actions: the critics' step on
    mazerun.fast.stacked_box), checked against autograd on the first batch; false: the autograd path."""
    matmul_dtype: str = "auto"
    """float32, or bfloat16: the fused step's hidden layers multiply in bfloat16 with float32 accumulation
    (:class:`mazerun.fast.fused.LowPrecisionMLP`), 2-4x faster on CPUs with AVX512-BF16 or AMX, about 20x
    slower on those without (a warning says so); weights, gradients, Adam, evaluation and checkpoints
    stay float32. Needs the fused step. auto: bfloat16 for 1-D Box actions on a CPU with AVX512-BF16 or AMX,
    float32 elsewhere and for discrete actions (run.log says which)."""
    box: CQLBoxConfig = field(default_factory=CQLBoxConfig)
    """1-D Box actions (mazerun.algorithms.cql_continuous): the settings that differ from the discrete ones;
    alpha, tau, target_update_interval and td_loss above are the discrete variant's only."""

    def check(self, prefix: str = "algorithm") -> None:
        super().check(prefix)
        check_fields(self.box, f"{prefix}.box", positive=("actor_lr", "n_action_samples"),
                     non_negative=("alpha", "multiplier_lr"))
        check_polyak_tau(self.box.tau, f"{prefix}.box")
        if not math.isfinite(self.box.gap_threshold):
            raise MazerunError(f"{prefix}.box.gap_threshold={self.box.gap_threshold} must be a finite number "
                               "(d3rlpy's alpha_threshold is 10)")
        if self.alpha < 0:
            raise MazerunError(f"{prefix}.alpha={self.alpha} must be >= 0 (0 is double DQN without the conservative term)")
        if self.td_loss not in TD_LOSSES:
            raise MazerunError(f"{prefix}.td_loss={self.td_loss!r} is unknown; use {' or '.join(TD_LOSSES)}")
        check_matmul_dtype(self, prefix)


def double_dqn_target(
    next_q_online: torch.Tensor, next_q_target: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``r + gamma * (1 - done) * Q_target(s', argmax_a Q_online(s', a))`` from the ``(B, A)`` Q-values of s'.

    Choosing with one network and valuing with the other removes most of the max operator's bias.
    """
    next_actions = next_q_online.argmax(dim=1, keepdim=True)
    next_values = next_q_target.gather(1, next_actions).squeeze(1)
    return rewards + gamma * (1.0 - dones) * next_values


def td_error_loss(q_data: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean Huber (delta 1) or squared error between Q(s, a_data) and its TD targets."""
    if kind == "huber":
        return F.huber_loss(q_data, targets)
    return F.mse_loss(q_data, targets)


def conservative_loss(q_values: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``mean(logsumexp_a Q(s, a) - Q(s, a_data))`` from Q-values ``(B, A)`` and data actions ``(B,)``."""
    q_data = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
    return (torch.logsumexp(q_values, dim=1) - q_data).mean()


def conservative_q_gradient(
    q_values: torch.Tensor, next_online: torch.Tensor, next_target: torch.Tensor, out: torch.Tensor,
    actions: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, gamma: torch.Tensor | float,
    alpha: torch.Tensor | float, td_loss: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of :meth:`ConservativeQLearning.losses` for ``K`` agents at once, and its gradient by hand.

    Q-values are ``(K, B, A)``; actions, rewards and dones ``(K, B)``; ``gamma`` and ``alpha`` floats
    or ``(K, 1)``. With ``e = Q(s, a_data) - y`` (y held fixed), the TD loss gives ``d/dQ(s, a_data) =
    clamp(e, -1, 1) / B`` (Huber, delta 1) or ``2 e / B`` (squared error), and the conservative term
    ``d/dQ(s, .) = (softmax(Q(s, .)) - onehot(a_data)) / B``. Writes ``d loss / d Q(s, .)`` into ``out``;
    returns each agent's loss ``(K,)`` and its metrics.
    """
    rows = q_values.shape[1]
    next_values = next_target.gather(2, next_online.argmax(dim=2, keepdim=True)).squeeze(2)
    targets = rewards + gamma * (1.0 - dones) * next_values
    data_actions = actions.unsqueeze(2)
    q_data = q_values.gather(2, data_actions).squeeze(2)
    error = q_data - targets
    if td_loss == "huber":
        td = F.huber_loss(q_data, targets, reduction="none").mean(1, keepdim=True)
        data_grad = error.clamp(-1.0, 1.0).div_(rows)
    else:
        td = error.square().mean(1, keepdim=True)
        data_grad = error.mul(2.0 / rows)
    conservative = (torch.logsumexp(q_values, dim=2) - q_data).mean(1, keepdim=True)
    scale = alpha / rows
    torch.softmax(q_values, dim=2, out=out).mul_(scale)
    out.scatter_add_(2, data_actions, (data_grad - scale).unsqueeze(2))
    metrics = {"td_loss": td.squeeze(1), "conservative_loss": conservative.squeeze(1), "mean_q": q_data.mean(1)}
    return (td + alpha * conservative).squeeze(1), metrics


class ConservativeQLearning(BoxVariant, OfflineAlgorithm):
    network_type = "q_network"
    starts_from = ("squashed_gaussian", "tanh_deterministic")
    box_variant = "mazerun.algorithms.cql_continuous:ContinuousConservativeQLearning"
    target_networks = {"target_network": "network"}

    def __init__(self, config: CQLConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.network = spec.q_network()
        self.target_network = frozen_copy(self.network)
        self.stack = self.build_stack() if config.fused else None
        self.optimizer = Adam(self.network.parameters(), lr=config.lr)

    def build_stack(self) -> StackedQLearner | None:
        return require_stack(StackedQLearner.of_networks(self.network, self.target_network,
                                                         product_dtype(self.config)), self.config)

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_network_state(state)
        self.target_network.load_state_dict(state)

    def losses(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q_values, next_online, next_target = self.q_estimates(batch)
        data = flat_transitions(batch)
        targets = double_dqn_target(next_online, next_target, data.rewards, data.dones, self.config.gamma)
        q_data = q_values.gather(1, data.actions.unsqueeze(1)).squeeze(1)
        td_loss = td_error_loss(q_data, targets, self.config.td_loss)
        cql_loss = conservative_loss(q_values, data.actions)
        loss = td_loss + self.config.alpha * cql_loss
        metrics = {
            "td_loss": td_loss.detach(),
            "conservative_loss": cql_loss.detach(),
            "mean_q": q_data.detach().mean(),
        }
        return loss, metrics

    def fused_gradient(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        encoder = self.network.encoder
        stacked = TransitionBatch(*(None if field is None else field[None] for field in batch))
        _, metrics = self.stack.gradient(stacked.observations, stacked.next_observations, encoder.obs_mean,
                                         encoder.obs_std, self.head_gradient(stacked, self.config.gamma))
        return {name: value.squeeze(0) for name, value in metrics.items()}

    def head_gradient(self, batch: TransitionBatch, gamma: torch.Tensor | float) -> HeadGradient:
        """The :data:`~mazerun.fast.fused.HeadGradient` of the loss on a stacked ``(K, B, ...)`` batch, ``gamma`` a float
        or one per agent ``(K, 1)``: what :class:`~mazerun.fast.fused.StackedQLearner` calls, here and in a cohort."""
        config = self.config
        return partial(conservative_q_gradient, actions=batch.actions, rewards=batch.rewards, dones=batch.dones,
                       gamma=gamma, alpha=config.alpha, td_loss=config.td_loss)

    def q_estimates(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Q(s, .)`` of the online network, and ``Q(s', .)`` of the online and target networks (no gradient).

        With memory, Q of each next observation is read one step on from its transition's state.
        """
        online, target = self.network, self.target_network
        if not isinstance(batch, SequenceBatch):
            with torch.no_grad():
                next_online, next_target = online(batch.next_observations), target(batch.next_observations)
            return online(batch.observations), next_online, next_target
        size = batch.actions.shape[1]
        q_values, states = online.q_sequence(batch.observations, batch.starts,
                                             warm_state(online.q_sequence, batch, size, online.state_size))
        with torch.no_grad():
            _, target_states = target.q_sequence(batch.observations, batch.starts,
                                                 warm_state(target.q_sequence, batch, size, target.state_size))
            next_online = online.next_q(batch.next_observations, states)
            next_target = target.next_q(batch.next_observations, target_states)
        return flat(q_values), flat(next_online), flat(next_target)



Config = CQLConfig
Algorithm = ConservativeQLearning
