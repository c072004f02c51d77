"""Implicit Q-learning for discrete actions: value learning that never queries an unseen action.

    expectile_loss = E_D [ |tau - 1(u < 0)| * u^2 ],   u = Q_target(s, a) - V(s),  tau = expectile
    td_loss        = E_D [ (Q(s, a) - (r + gamma * (1 - done) * V(s')))^2 ]
    policy_loss    = -E_D [ min(exp(beta * (Q_target(s, a) - V(s))), max_weight) * log pi(a | s) ]

With ``expectile > 0.5`` V(s) estimates an upper expectile of Q over the recorded actions, i.e.
the value of the better actions the data took, without the max over all actions that makes
offline Q-learning over-estimate. Q then backs that value up through r + gamma * V(s'), and the
policy clones the recorded actions weighted by their advantage (advantage-weighted regression),
so better-than-average actions count more and bad ones (the noise in an epsilon-greedy dataset)
fade out. Weights and targets are constants (no gradient): the three losses train three
disjoint sets of parameters, so one Adam step on their sum equals three separate steps.

One Q-network with a Polyak-averaged target (tau = 0.005 every update by default) rather than
twin Qs: the expectile already keeps V inside the data's support, so a second Q adds a forward
and backward pass per update for little. Q and V live only in the algorithm; the checkpoint
holds the policy as the same :class:`~mazerun.nn.models.ActorCritic` BC trains
(``network_type = "actor_critic"``), so ``run algorithm=ppo input_dir=<iql run>`` fine-tunes it.

For a 1-D Box of actions ``algorithm=iql`` builds :mod:`mazerun.algorithms.iql_continuous` instead
(:class:`~mazerun.algorithms.base.BoxVariant`), with the settings under ``box``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch.distributions import Distribution

from mazerun.algorithms.base import (
    Batch,
    BoxVariant,
    OfflineAlgorithm,
    ValueLearningConfig,
    check_matmul_dtype,
    flat,
    flat_transitions,
    frozen_copy,
    warm_state,
)
from mazerun.algorithms.bc import policy_of
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.config.schemas import check_fields
from mazerun.core.errors import MazerunError
from mazerun.data.tensors import SequenceBatch
from mazerun.fast.optim import Adam
from mazerun.nn.models import IQL_LOG_STD_RANGE, ValueNetwork


@dataclass
class IQLBoxConfig:
    """Settings of IQL for 1-D Box actions (CORL's) whose defaults differ from the discrete variant's; every other
    key means the same for both."""

    beta: float = 3.0
    """Inverse temperature of the advantage weights for Box actions (CORL's, on MuJoCo)."""
    log_std_init: float = -1.5
    """Where the policy's log-std starts, strictly inside the [-5, 2] its sigmoid keeps it in (d3rlpy's start, a
    std of 0.22; CORL's 0 is a std of 1, which takes thousands of updates to come down): at 10k updates on our
    Hopper datasets (3 seeds, before the sigmoid), 946 against 700 on medium and 353 against 365 on medium-replay."""


@dataclass
class IQLConfig(ValueLearningConfig):
    fused_actions: ClassVar[tuple[str, ...]] = ("box",)

    name: str = "iql"
    n_updates: int = 20000
    eval_every: int = 2000
    tau: float = 0.005
    target_update_interval: int = 1
    expectile: float = 0.7
    """V regresses to this expectile of Q over the data's actions: 0.5 is the mean (SARSA), towards 1 the max."""
    beta: float = 0.3
    """Inverse temperature of the advantage weights: 0 is plain cloning, larger follows Q more greedily."""
    max_weight: float = 100.0
    """Cap of the advantage weights, so that a few transitions cannot dominate a batch."""
    fused: bool = True
    """1-D Box actions with MLPs on vector observations: the losses' gradient written by hand on stacked networks
    (mazerun.fast.stacked_box), checked against autograd on the first batch; false: the plain autograd path. The
    discrete variant has no hand-written step."""
    matmul_dtype: str = "auto"
    """float32, or bfloat16 (1-D Box actions): the fused step's hidden layers multiply in bfloat16 with float32
    accumulation (mazerun.fast.fused.LowPrecisionMLP); weights, gradients, Adam and checkpoints stay float32. Needs
    the fused step, and a CPU with AVX512-BF16 or AMX to be faster (many times slower without; a warning says so).
    auto: bfloat16 for 1-D Box actions on such a CPU, float32 elsewhere (run.log says which)."""
    box: IQLBoxConfig = field(default_factory=IQLBoxConfig)
    """1-D Box actions (mazerun.algorithms.iql_continuous): the settings whose defaults differ from the discrete
    ones (beta above is the discrete variant's only); every other key applies to both."""

    def check(self, prefix: str = "algorithm") -> None:
        super().check(prefix)
        check_fields(self, prefix, positive=("beta", "max_weight"))
        check_fields(self.box, f"{prefix}.box", positive=("beta",))
        check_matmul_dtype(self, prefix)
        low, high = IQL_LOG_STD_RANGE
        if not low < self.box.log_std_init < high:
            raise MazerunError(f"{prefix}.box.log_std_init={self.box.log_std_init} must lie strictly inside "
                               f"({low:g}, {high:g}), the range the policy's sigmoid keeps its log-std in")
        if not 0.0 < self.expectile < 1.0:
            raise MazerunError(
                f"{prefix}.expectile={self.expectile} must lie in (0, 1): 0.5 regresses V to the mean of Q, "
                "0.7-0.9 towards the best recorded actions"
            )


def expectile_loss(differences: torch.Tensor, expectile: float) -> torch.Tensor:
    """``mean(|expectile - 1(u < 0)| * u^2)`` of ``u = Q(s, a) - V(s)``: an asymmetric squared error."""
    weights = torch.where(differences < 0, 1.0 - expectile, expectile)
    return (weights * differences.square()).mean()


def advantage_weights(advantages: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """``min(exp(beta * A), max_weight)``, capped in log space so that no weight overflows to inf."""
    return torch.exp((beta * advantages).clamp(max=math.log(max_weight)))


def weighted_log_likelihood_loss(distribution: Distribution, actions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``-mean(weight * log pi(a | s))``: behavioural cloning with a weight per transition."""
    return -(weights * distribution.log_prob(actions)).mean()


class Estimates(NamedTuple):
    """What IQL's losses read, per transition."""

    target_q: torch.Tensor
    """``Q_target(s, .)``, ``(N, A)``, no gradient."""
    values: torch.Tensor
    """``V(s)``, ``(N,)``."""
    next_values: torch.Tensor
    """``V(s')``, ``(N,)``, no gradient."""
    q: torch.Tensor
    """``Q(s, .)``, ``(N, A)``."""
    policy: Distribution
    """``pi(. | s)`` over the N transitions."""


class ImplicitQLearning(BoxVariant, OfflineAlgorithm):
    network_type = "actor_critic"
    starts_from = ("tanh_mean_gaussian", "squashed_gaussian", "tanh_deterministic")
    box_variant = "mazerun.algorithms.iql_continuous:ContinuousImplicitQLearning"
    target_networks = {"target_q_network": "q_network"}

    def __init__(self, config: IQLConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.network = spec.actor_critic()
        self.q_network = spec.q_network()
        self.target_q_network = frozen_copy(self.q_network)
        self.value_network = ValueNetwork(spec.model_config, spec.observation_space, spec.vocabulary).to(spec.device)
        # The policy's own critic stays untouched (as in BC) until PPO trains it.
        parameters = [*self.network.actor_parameters(), *self.q_network.parameters(), *self.value_network.parameters()]
        self.optimizer = Adam(parameters, lr=config.lr)

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start the policy from an earlier run; Q and V, trained from scratch, take its observation statistics."""
        super().load_network_state(state)
        encoder = self.network.actor_encoder
        if encoder.kind == "vector_obs":
            for network in (self.q_network, self.target_q_network, self.value_network):
                network.set_normalization(encoder.obs_mean, encoder.obs_std)

    def losses(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = self.config
        data = flat_transitions(batch)
        actions = data.actions.unsqueeze(1)
        estimates = self.estimates(batch)
        with torch.no_grad():
            target_q = estimates.target_q.gather(1, actions).squeeze(1)
            q_targets = data.rewards + config.gamma * (1.0 - data.dones) * estimates.next_values

        values = estimates.values
        value_loss = expectile_loss(target_q - values, config.expectile)

        q_data = estimates.q.gather(1, actions).squeeze(1)
        td_loss = F.mse_loss(q_data, q_targets)

        weights = advantage_weights((target_q - values).detach(), config.beta, config.max_weight)
        policy_loss = weighted_log_likelihood_loss(estimates.policy, data.actions, weights)

        loss = value_loss + td_loss + policy_loss
        metrics = {
            "td_loss": td_loss.detach(),
            "expectile_loss": value_loss.detach(),
            "policy_loss": policy_loss.detach(),
            "mean_q": q_data.detach().mean(),
            "mean_v": values.detach().mean(),
            "mean_weight": weights.mean(),
        }
        return loss, metrics

    def estimates(self, batch: Batch) -> Estimates:
        """Every network's reading of the batch's transitions, flat ``(N, ...)`` (sequences with memory)."""
        target_q_network = self.target_q_network
        if not isinstance(batch, SequenceBatch):
            with torch.no_grad():
                target_q = target_q_network(batch.observations)
                next_values = self.value_network(batch.next_observations)
            return Estimates(target_q, self.value_network(batch.observations), next_values,
                             self.q_network(batch.observations), self.network.distribution(batch.observations))
        size = batch.actions.shape[1]

        def run(sequence_fn: Any, state_size: int) -> tuple[torch.Tensor, torch.Tensor]:
            return sequence_fn(batch.observations, batch.starts, warm_state(sequence_fn, batch, size, state_size))

        with torch.no_grad():
            target_q, _ = run(target_q_network.q_sequence, target_q_network.state_size)
        values, value_states = run(self.value_network.v_sequence, self.value_network.state_size)
        with torch.no_grad():
            next_values = self.value_network.next_v(batch.next_observations, value_states)
        q, _ = run(self.q_network.q_sequence, self.q_network.state_size)
        return Estimates(flat(target_q), flat(values), flat(next_values), flat(q), policy_of(self.network, batch))



Config = IQLConfig
Algorithm = ImplicitQLearning
