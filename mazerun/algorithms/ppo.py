"""Proximal Policy Optimisation with a clipped surrogate objective (Schulman et al., 2017).

Each iteration collects ``n_steps`` steps in each of ``n_envs`` environments
(:mod:`mazerun.training.loops.onpolicy`), scores every step with generalised advantage estimation
(:mod:`mazerun.algorithms.rollouts`),

    delta_t = r_t + gamma * V(s_t+1) * (1 - done_t) - V(s_t)
    A_t     = delta_t + gamma * lambda * (1 - done_t) * A_t+1,          R_t = A_t + V(s_t)

and then takes ``n_epochs`` passes of minibatch gradient steps on

    ratio_t  = pi(a_t | s_t) / pi_old(a_t | s_t)
    L_policy = -E[ min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t) ]
    L_value  =  E[ (V(s_t) - R_t)^2 ]          (clip_vf: the larger of that and the error of
                                                V_old + clip(V - V_old, -clip_vf, clip_vf))
    loss     =  L_policy - ent_coef * E[ H(pi(. | s_t)) ] + vf_coef * L_value

with advantages standardised per minibatch and the gradient norm clipped to ``max_grad_norm``.
With ``imitation_coef > 0`` a batch of recorded demonstrations is drawn beside every minibatch
and ``imitation_coef * -E_demo[ log pi(a_demo | s_demo) ]`` joins the loss: the behavioural
cloning term that keeps a fine-tuned clone from forgetting its teacher while PPO moves it. The
learning rate, the clip range ``eps`` and ``imitation_coef`` each stay constant or decay
linearly to 0 at ``total_steps``.
The value loss has no 1/2 factor, as in Stable-Baselines3, so rl-zoo's tuned coefficients
mean the same here. An episode cut off by a time limit is not an ending the agent caused: the
rollout adds ``gamma * V(final observation)`` to the reward of its last step, and GAE then
treats the step as done (the observation after it belongs to the next episode).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, Iterator, NamedTuple, Optional

import torch
from torch import nn
from torch.distributions import Distribution
from torch.nn import functional as F

from mazerun.algorithms.base import EnvStepBudget
from mazerun.algorithms.bc import cloning_loss
from mazerun.algorithms.protocol import Algorithm, AlgorithmSpec, gradient_mismatch, mismatch_line
from mazerun.algorithms.rollouts import RolloutBatch, explained_variance
from mazerun.config.schemas import check_fields
from mazerun.core.errors import MazerunError
from mazerun.core.schedules import LinearSchedule
from mazerun.data.tensors import TransitionBatch
from mazerun.fast.fused import LOG_SQRT_2PI, FlatAdam, FusedActorCritic, fusable
from mazerun.fast.optim import Adam
from mazerun.nn.models import flatten_distribution, log_probs_and_entropies


@dataclass
class PPOConfig(EnvStepBudget):
    """PPO's settings; the defaults are rl-zoo's tuned values for LunarLander.

    From scratch: run algorithm=ppo; fine-tune a clone: run algorithm=ppo input_dir=outputs/<bc run>;
    continue a PPO run: run algorithm=ppo input_dir=outputs/<ppo run> (total_steps is the total).
    runner.n_envs (16), runner.vector (auto|sync|worker|async) and runner.eval_repeats set the environments and
    the evaluations.
    """

    loop: ClassVar[str] = "on_policy"

    name: str = "ppo"
    """Which algorithm this section configures, as chosen by ``algorithm=<name>``."""
    total_steps: int = 1_000_000
    """Environment steps in total, over all envs; rounded up to whole rollouts (n_steps * n_envs).
    A continued run trains up to this many (budgets are totals)."""
    n_steps: int = 1024
    """Steps per environment in one rollout."""
    batch_size: int = 64
    """Minibatch size; must divide the rollout size n_steps * runner.n_envs."""
    n_epochs: int = 4
    """Passes over each rollout."""
    lr: float = 3e-4
    """Adam's learning rate (its eps is 1e-5, as in Stable-Baselines3 and CleanRL)."""
    lr_schedule: str = "constant"
    """constant, or linear: decays to 0 at total_steps."""
    gamma: float = 0.999
    """Discount of the returns and advantages."""
    gae_lambda: float = 0.98
    """lambda of generalised advantage estimation: 0 is the one-step TD error, 1 the Monte Carlo return."""
    clip_range: float = 0.2
    """eps of the clipped surrogate."""
    clip_schedule: str = "constant"
    """constant, or linear: eps decays to 0 at total_steps (AllenAct's clip decay)."""
    clip_vf: Optional[float] = None
    """Clip the value update around the rollout's values by this much; null: no clipping."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus."""
    vf_coef: float = 0.5
    """Weight of the value loss (without a 1/2 factor, as in Stable-Baselines3)."""
    max_grad_norm: float = 0.5
    """The gradient's norm is clipped to this before each step."""
    normalize_advantage: bool = True
    """Standardise the advantages per minibatch."""
    critic_burn_in_epochs: int = 0
    """Fine-tuning: the first iterations train only the critic, the policy frozen."""
    imitation_coef: float = 0.0
    """Weight of a behavioural cloning loss on recorded demonstrations (runner.dataset.dir_or_file); 0: none."""
    imitation_schedule: str = "constant"
    """constant, or linear: imitation_coef decays to 0 at total_steps."""
    imitation_batch_size: int = 64
    """Demonstrations drawn beside each minibatch."""
    eval_every: int = 50_000
    """Environment steps between evaluations; the first one is at step 0."""
    fused: bool = True
    """Networks without memory on vector observations (and no imitation term): evaluate actor and
    critic as one (mazerun.fast.fused), with a hand-written backward; false: the plain autograd path."""

    @property
    def needs_dataset(self) -> bool:
        return self.imitation_coef > 0

    def check_spaces(self, observation_space: Any, action_space: Any) -> None:
        """PPO learns in any env the models read."""

    def check_implicit_dataset(self, prefix: str) -> None:
        """The imitation term's demonstrations are never guessed: named, or those of the clone it starts from."""
        raise MazerunError(
            f"{prefix}.imitation_coef={self.imitation_coef} needs recorded demonstrations; set "
            "runner.dataset.dir_or_file=<a trajectory_data directory>, start from a clone with input_dir=<bc run> "
            "(its demonstrations are used), or drop the imitation term"
        )

    def check(self, prefix: str = "algorithm") -> None:
        check_fields(
            self, prefix,
            positive=("total_steps", "n_steps", "batch_size", "n_epochs", "lr", "clip_range", "max_grad_norm",
                      "eval_every", "imitation_batch_size"),
            unit_interval=("gamma", "gae_lambda"),
            non_negative=("ent_coef", "vf_coef", "critic_burn_in_epochs", "imitation_coef"),
            schedules=("lr_schedule", "clip_schedule", "imitation_schedule"),
        )
        if self.clip_vf is not None and self.clip_vf <= 0:
            raise MazerunError(f"{prefix}.clip_vf={self.clip_vf} must be > 0, or null for no value clipping")


class Minibatch(NamedTuple):
    """The rollout's numbers for one gradient step, flat over its rows; the states as the network reads them.

    Without memory ``observations`` are rows too. With memory they are whole env sequences
    ``(n_steps, envs, ...)``, replayed from ``initial_state`` and restarted where ``starts`` is set.
    """

    observations: Any
    actions: torch.Tensor
    log_probs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    starts: torch.Tensor | None = None
    initial_state: torch.Tensor | None = None


def _select(data: Any, index: Any) -> Any:
    """Rows ``index`` (indices, a slice, or ``(slice(None), envs)``) of a tensor, a dict or a :class:`RolloutBatch`."""
    if isinstance(data, RolloutBatch):
        return RolloutBatch(*(None if field is None else _select(field, index) for field in data))
    if isinstance(data, dict):
        return {key: _select(value, index) for key, value in data.items()}
    return data[index]


def _normalized(advantages: torch.Tensor) -> torch.Tensor:
    """Advantages standardised over a minibatch (rows of the last dimension)."""
    mean, std = advantages.mean(-1, keepdim=True), advantages.std(-1, keepdim=True)
    return (advantages - mean) / (std + 1e-8)


def log_prob_and_entropy(distribution: Distribution, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``actions`` and the mean entropy."""
    log_probs, entropies = log_probs_and_entropies(distribution, actions)
    return log_probs, entropies.mean()


FAST_PATH_TOLERANCE = 1e-4
"""How far the hand-written gradient may stray from autograd's (:func:`~mazerun.algorithms.protocol.gradient_mismatch`):
float32 rounding."""


class PPOTerms(NamedTuple):
    """The terms of one minibatch's loss, as the module docstring writes them."""

    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    """The mean entropy of the policy over the minibatch."""
    log_ratio: torch.Tensor
    """``log pi(a | s) - log pi_old(a | s)`` of each row."""


def ppo_terms(distribution: Distribution, values: torch.Tensor, minibatch: Minibatch, clip_range: float,
              clip_vf: float | None) -> PPOTerms:
    """``L_policy``, ``L_value`` and the entropy of one minibatch, given the current policy and values on its states;
    the loss is ``L_policy + vf_coef * L_value - ent_coef * entropy`` (plus the imitation term, when there is one)."""
    log_probs, entropy = log_prob_and_entropy(distribution, minibatch.actions)
    log_ratio = log_probs - minibatch.log_probs
    ratio = log_ratio.exp()
    advantages = minibatch.advantages
    clipped_ratio = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = -torch.min(ratio * advantages, clipped_ratio * advantages).mean()

    returns = minibatch.returns
    if clip_vf is None:
        value_loss = F.mse_loss(values, returns)
    else:
        old_values = minibatch.old_values
        clipped_values = old_values + (values - old_values).clamp(-clip_vf, clip_vf)
        value_loss = torch.max((values - returns).square(), (clipped_values - returns).square()).mean()
    return PPOTerms(policy_loss, value_loss, entropy, log_ratio)


def clipped_surrogate_gradient(config: PPOConfig, clip_range: float, fused: FusedActorCritic, batch_size: int,
                               train_policy: bool) -> Callable[..., None]:
    """The hand-written gradient of :func:`ppo_terms`' loss with respect to the heads, for :class:`FusedActorCritic`:
    the function a minibatch step calls between the forward and the backward pass.

    With ``ratio = exp(lp - lp_old)``, ``s1 = ratio * A`` and ``s2 = clip(ratio) * A``, the
    policy loss ``-mean(min(s1, s2))`` has ``d L / d lp = -s1 * [s1 <= s2] / B``: where the clip
    binds, the minimum does not move with lp. Then, for a categorical policy with
    log-probabilities ``log_p`` (``p = exp(log_p)``, entropy ``H = -sum p log_p``),

        d L / d logits = g * (onehot(a) - p) + ent_coef / B * p * (log_p + H),    g = d L / d lp

    and for a diagonal Gaussian with mean mu and ``log_std``, ``d lp / d mu = (a - mu) / std^2``,
    ``d lp / d log_std = (a - mu)^2 / std^2 - 1`` and ``d H / d log_std = 1``. The value loss
    gives ``d L / d V = vf_coef * 2 (V - R) / B`` (with ``clip_vf``, through the larger of the
    two errors, the clipped one only inside the clip). Without ``train_policy`` (critic burn-in)
    only the value gradient is written. Each row's log-ratio, surrogate, value loss and entropy
    go into the given per-row tensors.
    """
    device = fused.flat.device
    discrete, log_std, log_std_grad = fused.discrete, fused.log_std, fused.log_std_grad
    # Constants as tensors: an op with a Python float converts it to a tensor on every call.
    constant = partial(torch.tensor, device=device)
    zero, one = constant(0.0), constant(1.0)
    inverse_batch, entropy_scale = constant(-1.0 / batch_size), constant(config.ent_coef)
    entropy_row_scale = constant(config.ent_coef / batch_size)
    value_scale = constant(2.0 * config.vf_coef / batch_size)
    low, high, clip_vf = 1.0 - clip_range, 1.0 + clip_range, config.clip_vf

    def head_gradient(workspace: Any, action: torch.Tensor, old_log_prob: torch.Tensor, old_value: torch.Tensor,
                      target: torch.Tensor, advantage: torch.Tensor, log_ratio: torch.Tensor, surrogate: torch.Tensor,
                      value_loss: torch.Tensor, entropy: torch.Tensor) -> None:
        head, values, head_grad, value_grad = workspace.head, workspace.values, workspace.head_grad, workspace.value_grad
        if discrete:
            log_p = torch.log_softmax(head, 1)
            log_prob = log_p.gather(1, action)
        else:
            std = log_std.exp()
            scaled = (action - head).div_(std)  # (a - mu) / std
            log_prob = scaled.square().mul_(-0.5).sub_(log_std).sum(1, keepdim=True)
            log_prob.sub_(log_std.numel() * LOG_SQRT_2PI)
        ratio = torch.sub(log_prob, old_log_prob, out=log_ratio).exp()
        unclipped = ratio * advantage
        clipped = ratio.clamp(low, high).mul_(advantage)
        torch.minimum(unclipped, clipped, out=surrogate)
        if discrete:
            p = log_p.exp()
            negative_entropy = (p * log_p).sum(1, keepdim=True)
            torch.neg(negative_entropy, out=entropy)
        else:
            entropy.copy_(log_std.sum() + log_std.numel() * (0.5 + LOG_SQRT_2PI))

        error = values - target
        if clip_vf is None:
            torch.square(error, out=value_loss)
            torch.mul(error, value_scale, out=value_grad)
        else:
            change = values - old_value
            clipped_error = change.clamp(-clip_vf, clip_vf).add_(old_value).sub_(target)
            squared, clipped_squared = error.square(), clipped_error.square()
            torch.maximum(squared, clipped_squared, out=value_loss)
            chosen = torch.where(squared >= clipped_squared, error, clipped_error * (change.abs() <= clip_vf))
            torch.mul(chosen, value_scale, out=value_grad)

        if train_policy:
            g = torch.where(unclipped <= clipped, unclipped, zero).mul_(inverse_batch)  # d L / d lp
            if discrete:
                torch.mul(p, (log_p - negative_entropy).mul_(entropy_row_scale).sub_(g), out=head_grad)
                head_grad.scatter_add_(1, action, g)
            else:
                torch.mul(scaled.div(std), g, out=head_grad)
                torch.sum(scaled.square_().sub_(one).mul_(g), 0, out=log_std_grad)
                log_std_grad.sub_(entropy_scale)

    return head_gradient


class PPO(Algorithm):
    """The PPO learner: one :class:`ActorCritic`, one Adam optimiser over all of it, and its schedules.

    ``generator`` shuffles the minibatches; the loop that owns it saves its state with the
    weights, so a continued run draws the same minibatches the uninterrupted run would have.
    """

    network_type = "actor_critic"

    def __init__(self, config: PPOConfig, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> None:
        super().__init__(config, spec, generator)
        self.network = network = spec.actor_critic()
        self.demonstrations: Callable[[], TransitionBatch] | None = None
        """Draws recorded demonstrations for the imitation term; the loop sets it where there are some."""
        self.parameters = [parameter for parameter in network.parameters() if parameter.requires_grad]
        # The fused path trains what the plain path trains, the same loss and the same Adam, in a
        # tenth of the eager ops; it cannot take the imitation term (another network pass on demos).
        self.fused = (FusedActorCritic(network) if config.fused and config.imitation_coef == 0 and fusable(network)
                      else None)
        self.fast_actor = self.fused
        # eps=1e-5 as in Stable-Baselines3 and CleanRL's PPO.
        self.optimizer: Adam | FlatAdam = (Adam(self.parameters, lr=config.lr, eps=1e-5) if self.fused is None else
                                           FlatAdam(self.fused.flat, self.fused.flat_grad, self.parameters,
                                                    lr=config.lr, eps=1e-5))
        end = config.total_steps
        self.schedules = {
            "learning_rate": LinearSchedule.of(config.lr_schedule, config.lr, end),
            "clip_range": LinearSchedule.of(config.clip_schedule, config.clip_range, end),
            "imitation_coef": LinearSchedule.of(config.imitation_schedule, config.imitation_coef, end),
        }
        self.clip_range = config.clip_range
        self.imitation_coef = config.imitation_coef

    def learning_rate(self, step: int) -> float:
        """The learning rate for the iteration that starts at env step ``step``."""
        return self.schedules["learning_rate"](step)

    def set_progress(self, step: int) -> dict[str, float]:
        """Apply the scheduled values for the iteration that starts at env step ``step``; returns them."""
        values = {name: schedule(step) for name, schedule in self.schedules.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = values["learning_rate"]
        self.clip_range, self.imitation_coef = values["clip_range"], values["imitation_coef"]
        return values

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """``n_epochs`` passes of minibatch steps over one rollout; mean metrics over all minibatches.

        During the first ``critic_burn_in_epochs`` updates only the value loss is minimised: the
        actor's parameters then get no gradient at all, so Adam leaves them exactly as they are.
        """
        train_policy = self.updates >= self.config.critic_burn_in_epochs
        self.updates += 1
        if self.fused is not None:
            return self._fused_update(batch, train_policy)
        config, demonstrations, network = self.config, self.demonstrations, self.network
        device = batch.actions.device
        sequences = batch.starts is not None
        size = batch.actions.shape[0] * (batch.actions.shape[1] if sequences else 1)
        n_minibatches = size // config.batch_size
        imitate = train_policy and demonstrations is not None and self.imitation_coef > 0
        # Metrics are written into tensors and read once at the end: no host sync per minibatch.
        losses = torch.zeros(config.n_epochs, n_minibatches, 4, device=device)
        loss_weights = torch.tensor([1.0, config.vf_coef, -config.ent_coef, self.imitation_coef], device=device)
        log_ratios = torch.zeros(config.n_epochs, size, device=device)
        no_imitation = torch.zeros((), device=device)
        minibatches = self._sequence_minibatches if sequences else self._flat_minibatches
        for epoch in range(config.n_epochs):
            for index, (rows, minibatch) in enumerate(minibatches(batch)):
                observations = minibatch.observations
                if minibatch.starts is None:
                    distribution, values = network.distribution(observations), network.value(observations)
                else:  # whole env sequences, replayed from the state each began in
                    distribution, _ = network.distribution_sequence(observations, minibatch.starts,
                                                                    minibatch.initial_state)
                    values, _ = network.value_sequence(observations, minibatch.starts, minibatch.initial_state)
                    distribution, values = flatten_distribution(distribution), values.flatten()
                policy_loss, value_loss, entropy, log_ratio = ppo_terms(distribution, values, minibatch,
                                                                        self.clip_range, config.clip_vf)
                imitation = cloning_loss(network, demonstrations())[0] if imitate else no_imitation
                # loss = policy_loss + vf_coef * value_loss - ent_coef * entropy + imitation_coef * imitation,
                # as one dot product; during critic burn-in the actor is not in the graph at all
                terms = torch.stack([policy_loss, value_loss, entropy, imitation])
                loss = terms @ loss_weights if train_policy else config.vf_coef * value_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm, foreach=True)
                self.optimizer.step()

                with torch.no_grad():
                    losses[epoch, index] = terms
                    log_ratios[epoch, rows] = log_ratio
        means = losses.mean(dim=(0, 1)).tolist()
        metrics = dict(zip(("policy_loss", "value_loss", "entropy"), means[:3]))
        if imitate:
            metrics["imitation_loss"] = means[3]
        return self._add_ratio_metrics(metrics, log_ratios, batch)

    def check_fast_path(self, batch: RolloutBatch) -> str | None:
        """Hold :func:`clipped_surrogate_gradient` against autograd of :func:`ppo_terms`' loss on the rollout's first
        minibatch (rows in order: the generator's draws stay the run's).

        They must agree within :data:`FAST_PATH_TOLERANCE` (:func:`~mazerun.algorithms.protocol.gradient_mismatch`);
        if they do not, the loss
        was edited and the hand-written gradient was not: the fused path is dropped (the optimiser's state
        carries over), training follows the readable loss, and the returned line says so.
        """
        fused, config = self.fused, self.config
        if fused is None:
            return None
        rows = slice(0, config.batch_size)
        observations = _select(batch.observations, rows)
        advantages = batch.advantages[rows]
        if config.normalize_advantage and config.batch_size > 1:
            advantages = _normalized(advantages)
        minibatch = Minibatch(observations, batch.actions[rows], batch.log_probs[rows], batch.values[rows], advantages,
                              batch.returns[rows])
        policy_loss, value_loss, entropy, _ = ppo_terms(self.network.distribution(observations),
                                                        self.network.value(observations), minibatch, self.clip_range,
                                                        config.clip_vf)
        loss = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
        expected = torch.autograd.grad(loss, self.parameters)
        with torch.no_grad():
            kept = fused.flat_grad.clone()
            workspace = fused.workspace(config.batch_size)
            x = fused.normalize(observations)
            actions = batch.actions[rows, None] if fused.discrete else batch.actions[rows]
            columns = [batch.log_probs[rows, None], batch.values[rows, None], batch.returns[rows, None],
                       advantages.view(-1, 1)]
            per_row = torch.zeros(4, config.batch_size, 1, device=kept.device)
            fused.forward(workspace, x)
            clipped_surrogate_gradient(config, self.clip_range, fused, config.batch_size, True)(
                workspace, actions, *columns, *per_row)
            fused.backward(workspace, x)
            fast = [fused.flat_grad.as_strided(parameter.shape, parameter.stride(), parameter.storage_offset())
                    for parameter in self.parameters]
            mismatch = gradient_mismatch(fast, list(expected))
            fused.flat_grad.copy_(kept)
        if mismatch <= FAST_PATH_TOLERANCE:
            return None
        state = self.optimizer.state_dict()
        self.fused = self.fast_actor = None
        self.optimizer = Adam(self.parameters, lr=config.lr, eps=1e-5)
        self.optimizer.load_state_dict(state)
        return mismatch_line(config.name, "ppo_terms", mismatch, FAST_PATH_TOLERANCE)

    def _add_ratio_metrics(self, metrics: dict[str, float], log_ratios: torch.Tensor,
                           batch: RolloutBatch) -> dict[str, float]:
        """How far the policy moved (approximate KL, share of clipped ratios) and how well the critic explains returns."""
        ratios = log_ratios.exp()
        # Every minibatch has the same size, so means over all rows are means of the minibatch means.
        metrics["approx_kl"] = float(((ratios - 1.0) - log_ratios).mean())
        metrics["clip_fraction"] = float(((ratios - 1.0).abs() > self.clip_range).float().mean())
        metrics["explained_variance"] = explained_variance(batch.values, batch.returns)
        return metrics

    @torch.no_grad()
    def _fused_update(self, batch: RolloutBatch, train_policy: bool) -> dict[str, float]:
        """:meth:`update` through :class:`FusedActorCritic`: the same minibatches, loss and Adam; the gradient of
        :func:`ppo_terms` by hand (:func:`clipped_surrogate_gradient`), the norm clipping and Adam on the whole
        storage at once. Losses and log-ratios are written per row and averaged at the end, as :meth:`update`
        averages."""
        config, fused = self.config, self.fused
        size, batch_size = len(batch.actions), config.batch_size
        if size % batch_size:
            raise ValueError(f"batch_size {batch_size} does not divide the rollout size {size}")
        n_minibatches, device = size // batch_size, batch.actions.device
        workspace = fused.workspace(batch_size)
        workspace.head_grad.zero_()  # stays 0 during critic burn-in
        if not train_policy and fused.log_std_grad is not None:
            fused.log_std_grad.zero_()
        inputs = fused.normalize(batch.observations)
        # Per-row columns (N, 1), so that every per-minibatch tensor broadcasts against (B, width) heads.
        actions = batch.actions[:, None] if fused.discrete else batch.actions
        columns = [batch.log_probs[:, None], batch.values[:, None], batch.returns[:, None], batch.advantages]
        log_ratios, surrogates, value_losses, entropies = torch.zeros(4, config.n_epochs, size, 1, device=device)
        head_gradient = clipped_surrogate_gradient(config, self.clip_range, fused, batch_size, train_policy)
        max_norm, eps = torch.tensor(config.max_grad_norm, device=device), torch.tensor(1e-6, device=device)
        rows_to_step = (0, 1) if train_policy else (1,)
        flat_grad, forward, backward, step = fused.flat_grad, fused.forward, fused.backward, self.optimizer.step
        for epoch in range(config.n_epochs):
            order = torch.randperm(size, device=device, generator=self.generator)
            old_log_probs, old_values, returns, advantages = (column.index_select(0, order) for column in columns)
            if config.normalize_advantage and batch_size > 1:
                advantages = _normalized(advantages.view(n_minibatches, batch_size))
            minibatches = zip(
                inputs.index_select(1, order).view(2, n_minibatches, batch_size, -1).unbind(1),
                *(tensor.view(n_minibatches, batch_size, -1).unbind(0) for tensor in (
                    actions.index_select(0, order), old_log_probs, old_values, returns, advantages,
                    log_ratios[epoch], surrogates[epoch], value_losses[epoch], entropies[epoch])),
            )
            for x, *rows in minibatches:
                forward(workspace, x)
                head_gradient(workspace, *rows)
                backward(workspace, x)
                # nn.utils.clip_grad_norm_'s arithmetic, on one tensor
                flat_grad.mul_(torch.div(max_norm, torch.linalg.vector_norm(flat_grad).add_(eps)).clamp_(max=1.0))
                step(rows_to_step)
        metrics = {"policy_loss": float(-surrogates.mean()), "value_loss": float(value_losses.mean()),
                   "entropy": float(entropies.mean())}
        return self._add_ratio_metrics(metrics, log_ratios.view(config.n_epochs, size), batch)

    def _flat_minibatches(self, batch: RolloutBatch) -> Iterator[tuple[slice, Minibatch]]:
        """Shuffled rows: one gather per field and epoch, then each minibatch is a slice (a view, no copy)."""
        size, batch_size = len(batch.actions), self.config.batch_size
        if size % batch_size:
            raise ValueError(f"batch_size {batch_size} does not divide the rollout size {size}")
        shuffled = _select(batch, torch.randperm(size, device=batch.actions.device, generator=self.generator))
        advantages = shuffled.advantages
        if self.config.normalize_advantage and batch_size > 1:
            advantages = _normalized(advantages.view(size // batch_size, batch_size)).view(-1)
        for minibatch in range(size // batch_size):
            rows = slice(minibatch * batch_size, (minibatch + 1) * batch_size)
            yield rows, Minibatch(
                _select(shuffled.observations, rows), shuffled.actions[rows], shuffled.log_probs[rows],
                shuffled.values[rows], advantages[rows], shuffled.returns[rows],
            )

    def _sequence_minibatches(self, batch: RolloutBatch) -> Iterator[tuple[slice, Minibatch]]:
        """Whole env sequences, never steps shuffled across time, replayed from the rollout's first state."""
        steps, n_envs = batch.actions.shape[:2]
        envs = self.config.batch_size // steps
        order = torch.randperm(n_envs, device=batch.actions.device, generator=self.generator)
        for minibatch in range(n_envs // envs):
            chosen = _select(batch, (slice(None), order[minibatch * envs : (minibatch + 1) * envs]))
            state = batch.initial_state[order[minibatch * envs : (minibatch + 1) * envs]]
            advantages = chosen.advantages.flatten()
            if self.config.normalize_advantage and advantages.numel() > 1:
                advantages = _normalized(advantages)
            rows = slice(minibatch * envs * steps, (minibatch + 1) * envs * steps)
            yield rows, Minibatch(
                chosen.observations, chosen.actions.flatten(0, 1), chosen.log_probs.flatten(), chosen.values.flatten(),
                advantages, chosen.returns.flatten(), starts=chosen.starts, initial_state=state,
            )

    def training_state(self) -> dict[str, Any]:
        """What a continued run needs besides the weights."""
        return {
            "updates": self.updates,
            "optimizer": self.optimizer.state_dict(),
            "schedules": {name: schedule.to_list() for name, schedule in self.schedules.items()},
        }

    def load_training_state(self, state: dict[str, Any], progress: int) -> None:
        """Continue at env step ``progress``; a raised ``total_steps`` stretches the schedules from there, without
        a jump."""
        step = progress
        self.updates = int(state["updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedules = {
            name: LinearSchedule.from_list(values).extended_to(step, self.config.total_steps)
            for name, values in state["schedules"].items()
        }


Config = PPOConfig
Algorithm = PPO
