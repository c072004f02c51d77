"""Agents of one architecture and batch size trained together: one batched call per learn step.

A :class:`Cohort` stacks its agents' parameters along a leading agent axis and runs the
algorithm's own :meth:`~mazerun.algorithms.base.OfflineAlgorithm.losses` once for all of them
under ``torch.func.vmap`` (through ``functional_call`` on a spare copy of the networks, so the
loss is the same code a single agent runs), then one backward pass through the sum of the
agents' losses: they share no parameter, so each agent's slice of the gradient is its own.
Linear layers become batched matrix products over a flat ``(agents, parameters)`` tensor, and
each agent's row steps with its own learning rate and step count in torch's fused Adam kernel
(AgileRL steps its agents one by one). An algorithm with a hand-written step for MLPs (CQL:
:class:`mazerun.fast.fused.StackedQLearner`) skips vmap and autograd: the same three passes and
backward run on the cohort's storage, a ``baddbmm`` or ``bmm`` per layer for all agents, and
while the agents copy their targets rarely the target pass becomes a lookup in a table of the
target networks' values over the dataset (:meth:`Cohort.learn`).

Each agent keeps its own batch stream, learning rate, discount and target-network schedule:
the cohort draws every agent's batch from that agent's generator and updates its target with
its own ``tau`` when its own interval is due. The result equals per-agent
:meth:`~mazerun.algorithms.base.OfflineAlgorithm.update` calls up to float rounding (tested).
Between generations :meth:`Cohort.write_back` returns the weights, targets and optimiser
moments to the agents, which are plain objects again for selection and mutation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from mazerun.compose.evolution import Agent
from mazerun.data.tensors import TransitionBatch, TransitionDataset
from mazerun.fast.fused import StackedQLearner
from mazerun.fast.optim import adam_kernel

TARGET_TABLE_BYTES = 256 * 2**20
"""The largest table of target Q-values a cohort keeps (:meth:`Cohort._next_target`)."""


class _LossShell(nn.Module):
    """All networks of an algorithm as one module tree, whose forward is the algorithm's loss."""

    def __init__(self, algorithm: Any) -> None:
        super().__init__()
        self.networks = nn.ModuleDict(
            {name: module for name, module in vars(algorithm).items() if isinstance(module, nn.Module)}
        )
        self._algorithm = (algorithm,)  # a tuple: not registered as a submodule

    def forward(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._algorithm[0].losses(batch)


def batchable(agent: Agent) -> bool:
    """Whether vmap can batch the agent's networks (vector observations; MiniGrid's GRU cannot)."""
    return agent.model_config.kind == "vector_obs"


def cohort_key(agent: Agent) -> tuple:
    """Agents with equal keys share a cohort: same architecture, same batch size."""
    model = agent.model_config
    return (model.hidden_sizes, model.activation, int(agent.algorithm.config.batch_size))


def sample_batch(data: TransitionDataset, batch_size: int, generator: torch.Generator) -> TransitionBatch:
    """One agent's batch: what :class:`mazerun.data.tensors.BatchSampler` draws from the same generator."""
    index = torch.randint(len(data), (batch_size,), generator=generator, device=data.device)
    return gather(data, index)


def gather(data: TransitionDataset, index: torch.Tensor) -> TransitionBatch:
    """The transitions at ``index`` (any shape), each field shaped ``index.shape + row shape``."""
    flat = index.reshape(-1)

    def take(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.index_select(0, flat).reshape(*index.shape, *tensor.shape[1:])

    def take_obs(obs: Any) -> Any:
        return {key: take(value) for key, value in obs.items()} if isinstance(obs, dict) else take(obs)

    return TransitionBatch(
        take_obs(data.observations), take(data.actions), take(data.rewards), take_obs(data.next_observations),
        take(data.dones), None if data.expert_actions is None else take(data.expert_actions),
    )


class Cohort:
    """Several agents of identical architecture and batch size, stacked for batched updates.

    ``template`` is a spare algorithm of the same architecture and static settings: its modules
    only lend their structure to ``functional_call``; their own weights are never used.
    """

    def __init__(self, agents: list[Agent], template: Any) -> None:
        self.agents = agents
        self.template = template
        self.base_config = template.config
        self.shell = _LossShell(template)
        count = len(agents)
        first = agents[0].algorithm
        group = first.optimizer.param_groups[0]
        if group["weight_decay"] or group["amsgrad"] or group["maximize"] or len(first.optimizer.param_groups) > 1:
            raise ValueError("a cohort steps plain Adam only")
        self.betas: tuple[float, float] = tuple(group["betas"])
        self.eps: float = group["eps"]

        shells = [_LossShell(agent.algorithm) for agent in agents]
        named = [dict(shell.named_parameters()) for shell in shells]
        optimised = {id(parameter) for parameter in first.optimizer.param_groups[0]["params"]}
        names = list(named[0])
        self.trainable_names = [name for name in names if id(named[0][name]) in optimised]
        targets = {f"networks.{target}.": f"networks.{online}." for target, online in first.target_networks.items()}
        self.target_names = [name for name in names if name.startswith(tuple(targets))]
        self.frozen_names = [name for name in names if name not in self.trainable_names and name not in self.target_names]
        # Which trainable name each target parameter follows.
        self.target_sources = []
        for name in self.target_names:
            prefix = next(prefix for prefix in targets if name.startswith(prefix))
            self.target_sources.append(targets[prefix] + name[len(prefix):])

        with torch.no_grad():
            self.shapes = {name: named[0][name].shape for name in names}
            self.flat = torch.cat([torch.stack([n[name].detach().reshape(-1) for n in named]) for name in self.trainable_names], dim=1)
            self.target_flat = torch.cat(
                [torch.stack([n[name].detach().reshape(-1) for n in named]) for name in self.target_names], dim=1
            ) if self.target_names else None
            self.frozen = {name: torch.stack([n[name].detach() for n in named]) for name in self.frozen_names}
            buffers = [dict(shell.named_buffers()) for shell in shells]
            self.buffers = {name: torch.stack([b[name] for b in buffers]) for name in buffers[0]}
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name in self.trainable_names:
            size = self.shapes[name].numel()
            self.offsets[name] = (offset, offset + size)
            offset += size
        self.flat.requires_grad_(True)
        target_offset = 0
        self.target_offsets: dict[str, tuple[int, int]] = {}
        for name in self.target_names:
            size = self.shapes[name].numel()
            self.target_offsets[name] = (target_offset, target_offset + size)
            target_offset += size
        self.targets = {
            name: self.target_flat[:, slice(*self.target_offsets[name])].view(count, *self.shapes[name])
            for name in self.target_names
        }
        self.source_index = torch.cat([
            torch.arange(*self.offsets[source], device=self.flat.device) for source in self.target_sources
        ]) if self.target_names else None

        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.adam_steps = torch.zeros(count, dtype=torch.float64)
        self._step = torch.zeros((), device=self.flat.device)
        """The count the Adam kernel reads (it takes a tensor)."""
        for index, agent in enumerate(agents):
            state = agent.algorithm.optimizer.state
            parameters = dict(shells[index].named_parameters())
            for name in self.trainable_names:
                moments = state.get(parameters[name])
                if moments:
                    start, end = self.offsets[name]
                    self.exp_avg[index, start:end] = moments["exp_avg"].reshape(-1)
                    self.exp_avg_sq[index, start:end] = moments["exp_avg_sq"].reshape(-1)
                    self.adam_steps[index] = float(moments["step"])
        self.updates = [agent.algorithm.updates for agent in agents]
        self._batched: dict[tuple[bool, ...], Any] = {}
        self.stack = self._stack()
        self._target_table: torch.Tensor | None = None
        self._table_data: TransitionDataset | None = None
        self._table_stale = True
        self.refresh_hyperparameters()

    def _stack(self) -> StackedQLearner | None:
        """The hand-written step over this cohort's storage, where the template has one (CQL on an MLP) and the
        stacked parameters are its layout: the online network's layers, and the target's in the same order."""
        stack = getattr(self.template, "stack", None)
        if not isinstance(stack, StackedQLearner) or self.target_flat is None:
            return None
        layers = [(f"{layer}.weight", f"{layer}.bias") for layer in (*(f"trunk.{index}" for index, module in
                  enumerate(self.template.network.trunk) if isinstance(module, nn.Linear)), "head")]
        expected = [name for pair in layers for name in pair]
        if (self.trainable_names != [f"networks.network.{name}" for name in expected]
                or self.target_names != [f"networks.target_network.{name}" for name in expected]):
            return None
        count = len(self.agents)
        self.flat_grad = torch.zeros_like(self.flat, requires_grad=False)
        self.obs_mean, self.obs_std = (self.buffers[f"networks.network.encoder.{name}"].view(count, 1, -1)
                                       for name in ("obs_mean", "obs_std"))
        return StackedQLearner(self.flat.detach(), self.flat_grad, self.target_flat, stack.online.shapes,
                               stack.online.activation, stack.matmul_dtype)

    def _views(self, flat: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        count = flat.shape[0]
        return {name: flat[:, slice(*self.offsets[name])].view(count, *self.shapes[name]) for name in names}

    def refresh_hyperparameters(self) -> None:
        """Read each agent's learning rate, discount and target schedule from its config."""
        configs = [agent.algorithm.config for agent in self.agents]
        device = self.flat.device
        self.lrs = torch.tensor([config.lr for config in configs], dtype=torch.float64)
        self.has_gamma = hasattr(self.base_config, "gamma")
        self.gammas = torch.tensor([getattr(config, "gamma", 0.0) for config in configs], device=device)
        self.taus = [getattr(config, "tau", 1.0) for config in configs]
        self.intervals = [getattr(config, "target_update_interval", 1) for config in configs]

    def _loss(self, trainable: dict, frozen: dict, targets: dict, buffers: dict, batch: TransitionBatch,
              gamma: torch.Tensor) -> Any:
        if self.has_gamma:
            self.template.config = dataclasses.replace(self.base_config, gamma=gamma)
        return functional_call(self.shell, (trainable, frozen, targets, buffers), (batch,), strict=True)

    def _losses(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every agent's loss ``(agents,)`` and metrics, from one vmapped call of the algorithm's loss."""
        pattern = tuple(field is None for field in batch)
        batched = self._batched.get(pattern)
        if batched is None:
            dims = TransitionBatch(*(None if missing else 0 for missing in pattern))
            batched = self._batched[pattern] = vmap(self._loss, in_dims=(0, 0, 0, 0, dims, 0))
        trainable = self._views(self.flat, self.trainable_names)
        try:
            return batched(trainable, self.frozen, self.targets, self.buffers, batch, self.gammas)
        finally:
            self.template.config = self.base_config

    def sample_index(self, data: TransitionDataset) -> torch.Tensor:
        """Every agent's next batch of rows of ``data`` ``(agents, batch)``, drawn from its own generator."""
        batch_size = int(self.agents[0].algorithm.config.batch_size)
        return torch.stack([
            torch.randint(len(data), (batch_size,), generator=agent.generator, device=data.device)
            for agent in self.agents
        ])

    def sample(self, data: TransitionDataset) -> TransitionBatch:
        """Every agent's next batch from its own generator, stacked ``(agents, batch, ...)``."""
        return gather(data, self.sample_index(data))

    def learn(self, data: TransitionDataset) -> dict[str, torch.Tensor]:
        """:meth:`step` on the agents' next batches of ``data``, with the target networks' values of the next
        observations read from a table over ``data`` where that saves work (:meth:`_next_target`)."""
        index = self.sample_index(data)
        return self.step(gather(data, index), self._next_target(data, index))

    @torch.no_grad()
    def _next_target(self, data: TransitionDataset, index: torch.Tensor) -> torch.Tensor | None:
        """The target networks' Q-values ``(agents, batch, actions)`` of the batches' next observations.

        Between two hard copies a target network does not change, so its values of every next
        observation of ``data`` make a table (``N`` rows, refreshed after each copy) that each step
        reads instead of running the target pass on its batch. None (each step runs that pass) without
        a hand-written step, when an agent averages its target in (``tau`` < 1), when copies come so
        often that a refresh costs more than the passes it saves (``interval x batch < N``), or when
        the table would pass :data:`TARGET_TABLE_BYTES`.
        """
        stack = self.stack
        if stack is None or any(tau != 1.0 for tau in self.taus) or not torch.is_tensor(data.next_observations):
            return None
        count, rows = len(self.agents), len(data)
        actions = stack.target.head.weight.shape[1]
        if min(self.intervals) * index.shape[1] < rows or count * rows * actions * 4 > TARGET_TABLE_BYTES:
            return None
        if self._target_table is None or self._table_data is not data:
            self._target_table = torch.empty(count, rows, actions, device=self.flat.device)
            self._table_data, self._table_stale = data, True
        if self._table_stale:
            stack.target_values(data.next_observations, self.obs_mean, self.obs_std, out=self._target_table)
            self._table_stale = False
        return self._target_table.gather(1, index.unsqueeze(2).expand(-1, -1, actions))

    def step(self, batch: TransitionBatch, next_target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One learn step of every agent on its slice of ``batch``; returns metrics shaped ``(agents,)``.
        ``next_target``: the target networks' Q-values of the next observations, where known."""
        if self.stack is not None:
            with torch.no_grad():
                _, metrics = self.stack.gradient(batch.observations, batch.next_observations, self.obs_mean,
                                                 self.obs_std, self.template.head_gradient(batch, self.gammas[:, None]),
                                                 next_target)
            gradients = self.flat_grad
        else:
            losses, metrics = self._losses(batch)
            # Agents' losses share no parameter, so the gradient of their sum holds each agent's own.
            self.flat.grad = None
            losses.sum().backward()
            gradients = self.flat.grad
        self._adam(gradients)
        self.updates = [count + 1 for count in self.updates]
        self._follow_targets()
        return {name: value.detach() for name, value in metrics.items()}

    @torch.no_grad()
    def _adam(self, gradients: torch.Tensor) -> None:
        """torch.optim.Adam's update (no weight decay, no amsgrad) with a step count and lr per agent: the
        kernel a single agent's :class:`~mazerun.fast.optim.Adam` calls, once per agent's row."""
        beta1, beta2 = self.betas
        self.adam_steps += 1
        weights = self.flat.detach()
        for row, (lr, steps) in enumerate(zip(self.lrs.tolist(), self.adam_steps.tolist())):
            self._step.fill_(steps)
            adam_kernel([weights[row]], [gradients[row]], [self.exp_avg[row]], [self.exp_avg_sq[row]], [self._step],
                        lr=lr, beta1=beta1, beta2=beta2, eps=self.eps)

    @torch.no_grad()
    def _follow_targets(self) -> None:
        """Each agent's target moves ``tau`` of the way to its online network when its interval is due."""
        if self.target_flat is None:
            return
        due = [count % interval == 0 for count, interval in zip(self.updates, self.intervals)]
        if not any(due):
            return
        self._table_stale = True
        weights = torch.tensor([tau if is_due else 0.0 for tau, is_due in zip(self.taus, due)],
                               dtype=self.flat.dtype, device=self.flat.device)
        online = self.flat.index_select(1, self.source_index)
        self.target_flat.lerp_(online, weights[:, None])

    @torch.no_grad()
    def write_back(self) -> None:
        """Return weights, targets, optimiser moments and step counts to the agents."""
        for index, agent in enumerate(self.agents):
            algorithm = agent.algorithm
            parameters = dict(_LossShell(algorithm).named_parameters())
            for name in self.trainable_names:
                start, end = self.offsets[name]
                parameter = parameters[name]
                parameter.copy_(self.flat[index, start:end].view_as(parameter))
                state = algorithm.optimizer.state[parameter]
                if not state:
                    fused = bool(algorithm.optimizer.param_groups[0].get("fused"))
                    state["step"] = torch.zeros((), dtype=torch.float32, device=parameter.device if fused else "cpu")
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["step"].fill_(float(self.adam_steps[index]))
                state["exp_avg"].copy_(self.exp_avg[index, start:end].view_as(parameter))
                state["exp_avg_sq"].copy_(self.exp_avg_sq[index, start:end].view_as(parameter))
            for name in self.target_names:
                parameters[name].copy_(self.targets[name][index])
            algorithm.updates = self.updates[index]
