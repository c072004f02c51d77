"""Evolutionary hyper-parameter search, the parts that need no environment: settings, agents, selection, mutation.

A population of agents of one offline algorithm learns from one dataset. Every ``evo_steps``
learn steps each agent is scored (its fitness: the mean evaluation return, optionally over its
last ``fitness_window`` evaluations), and the next generation is drawn by tournament selection:
the elite is kept as it is, every other place goes to the fittest of ``tournament_size`` agents
drawn at random, and that copy is then mutated, or not, by one of

    none          the copy trains on unchanged
    architecture  a hidden layer is added (identity-initialised: the network computes what it did,
                  exactly for relu, nearly for tanh) or a layer gains nodes (their outgoing weights
                  start at 0, so the function is unchanged), within max_layers and max_nodes
    parameters    every acting weight w becomes w * (1 + mutation_sd * N(0, 1))
    activation    tanh <-> relu in every trunk
    rl_hp         one hyper-parameter of hpo.space grows or shrinks by its factor, kept in its range

Every random choice comes from one ``torch.Generator`` seeded by ``hpo.seed`` and stored in
``last.pt``, so a search is reproducible and continues after Ctrl-C as if never stopped. The
functions here are pure over small inputs (fitness lists, model configs, state dicts) and are
tested on tiny networks; :mod:`mazerun.compose.population` runs the search.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from mazerun.algorithms import searchable_algorithms
from mazerun.algorithms.base import OfflineAlgorithm
from mazerun.config.schemas import check_fields, structured
from mazerun.core.errors import MazerunError
from mazerun.nn.models import ACTIVATIONS, ModelConfig

"""Algorithms a population can be made of: the offline ones (one shared dataset)."""

MUTATIONS = ("no_mutation", "architecture", "parameters", "activation", "rl_hp")
"""The kinds of mutation, each drawn with its probability in ``hpo.mutation``."""

HYPERPARAMETERS = {
    "lr": "lr",
    "batch_size": "batch_size",
    "learn_step": "target_update_interval",
    "gamma": "gamma",
    "tau": "tau",
}
"""``hpo.space`` key -> the algorithm config field it sets. ``learn_step`` is AgileRL's name: with
no environment steps to learn between, offline it is the number of updates between two target
network updates; an algorithm without the field (bc has no target) does not mutate it."""

INTEGER_HYPERPARAMETERS = ("batch_size", "learn_step")


@dataclass
class RangeConfig:
    """Where a hyper-parameter may go, and how far one mutation moves it."""

    min: float = 0.0
    max: float = 1.0
    grow_factor: float = 1.2
    """A growing mutation multiplies the value by this (integers grow by at least 1)."""
    shrink_factor: float = 0.8
    """A shrinking mutation multiplies the value by this (integers shrink by at least 1)."""


def _range(low: float, high: float, grow: float = 1.2, shrink: float = 0.8) -> Any:
    return field(default_factory=lambda: RangeConfig(low, high, grow, shrink))


@dataclass
class SpaceConfig:
    """The ranges of the hyper-parameters an ``rl_hp`` mutation may change."""

    lr: RangeConfig = _range(1e-5, 1e-2)
    batch_size: RangeConfig = _range(32, 1024)
    learn_step: RangeConfig = _range(1, 2000, 1.5, 0.75)
    """Updates between two target-network updates (the algorithm's target_update_interval)."""
    gamma: RangeConfig = _range(0.9, 0.999, 1.002, 0.998)
    tau: RangeConfig = _range(0.001, 1.0, 1.5, 0.75)


@dataclass
class MutationConfig:
    """How likely each kind of mutation is, and how strong."""

    no_mutation: float = 0.4
    architecture: float = 0.2
    parameters: float = 0.2
    activation: float = 0.0
    rl_hp: float = 0.2
    """Probabilities of the kinds; whatever they leave to 1 also goes to no_mutation."""
    new_layer: float = 0.2
    """Share of architecture mutations that add a layer; the others add nodes to one layer."""
    mutation_sd: float = 0.1
    """Relative standard deviation of the parameter noise."""
    max_layers: int = 4
    """Hidden layers an architecture mutation may grow to."""
    max_nodes: int = 512
    """Width any hidden layer may grow to."""
    new_nodes: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Node counts an add-nodes mutation draws from."""


@dataclass
class EvolutionConfig:
    """``hpo=evolution``: a population of agents of ``algorithm``, evolved by tournament and mutation."""

    name: str = "evolution"
    population_size: int = 4
    max_steps: Optional[int] = None
    """Learn steps per agent (AgileRL counts them per agent too); null: algorithm.n_updates."""
    evo_steps: Optional[int] = None
    """Learn steps per agent between two evaluations and selections; null: algorithm.eval_every."""
    eval_loop: Optional[int] = None
    """Evaluation episodes per agent, on the same fixed seeds for all; null: runner.eval_repeats."""
    fitness_window: int = 1
    """Fitness is the mean return of an agent's last k evaluations (its line's, for a copy)."""
    target: Optional[float] = None
    """Stop early once the elite's fitness reaches this."""
    tournament_size: int = 2
    elitism: bool = True
    """Keep the fittest agent unmutated in the next generation."""
    seed: int = 0
    """Seeds the initial networks, the batch samplers, selection and every mutation."""
    mutation: MutationConfig = field(default_factory=MutationConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)

    def check(self, prefix: str = "hpo") -> None:
        check_fields(self, prefix, positive=("fitness_window", "tournament_size"), non_negative=("seed",))
        for key in ("max_steps", "evo_steps", "eval_loop"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise MazerunError(f"{prefix}.{key}={value} must be at least 1 (or null for its default)")
        if self.population_size < 2:
            raise MazerunError(
                f"{prefix}.population_size={self.population_size} must be at least 2: a tournament compares "
                "agents; drop hpo to train a single agent"
            )
        if self.tournament_size > self.population_size:
            raise MazerunError(
                f"{prefix}.tournament_size={self.tournament_size} is larger than "
                f"{prefix}.population_size={self.population_size}; use at most {self.population_size}"
            )
        mutation = self.mutation
        check_fields(mutation, f"{prefix}.mutation", unit_interval=(*MUTATIONS, "new_layer"),
                     positive=("max_layers", "max_nodes"), non_negative=("mutation_sd",))
        total = sum(getattr(mutation, name) for name in MUTATIONS)
        if total > 1.0 + 1e-9:
            listed = ", ".join(f"{name}={getattr(mutation, name):g}" for name in MUTATIONS)
            raise MazerunError(
                f"{prefix}.mutation probabilities sum to {total:g} > 1 ({listed}); lower some so they sum to at most 1"
            )
        if not mutation.new_nodes or any(int(count) < 1 for count in mutation.new_nodes):
            raise MazerunError(f"{prefix}.mutation.new_nodes={list(mutation.new_nodes)} must list node counts >= 1")
        for name in HYPERPARAMETERS:
            _check_range(getattr(self.space, name), name, f"{prefix}.space.{name}")

    def resolved(self, algorithm: Any, eval_repeats: int) -> EvolutionConfig:
        """A copy with every null budget taken from the algorithm's and runner's settings."""
        return dataclasses.replace(
            self,
            max_steps=self.max_steps if self.max_steps is not None else algorithm.n_updates,
            evo_steps=self.evo_steps if self.evo_steps is not None else algorithm.eval_every,
            eval_loop=self.eval_loop if self.eval_loop is not None else eval_repeats,
        )


def _check_range(space: RangeConfig, name: str, key: str) -> None:
    if not space.min < space.max:
        kind = "empty" if space.min == space.max else "inverted"
        raise MazerunError(
            f"{key} is {kind} (min={space.min:g}, max={space.max:g}); give min < max, e.g. "
            f"{key}.min={space.min:g} {key}.max={space.min * 10 if space.min > 0 else 1:g}"
        )
    lowest = {"lr": 0.0, "batch_size": 1, "learn_step": 1, "gamma": 0.0, "tau": 0.0}[name]
    strict = name in ("lr", "tau")
    if space.min < lowest or (strict and space.min <= lowest):
        raise MazerunError(f"{key}.min={space.min:g} must be {'>' if strict else '>='} {lowest}")
    if name in ("gamma", "tau") and space.max > 1.0:
        raise MazerunError(f"{key}.max={space.max:g} must be <= 1")
    if space.grow_factor <= 1.0:
        raise MazerunError(f"{key}.grow_factor={space.grow_factor:g} must be > 1")
    if not 0.0 < space.shrink_factor < 1.0:
        raise MazerunError(f"{key}.shrink_factor={space.shrink_factor:g} must lie in (0, 1)")


def evolution_config(values: Any, algorithm: Any) -> EvolutionConfig:
    """The ``hpo`` section as :class:`EvolutionConfig`, checked against itself and the algorithm it evolves."""
    name = values.get("name") if isinstance(values, dict) else None
    if name != "evolution":
        raise MazerunError(f"hpo.name={name!r} is unknown; use hpo=evolution")
    config = structured(EvolutionConfig, values, "hpo")
    config.check()
    if algorithm is None:
        raise MazerunError(
            "hpo=evolution evolves a population of an algorithm and none is chosen; "
            f"add algorithm=<{'|'.join(searchable_algorithms())}>, e.g. run -cn conf_train algorithm=cql hpo=evolution"
        )
    if algorithm.name not in searchable_algorithms():
        raise MazerunError(
            f"hpo=evolution supports {', '.join(searchable_algorithms())} (offline algorithms with one optimiser, "
            f"sharing one dataset); algorithm={algorithm.name} is not one of them"
        )
    if algorithm.lr_schedule != "constant":
        raise MazerunError(
            f"hpo=evolution mutates each agent's learning rate, which algorithm.lr_schedule={algorithm.lr_schedule} "
            "would overwrite; set algorithm.lr_schedule=constant"
        )
    for name, value in hyperparameters_of(algorithm).items():
        space = getattr(config.space, name)
        if not space.min <= value <= space.max:
            raise MazerunError(
                f"algorithm.{HYPERPARAMETERS[name]}={value:g} lies outside hpo.space.{name} "
                f"[{space.min:g}, {space.max:g}]; widen the range or change the algorithm's value"
            )
    return config


# -- agents ----------------------------------------------------------------------------------


def hyperparameters_of(algorithm_config: Any) -> dict[str, float]:
    """The evolvable hyper-parameters the algorithm has, by their ``hpo.space`` names."""
    return {name: getattr(algorithm_config, field_name) for name, field_name in HYPERPARAMETERS.items()
            if hasattr(algorithm_config, field_name)}


@dataclass
class Agent:
    """One member of the population: a learner with its own hyper-parameters, architecture and batch stream."""

    id: int
    algorithm: OfflineAlgorithm
    """Networks, optimiser and the config that holds this agent's hyper-parameters."""
    model_config: ModelConfig
    generator: torch.Generator
    """Draws this agent's batch indices (on the dataset's device)."""
    parent: Optional[int] = None
    mutation: str = "initial"
    """What made this agent from its parent: initial, elite, none, add_layer, add_nodes, ..."""
    steps: int = 0
    """Learn steps taken, its ancestors' included (AgileRL's per-agent step count)."""
    fitnesses: list[float] = field(default_factory=list)
    """Evaluation returns, one per generation, its ancestors' first."""
    window: dict[str, float] = field(default_factory=dict)
    """Sums of the training metrics since this generation's evaluation, and their count in window_size."""
    window_size: int = 0

    @property
    def hyperparameters(self) -> dict[str, float]:
        return hyperparameters_of(self.algorithm.config)

    def fitness(self, window: int) -> float:
        """The mean of the last ``window`` evaluation returns (-inf before the first)."""
        recent = self.fitnesses[-window:]
        return sum(recent) / len(recent) if recent else -math.inf

    def set_hyperparameter(self, name: str, value: float) -> None:
        config = dataclasses.replace(self.algorithm.config, **{HYPERPARAMETERS[name]: value})
        self.algorithm.config = config
        if name == "lr":
            for group in self.algorithm.optimizer.param_groups:
                group["lr"] = value

    def clone(self, new_id: int, generator: torch.Generator | None) -> Agent:
        """A deep copy (networks and optimiser together, so the copy's optimiser steps the copy's weights).

        ``generator`` seeds the copy's batch stream; None keeps a copy of the parent's stream.
        """
        algorithm = copy.deepcopy(self.algorithm)
        batches = torch.Generator(device=self.generator.device)
        if generator is None:
            batches.set_state(self.generator.get_state())
        else:
            batches.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return Agent(id=new_id, algorithm=algorithm, model_config=self.model_config, generator=batches,
                     parent=self.id, mutation="none", steps=self.steps, fitnesses=list(self.fitnesses))


# -- selection -------------------------------------------------------------------------------


def tournament_selection(
    fitnesses: list[float], tournament_size: int, elitism: bool, generator: torch.Generator
) -> list[int]:
    """Indices of the parents of the next generation, as many as there are agents.

    With elitism the fittest comes first (the lowest index among equals); every other place goes
    to the fittest of ``tournament_size`` agents drawn without replacement.
    """
    size = len(fitnesses)
    if not 1 <= tournament_size <= size:
        raise ValueError(f"tournament_size={tournament_size} for {size} agents")

    def fittest(indices: list[int]) -> int:
        return max(indices, key=lambda index: (fitnesses[index], -index))

    parents = [fittest(list(range(size)))] if elitism else []
    while len(parents) < size:
        drawn = torch.randperm(size, generator=generator)[:tournament_size].tolist()
        parents.append(fittest(drawn))
    return parents


def draw_mutation(config: MutationConfig, generator: torch.Generator) -> str:
    """One of :data:`MUTATIONS`, each with its probability (the rest to 1 goes to no_mutation)."""
    probabilities = [getattr(config, name) for name in MUTATIONS]
    probabilities[0] += max(0.0, 1.0 - sum(probabilities))
    index = int(torch.multinomial(torch.tensor(probabilities, dtype=torch.float64), 1, generator=generator))
    return MUTATIONS[index]


# -- architecture ----------------------------------------------------------------------------


def add_layer(model_config: ModelConfig, max_layers: int) -> ModelConfig | None:
    """One more hidden layer as wide as the last (None at max_layers)."""
    sizes = model_config.hidden_sizes
    if len(sizes) >= max_layers or not sizes:
        return None
    return dataclasses.replace(model_config, hidden_sizes=(*sizes, sizes[-1]))


def add_nodes(model_config: ModelConfig, layer: int, count: int, max_nodes: int) -> ModelConfig | None:
    """``count`` more nodes in hidden layer ``layer``, capped at max_nodes (None when it is full)."""
    sizes = list(model_config.hidden_sizes)
    if sizes[layer] >= max_nodes:
        return None
    sizes[layer] = min(sizes[layer] + count, max_nodes)
    return dataclasses.replace(model_config, hidden_sizes=tuple(sizes))


@torch.no_grad()
def grow_state(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The state of a grown network that computes what ``old`` computed, with room to learn more.

    ``new`` gives the grown shapes. A tensor present in both keeps its old values in its leading
    block. Extra rows of a weight (a layer's new nodes) get orthogonal weights drawn from
    ``generator``; extra columns (the weights leaving new nodes) are 0, so the output does not
    change. A weight absent from ``old`` is a new layer: the identity, with zero bias.
    """
    grown: dict[str, torch.Tensor] = {}
    for name, target in new.items():
        source = old.get(name)
        if source is None:
            if target.dim() == 2:
                grown[name] = torch.eye(*target.shape, dtype=target.dtype, device=target.device)
            else:
                grown[name] = torch.zeros_like(target)
            continue
        if source.shape == target.shape:
            grown[name] = source.clone()
            continue
        value = torch.zeros_like(target)
        if target.dim() == 2:
            fresh = torch.empty(target.shape, dtype=target.dtype)
            nn.init.orthogonal_(fresh, gain=math.sqrt(2), generator=generator)
            rows = source.shape[0]
            value[rows:] = fresh[rows:].to(target.device)
            value[:, source.shape[1]:] = 0.0
        value[tuple(slice(0, size) for size in source.shape)] = source
        grown[name] = value
    return grown


def rebuild(agent: Agent, model_config: ModelConfig, build: Any, generator: torch.Generator) -> None:
    """Give ``agent`` networks of ``model_config`` that start from its current ones.

    ``build(config, model_config)`` makes a fresh algorithm. Where every parameter keeps its
    shape (an activation swap) the optimiser's moments carry over; a grown network starts a
    fresh optimiser (as AgileRL does), since moments of new weights do not exist.
    """
    old = agent.algorithm
    new = build(old.config, model_config)
    same_shapes = True
    for name, module in vars(old).items():
        if not isinstance(module, nn.Module):
            continue
        target = getattr(new, name)
        old_state, new_state = module.state_dict(), target.state_dict()
        if {key: value.shape for key, value in old_state.items()} != {k: v.shape for k, v in new_state.items()}:
            same_shapes = False
        target.load_state_dict(grow_state(old_state, new_state, generator))
    if same_shapes:
        new.optimizer.load_state_dict(old.optimizer.state_dict())
    else:
        for group in new.optimizer.param_groups:
            group["lr"] = old.config.lr
    new.updates = old.updates
    agent.algorithm = new
    agent.model_config = model_config


# -- parameters, activation, hyper-parameters ------------------------------------------------


def acting_parameters(algorithm: OfflineAlgorithm) -> list[nn.Parameter]:
    """The parameters that choose actions and train (an actor-critic's critic stays out)."""
    network = algorithm.network
    if hasattr(network, "actor_parameters"):
        return list(network.actor_parameters())
    return list(network.parameters())


@torch.no_grad()
def perturb_parameters(parameters: list[torch.Tensor], mutation_sd: float, generator: torch.Generator) -> None:
    """``w <- w * (1 + mutation_sd * N(0, 1))`` in place: noise relative to each weight's size."""
    for parameter in parameters:
        noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
        parameter.mul_(1.0 + mutation_sd * noise.to(parameter.device))


def other_activation(activation: str) -> str:
    choices = sorted(name for name in ACTIVATIONS if name != activation)
    return choices[0] if choices else activation


def mutate_value(value: float, space: RangeConfig, grow: bool, integer: bool) -> float:
    """``value`` times the grow or shrink factor, kept in ``[space.min, space.max]``.

    Integers move by at least 1, so a small batch or interval can change at all.
    """
    moved = value * (space.grow_factor if grow else space.shrink_factor)
    if integer:
        moved = max(round(moved), int(value) + 1) if grow else min(round(moved), int(value) - 1)
        return int(min(max(moved, math.ceil(space.min)), math.floor(space.max)))
    return float(min(max(moved, space.min), space.max))


def mutate_hyperparameter(agent: Agent, space: SpaceConfig, generator: torch.Generator) -> str:
    """Grow or shrink one of the agent's hyper-parameters (drawn uniformly); returns ``rl_hp:<name>``."""
    names = list(agent.hyperparameters)
    name = names[int(torch.randint(len(names), (1,), generator=generator))]
    grow = bool(torch.rand((), generator=generator) < 0.5)
    current, integer = agent.hyperparameters[name], name in INTEGER_HYPERPARAMETERS
    value = mutate_value(current, getattr(space, name), grow, integer)
    if value == current:  # at a bound of its range: move the other way
        value = mutate_value(current, getattr(space, name), not grow, integer)
    agent.set_hyperparameter(name, value)
    return name


def mutate(agent: Agent, kind: str, config: MutationConfig, space: SpaceConfig, build: Any,
           generator: torch.Generator) -> str:
    """Apply one mutation of ``kind`` to ``agent`` in place; returns what was done, for population.csv."""
    if kind == "architecture":
        if float(torch.rand((), generator=generator)) < config.new_layer:
            grown, label = add_layer(agent.model_config, config.max_layers), "add_layer"
        else:
            layer = int(torch.randint(len(agent.model_config.hidden_sizes), (1,), generator=generator))
            count = config.new_nodes[int(torch.randint(len(config.new_nodes), (1,), generator=generator))]
            grown, label = add_nodes(agent.model_config, layer, int(count), config.max_nodes), "add_nodes"
        if grown is None:
            return "none"
        rebuild(agent, grown, build, generator)
        return label
    if kind == "parameters":
        perturb_parameters(acting_parameters(agent.algorithm), config.mutation_sd, generator)
        return "parameters"
    if kind == "activation":
        activation = other_activation(agent.model_config.activation)
        if activation == agent.model_config.activation:
            return "none"
        rebuild(agent, dataclasses.replace(agent.model_config, activation=activation), build, generator)
        return "activation"
    if kind == "rl_hp":
        return mutate_hyperparameter(agent, space, generator)
    return "none"
