"""What on-policy algorithms learn from: a rollout of the current policy, scored with generalised advantage estimation.

    delta_t = r_t + gamma * V(s_t+1) * (1 - done_t) - V(s_t)
    A_t     = delta_t + gamma * lambda * (1 - done_t) * A_t+1,          R_t = A_t + V(s_t)

The on-policy loop fills a :class:`RolloutBatch` and scores it with :func:`compute_gae`; any
on-policy algorithm (PPO, or a plugin's) reads the same batch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mazerun.nn.models import ModelInput


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_values: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (both ``(T, N)``) of ``T`` steps in ``N`` environments.

    ``dones[t]`` is 1 where an episode ended with step ``t`` (terminated or truncated; a
    truncated step's reward already holds its bootstrap), so nothing flows back across it.
    ``last_values`` are the values ``(N,)`` of the observations after the last step.
    """
    not_done = 1.0 - dones
    next_values = torch.cat([values[1:], last_values.unsqueeze(0)])
    deltas = rewards + gamma * next_values * not_done - values
    decay = gamma * gae_lambda * not_done
    advantages = torch.empty_like(rewards)
    advantage = torch.zeros_like(last_values)
    for t in reversed(range(len(rewards))):
        advantage = deltas[t] + decay[t] * advantage
        advantages[t] = advantage
    return advantages, advantages + values


class RolloutBatch(NamedTuple):
    """One rollout, everything the update needs.

    Flattened to ``n_steps * n_envs`` rows for a network without memory. With memory the fields
    keep their ``(n_steps, n_envs, ...)`` shape, ``starts`` marks the steps that begin an
    episode and ``initial_state`` is each env's state when the rollout began: minibatches are
    then whole env sequences, replayed from that state.
    """

    observations: ModelInput
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    starts: Optional[torch.Tensor] = None
    initial_state: Optional[torch.Tensor] = None


@torch.no_grad()
def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var[targets - predictions] / Var[targets]: 1 is a perfect critic, <= 0 no better than a constant."""
    variance = targets.var()
    if variance == 0:
        return float("nan")
    return float(1.0 - (targets - predictions).var() / variance)
