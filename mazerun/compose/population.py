"""``hpo=evolution``: a population of offline learners over one dataset, evolved by tournament and mutation.

One generation: every agent learns ``evo_steps`` steps (agents of one architecture and batch
size together, in one batched call per step: :mod:`mazerun.compose.cohort`), every agent plays
``eval_loop`` evaluation episodes on the same fixed seeds, and the next generation is drawn
(:mod:`mazerun.compose.evolution`). The search stops when every agent has taken ``max_steps`` learn
steps (counted per agent, as AgileRL does) or when the elite's fitness reaches ``target``.

The run directory holds what a training run holds, plus the search:

    best.pt          the best agent ever evaluated, a normal checkpoint (policy=torch_policy,
                     input_dir fine-tuning); its ``extra["hpo"]`` says which agent and generation
    last.pt          the current elite as a normal checkpoint, and in ``extra["population"]``
                     every agent (weights, targets, optimiser, hyper-parameters, architecture,
                     batch stream), the generation and the search's generator: input_dir=<run>
                     with hpo=evolution continues the search where it stopped, Ctrl-C included
    population.csv   one row per agent and generation: parent, mutation, hyper-parameters, fitness
    metrics.csv      and TensorBoard scalars under agent_<id>/{train,eval,hp} and population/

The selection metric the run returns is the best fitness reached.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from mazerun.acting.evaluation import evaluate
from mazerun.algorithms import algorithm_module
from mazerun.compose.cohort import Cohort, batchable, cohort_key, sample_batch
from mazerun.compose.evolution import (
    HYPERPARAMETERS,
    Agent,
    EvolutionConfig,
    draw_mutation,
    mutate,
    tournament_selection,
)
from mazerun.config.schemas import RunConfig
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write_bytes
from mazerun.core.progress import Progress
from mazerun.data.tensors import TransitionDataset, observation_stats, records_to_dataset, transitions_at
from mazerun.nn.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    Checkpoint,
    checkpoint_file,
    load_checkpoint,
    save_checkpoint,
)
from mazerun.nn.models import ModelConfig
from mazerun.training.metrics import MetricsLogger, copy_metrics_history
from mazerun.training.runsetup import TRAINING_STATE, RunSetup, TrainResult, model_config_dict, prepare
from mazerun.training.train import DEFAULT_THREADS

log = logging.getLogger(__name__)

POPULATION_CSV = "population.csv"
POPULATION_STATE = "population"
"""Key of ``last.pt``'s extra that holds the whole search."""
POPULATION_FORMAT = 1
FITNESS_METRIC = "fitness"
CSV_COLUMNS = ("generation", "agent", "parent", "mutation", "steps", *HYPERPARAMETERS, "hidden_sizes", "activation",
               "mean_return", "fitness", "elite")


@dataclass
class Search:
    """A search between two learn steps: everything ``last.pt`` holds to continue it."""

    agents: list[Agent]
    generator: torch.Generator
    """Every random choice of selection and mutation (CPU)."""
    next_id: int
    generation: int = 0
    phase: str = "train"
    """``train``: the agents learn up to this generation's end, then are evaluated; ``evaluated``: selection is next."""
    start_steps: int = 0
    """Learn steps per agent when this generation began."""
    best: dict[str, Any] | None = None
    """The best fitness ever reached: fitness, agent, generation, step."""
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return min(agent.steps for agent in self.agents)

    def elite(self, window: int) -> Agent:
        """The fittest agent now (the first among equals; the first agent before any evaluation)."""
        return max(self.agents, key=lambda agent: agent.fitness(window))


def train_population(config: RunConfig, run_dir: Path) -> TrainResult:
    """Run (or continue) the evolutionary search of ``config.hpo`` over ``config.algorithm`` in ``run_dir``."""
    algorithm_config = config.algorithm
    saved = _saved_search(config.input_dir, algorithm_config.name)
    setup = prepare(config, algorithm_config, run_dir, input_dir=None if saved else config.input_dir,
                    dataset=config.runner.dataset.dir_or_file)
    if setup.model_config.recurrent:
        source = f"input_dir {config.input_dir} holds a policy with memory ({setup.model_config.memory}) and " \
            if setup.start is not None else f"model.memory={setup.model_config.memory}: "
        raise MazerunError(f"{source}hpo=evolution trains agents without memory, which cannot carry a recurrent "
                           "state; drop model.memory, or train it with plain algorithm=... without hpo")
    if not isinstance(setup.action_space, gym.spaces.Discrete):
        # the cohort stacks Q-networks of discrete actions; Box IQL and CQL build other networks
        raise MazerunError(f"hpo=evolution searches learners of Discrete actions and {setup.env_id}'s actions are "
                           f"{setup.action_space}; train algorithm={algorithm_config.name} without hpo, or sweep its "
                           "settings with -m (Hydra's multirun)")
    hpo = config.hpo.resolved(algorithm_config, config.runner.eval_repeats)
    # Process-wide settings belong here, above the loop (as in mazerun.training.train): the initial
    # networks draw from torch's global generator; everything after draws from the search's own.
    torch.manual_seed(hpo.seed)
    torch.set_num_threads(DEFAULT_THREADS)
    data = _dataset(setup)
    population = Population(setup, hpo, data)
    if saved is not None:
        population.restore(saved)
    else:
        population.start()
    return population.run()


def _saved_search(input_dir: str | None, algorithm: str) -> Checkpoint | None:
    """The ``last.pt`` of an evolution run to continue, None for no input_dir or a policy to start from."""
    if not input_dir:
        return None
    checkpoint = load_checkpoint(checkpoint_file(input_dir, prefer=(LAST_CHECKPOINT, BEST_CHECKPOINT)))
    state = checkpoint.extra.get(POPULATION_STATE)
    if state is None:
        if checkpoint.algorithm == algorithm and TRAINING_STATE in checkpoint.extra:
            raise MazerunError(
                f"input_dir {input_dir} is a single {algorithm} run, not a population search: hpo=evolution "
                "continues only an evolution run's last.pt; drop input_dir, or drop hpo to continue that run"
            )
        return None
    if state.get("format") != POPULATION_FORMAT:
        raise MazerunError(f"{checkpoint.path} holds a population of format {state.get('format')}; "
                           f"this mazerun reads format {POPULATION_FORMAT}: start a new search")
    if checkpoint.algorithm != algorithm:
        raise MazerunError(
            f"input_dir {input_dir} holds a population of {checkpoint.algorithm} agents and algorithm={algorithm}; "
            f"continue it with algorithm={checkpoint.algorithm}"
        )
    return checkpoint


def _dataset(setup: RunSetup) -> TransitionDataset:
    config = setup.algorithm
    if config.validation_percentage:
        log.info("fitness is the evaluation return: every episode trains (%s.validation_percentage=%g is not used)",
                 setup.prefix, config.validation_percentage)
    data = records_to_dataset(setup.records, setup.vocabulary)
    log.info("dataset: %d episodes (%d transitions), shared by every agent", len(setup.records), len(data))
    return data.to(setup.device)


class Population:
    """The agents of one search, the dataset they share, and the run's outputs."""

    def __init__(self, setup: RunSetup, hpo: EvolutionConfig, data: TransitionDataset) -> None:
        self.setup, self.hpo, self.data = setup, hpo, data
        self.module = algorithm_module(setup.algorithm.name)
        self.network_type = self.module.Algorithm.network_type
        self.run_dir = setup.run_dir
        self.templates: dict[tuple, Any] = {}
        self.search: Search | None = None
        self.previous_dir: Path | None = None

    def build(self, config: Any, model_config: ModelConfig) -> Any:
        """A fresh agent's algorithm; its fast path, if any, checked against autograd for this architecture
        (a mutation that grows the network or swaps its activation builds one here too)."""
        setup = self.setup
        algorithm = self.module.Algorithm(config, dataclasses.replace(setup.spec, model_config=model_config))
        rows = torch.arange(min(int(config.batch_size), len(self.data)), device=self.data.device)
        problem = algorithm.check_fast_path(transitions_at(self.data, rows))
        if problem is not None:
            log.warning(problem)
        return algorithm

    def _batches(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.data.device)
        generator.manual_seed(seed)
        return generator

    def start(self) -> None:
        """Generation 0: ``population_size`` agents of the algorithm's settings, each with its own initial weights."""
        setup, hpo = self.setup, self.hpo
        generator = torch.Generator()
        generator.manual_seed(hpo.seed)
        statistics = None
        if setup.start is None and not isinstance(setup.observation_space, gym.spaces.Dict):
            statistics = observation_stats(self.data.observations)
        agents = []
        for index in range(hpo.population_size):
            algorithm = self.build(setup.algorithm, setup.model_config)
            if setup.start is not None:
                algorithm.load_network_state(setup.start.checkpoint.model_state)
            elif statistics is not None:
                algorithm.set_normalization(*statistics)
            seed = int(torch.randint(2**62, (1,), generator=generator))
            agents.append(Agent(id=index, algorithm=algorithm, model_config=setup.model_config,
                                generator=self._batches(seed)))
        self.search = Search(agents=agents, generator=generator, next_id=len(agents))
        log.info("population: %d %s agents, %d learn steps each, evolving every %d (%d evaluation episodes each)",
                 hpo.population_size, setup.algorithm.name, hpo.max_steps, hpo.evo_steps, hpo.eval_loop)

    def restore(self, checkpoint: Checkpoint) -> None:
        """The search saved in ``checkpoint`` (an evolution run's last.pt), exactly as it stopped."""
        state = checkpoint.extra[POPULATION_STATE]
        hpo = self.hpo
        if len(state["agents"]) != hpo.population_size:
            raise MazerunError(
                f"{checkpoint.path} holds {len(state['agents'])} agents and hpo.population_size={hpo.population_size}; "
                f"continue with hpo.population_size={len(state['agents'])}"
            )
        if checkpoint.env_id != self.setup.env_id:
            raise MazerunError(f"{checkpoint.path} searched in {checkpoint.env_id} and this run trains in "
                               f"{self.setup.env_id}; use the same env and dataset to continue")
        agents = []
        for saved in state["agents"]:
            model_config = ModelConfig.from_dict(saved["model_config"])
            config = dataclasses.replace(self.setup.algorithm, **{
                HYPERPARAMETERS[name]: value for name, value in saved["hyperparameters"].items()})
            algorithm = self.build(config, model_config)
            algorithm.network.load_state_dict(saved["network"])
            algorithm.load_training_state(saved["training_state"])
            batches = torch.Generator(device=self.data.device)
            batches.set_state(saved["sampler"])
            agents.append(Agent(
                id=int(saved["id"]), algorithm=algorithm, model_config=model_config, generator=batches,
                parent=saved["parent"], mutation=saved["mutation"], steps=int(saved["steps"]),
                fitnesses=[float(value) for value in saved["fitnesses"]], window=dict(saved["window"]),
                window_size=int(saved["window_size"]),
            ))
        generator = torch.Generator()
        generator.set_state(state["generator"])
        self.search = Search(
            agents=agents, generator=generator, next_id=int(state["next_id"]), generation=int(state["generation"]),
            phase=state["phase"], start_steps=int(state["start_steps"]), best=state["best"], rows=list(state["rows"]),
        )
        self.previous_dir = checkpoint.path.parent
        log.info("continuing the search of %s: generation %d, %d learn steps per agent", checkpoint.path,
                 self.search.generation, self.search.steps)

    # -- the loop ------------------------------------------------------------------------------

    def finished(self) -> str | None:
        """Why the search stops after this evaluation, or None."""
        search, hpo = self.search, self.hpo
        if search.steps >= hpo.max_steps:
            return f"every agent took hpo.max_steps={hpo.max_steps} learn steps"
        elite = search.elite(hpo.fitness_window).fitness(hpo.fitness_window)
        if hpo.target is not None and elite >= hpo.target:
            return f"the elite's fitness {elite:.4g} reached hpo.target={hpo.target:g}"
        return None

    def run(self) -> TrainResult:
        search, hpo = self.search, self.hpo
        if search.phase == "evaluated" and self.finished():
            raise MazerunError(
                f"the search in {self.previous_dir} already stopped ({self.finished()}); raise hpo.max_steps "
                "(or hpo.target) to search longer"
            )
        if self.previous_dir is not None:
            copy_metrics_history(self.previous_dir, self.run_dir, self._logged_up_to())
            best = self.previous_dir / BEST_CHECKPOINT
            if best.is_file():  # the best so far stays the run's best.pt until an agent beats it
                atomic_write_bytes(self.run_dir / BEST_CHECKPOINT, best.read_bytes())
        self._write_population_csv()
        total = hpo.population_size * hpo.max_steps
        done = sum(min(agent.steps, hpo.max_steps) for agent in search.agents)
        reason = None
        try:
            with MetricsLogger(self.run_dir, console=False) as logger, interrupts.deferred(), \
                    Progress(total, initial=done, unit="step", desc=f"{self.setup.algorithm.name} x{hpo.population_size}") \
                    as bar:
                while True:
                    if search.phase == "train":
                        self._train_generation(bar)
                        self._evaluate_generation(logger)
                        self._save_last()
                    reason = self.finished()
                    if reason:
                        break
                    self._evolve()
                    self._save_last()
        except KeyboardInterrupt as interrupt:
            self._save_last()
            stopped = str(interrupt) or "stopped"
            raise interrupts.restated(interrupt, (
                f"{stopped} in generation {search.generation} at {search.steps} learn steps per agent; "
                f"{self.run_dir / LAST_CHECKPOINT} holds the population (continue with input_dir={self.run_dir})"
            )) from None
        best = search.best or {}
        log.info("done: %s; best.pt holds agent %s of generation %s (fitness %.4g); population.csv in %s",
                 reason, best.get("agent"), best.get("generation"), best.get(FITNESS_METRIC, math.nan), self.run_dir)
        result = TrainResult(
            run_dir=str(self.run_dir), algorithm=self.setup.algorithm.name, metric=FITNESS_METRIC, mode="max",
            best=best.get(FITNESS_METRIC), step=search.steps, global_step=search.steps, env_id=self.setup.env_id,
        )
        result.write()
        return result

    def _logged_up_to(self) -> int:
        """Metrics are logged at evaluations: the last one took place at this step count."""
        search = self.search
        return search.steps if search.phase == "evaluated" else search.start_steps

    def _train_generation(self, bar: Progress) -> None:
        """Every agent learns up to this generation's end: cohorts of equal architecture together, others alone."""
        search, hpo = self.search, self.hpo
        end = min(search.start_steps + hpo.evo_steps, hpo.max_steps)
        groups: dict[tuple, list[Agent]] = defaultdict(list)
        for agent in search.agents:
            kind = cohort_key(agent) if batchable(agent) else ("alone", agent.id)
            groups[(kind, agent.steps)].append(agent)
        for (key, steps), agents in groups.items():
            if steps >= end:
                continue
            if len(agents) > 1:
                self._train_cohort(agents, end - steps, key, bar)
            else:
                self._train_alone(agents[0], end - steps, bar)

    def _train_cohort(self, agents: list[Agent], steps: int, key: tuple, bar: Progress) -> None:
        template = self.templates.get(key)
        if template is None:
            template = self.templates[key] = self.build(agents[0].algorithm.config, agents[0].model_config)
        template.config = agents[0].algorithm.config
        cohort = Cohort(agents, template)
        sums: dict[str, torch.Tensor] = {}
        taken = 0
        try:
            for _ in range(steps):
                interrupts.check()
                metrics = cohort.learn(self.data)
                for name, value in metrics.items():
                    sums[name] = sums[name] + value if name in sums else value.clone()
                taken += 1
                bar.update(len(agents))
        finally:
            cohort.write_back()
            values = {name: value.tolist() for name, value in sums.items()}
            for index, agent in enumerate(agents):
                agent.steps += taken
                agent.window_size += taken
                for name, column in values.items():
                    agent.window[name] = agent.window.get(name, 0.0) + column[index]

    def _train_alone(self, agent: Agent, steps: int, bar: Progress) -> None:
        config = agent.algorithm.config
        sums: dict[str, torch.Tensor] = {}
        taken = 0
        try:
            for _ in range(steps):
                interrupts.check()
                batch = sample_batch(self.data, int(config.batch_size), agent.generator)
                metrics = agent.algorithm.learn(batch)
                for name, value in metrics.items():
                    sums[name] = sums[name] + value if name in sums else value.clone()
                taken += 1
                bar.update(1)
        finally:
            agent.steps += taken
            agent.window_size += taken
            for name, value in sums.items():
                agent.window[name] = agent.window.get(name, 0.0) + float(value)

    def _evaluate_generation(self, logger: MetricsLogger) -> None:
        """Score every agent on the same seeds; log, tabulate and keep the best."""
        search, hpo, setup = self.search, self.hpo, self.setup
        evaluations = []
        for agent in search.agents:
            interrupts.check()
            result = evaluate(
                agent.algorithm.network, setup.env_id, hpo.eval_loop, observation_space=setup.observation_space,
                vocabulary=setup.vocabulary, device=setup.device, max_episode_steps=setup.runner.max_episode_steps,
            )
            evaluations.append(result.metrics())
        for agent, evaluation in zip(search.agents, evaluations):
            agent.fitnesses.append(evaluation["mean_return"])
        elite = search.elite(hpo.fitness_window)
        step = search.steps
        rows = []
        for agent, evaluation in zip(search.agents, evaluations):
            fitness = agent.fitness(hpo.fitness_window)
            train = {name: total / agent.window_size for name, total in agent.window.items()} if agent.window_size else {}
            logger.log(step, train, f"agent_{agent.id}/train")
            logger.log(step, {**evaluation, FITNESS_METRIC: fitness}, f"agent_{agent.id}/eval")
            logger.log(step, agent.hyperparameters, f"agent_{agent.id}/hp")
            agent.window, agent.window_size = {}, 0
            rows.append(self._row(agent, evaluation["mean_return"], fitness, agent is elite))
        fitnesses = [agent.fitness(hpo.fitness_window) for agent in search.agents]
        logger.log(step, {"best_fitness": max(fitnesses), "mean_fitness": sum(fitnesses) / len(fitnesses),
                          "generation": search.generation, "elite": elite.id}, "population")
        search.rows.extend(rows)
        self._write_population_csv()
        print(generation_table(search.generation, step, rows), flush=True)
        elite_fitness = elite.fitness(hpo.fitness_window)
        if math.isfinite(elite_fitness) and (search.best is None or elite_fitness > search.best[FITNESS_METRIC]):
            search.best = {FITNESS_METRIC: elite_fitness, "agent": elite.id, "generation": search.generation,
                           "step": step}
            self._save(self.run_dir / BEST_CHECKPOINT, elite, None)
            log.info("-> new best agent %d of generation %d, fitness %.4g, saved %s", elite.id, search.generation,
                     elite_fitness, BEST_CHECKPOINT)
        search.phase = "evaluated"

    def _evolve(self) -> None:
        """The next generation: tournament selection, then one mutation (or none) per copy; the elite unchanged."""
        search, hpo = self.search, self.hpo
        fitnesses = [agent.fitness(hpo.fitness_window) for agent in search.agents]
        parents = tournament_selection(fitnesses, hpo.tournament_size, hpo.elitism, search.generator)
        children, taken = [], set()
        for slot, index in enumerate(parents):
            parent = search.agents[index]
            if parent.id in taken:
                child_id, search.next_id = search.next_id, search.next_id + 1
            else:
                child_id = parent.id
                taken.add(parent.id)
            elite = hpo.elitism and slot == 0
            child = parent.clone(child_id, None if elite else search.generator)
            if elite:
                child.mutation = "elite"
            else:
                kind = draw_mutation(hpo.mutation, search.generator)
                child.mutation = mutate(child, kind, hpo.mutation, hpo.space, self.build, search.generator)
            children.append(child)
        search.agents = children
        search.generation += 1
        search.start_steps = search.steps
        search.phase = "train"

    # -- outputs -------------------------------------------------------------------------------

    def _row(self, agent: Agent, mean_return: float, fitness: float, elite: bool) -> dict[str, Any]:
        hyperparameters = agent.hyperparameters
        return {
            "generation": self.search.generation, "agent": agent.id,
            "parent": "" if agent.parent is None else agent.parent, "mutation": agent.mutation,
            "steps": agent.steps, **{name: hyperparameters.get(name, "") for name in HYPERPARAMETERS},
            "hidden_sizes": "x".join(str(size) for size in agent.model_config.hidden_sizes),
            "activation": agent.model_config.activation, "mean_return": mean_return, "fitness": fitness,
            "elite": int(elite),
        }

    def _write_population_csv(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(self.search.rows)
        atomic_write_bytes(self.run_dir / POPULATION_CSV, text.getvalue().encode())

    def _agent_state(self, agent: Agent) -> dict[str, Any]:
        return {
            "id": agent.id, "parent": agent.parent, "mutation": agent.mutation, "steps": agent.steps,
            "fitnesses": list(agent.fitnesses), "window": dict(agent.window), "window_size": agent.window_size,
            "hyperparameters": agent.hyperparameters,
            "model_config": model_config_dict(agent.model_config, self.network_type),
            "network": {key: value.detach().cpu() for key, value in agent.algorithm.network.state_dict().items()},
            "training_state": _to_cpu(agent.algorithm.training_state()),
            "sampler": agent.generator.get_state(),
        }

    def _save_last(self) -> None:
        search = self.search
        state = {
            "format": POPULATION_FORMAT, "generation": search.generation, "phase": search.phase,
            "start_steps": search.start_steps, "next_id": search.next_id, "generator": search.generator.get_state(),
            "best": search.best, "rows": search.rows, "agents": [self._agent_state(agent) for agent in search.agents],
        }
        self._save(self.run_dir / LAST_CHECKPOINT, search.elite(self.hpo.fitness_window), state)

    def _save(self, path: Path, agent: Agent, population: dict[str, Any] | None) -> None:
        """A normal checkpoint of ``agent``'s acting network; ``population`` adds the whole search (last.pt)."""
        setup, search = self.setup, self.search
        extra: dict[str, Any] = {
            "step": agent.steps, "global_step": agent.steps, "dataset": setup.dataset_sources,
            "best": {FITNESS_METRIC: None if search.best is None else search.best[FITNESS_METRIC]},
            "hpo": {"agent": agent.id, "generation": search.generation, "hyperparameters": agent.hyperparameters,
                    FITNESS_METRIC: agent.fitness(self.hpo.fitness_window) if agent.fitnesses else None},
        }
        if population is not None:
            extra[POPULATION_STATE] = population
        save_checkpoint(
            path,
            model_state={key: value.detach().cpu() for key, value in agent.algorithm.network.state_dict().items()},
            model_config=model_config_dict(agent.model_config, self.network_type),
            observation_space=setup.observation_space, action_space=setup.action_space, env_id=setup.env_id,
            algorithm=setup.algorithm.name,
            vocabulary=setup.vocabulary.to_list() if setup.vocabulary is not None else None,
            extra=extra,
        )


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def generation_table(generation: int, step: int, rows: list[dict[str, Any]]) -> str:
    """The console's table of one generation: one line per agent, the elite marked with *."""
    columns = [column for column in ("agent", "parent", "mutation", *HYPERPARAMETERS, "hidden_sizes", "activation",
                                     "mean_return", "fitness") if any(row.get(column, "") != "" for row in rows)]
    cells = [[_format(row[column]) + ("*" if column == "fitness" and row["elite"] else "") for column in columns]
             for row in rows]
    widths = [max(len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(columns)]
    lines = [f"generation {generation} ({step} learn steps per agent)",
             "  ".join(column.rjust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)

