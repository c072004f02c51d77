"""Evolutionary search: selection and mutations on tiny networks, the batched update, `run ... hpo=evolution`, bad input."""

from __future__ import annotations

import copy
import csv
import dataclasses
import signal
import time
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok, spawn_cli

from mazerun.acting.rollout import rollout
from mazerun.algorithms import algorithm_module, bc, cql, iql, searchable_algorithms
from mazerun.algorithms.base import ValueLearningConfig
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.compose.cohort import Cohort, gather
from mazerun.compose.evolution import (
    Agent,
    MutationConfig,
    RangeConfig,
    SpaceConfig,
    acting_parameters,
    add_layer,
    add_nodes,
    draw_mutation,
    mutate,
    mutate_value,
    tournament_selection,
)
from mazerun.compose.validation import validate
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.core.errors import MazerunError
from mazerun.data.records import load_records
from mazerun.data.tensors import TransitionDataset
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.nn.models import ModelConfig, build_network

OBSERVATIONS = gym.spaces.Box(-1.0, 1.0, (3,))
ACTIONS = gym.spaces.Discrete(3)
CPU = torch.device("cpu")
TINY = ModelConfig(kind="vector_obs", hidden_sizes=(4, 3), activation="relu")
MODULES = {name: algorithm_module(name) for name in searchable_algorithms()}
"""Every algorithm a population can train, as the registry says."""


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def builder(module):
    return lambda config, model_config: module.Algorithm(config, AlgorithmSpec(OBSERVATIONS, ACTIONS, model_config))


def tiny_agent(module=cql, model_config: ModelConfig = TINY, seed: int = 0, **config) -> Agent:
    torch.manual_seed(seed)
    algorithm = builder(module)(module.Config(batch_size=5, **config), model_config)
    return Agent(id=seed, algorithm=algorithm, model_config=model_config, generator=generator(seed))


def tiny_data(size: int = 40) -> TransitionDataset:
    rows = generator(1)
    return TransitionDataset(
        observations=torch.randn(size, 3, generator=rows), actions=torch.randint(0, 3, (size,), generator=rows),
        rewards=torch.randn(size, generator=rows), next_observations=torch.randn(size, 3, generator=rows),
        dones=(torch.rand(size, generator=rows) < 0.2).float(), episode_ids=torch.zeros(size, dtype=torch.long),
    )


def train_steps(agent: Agent, data: TransitionDataset, steps: int = 2) -> None:
    for _ in range(steps):
        index = torch.randint(len(data), (agent.algorithm.config.batch_size,), generator=agent.generator)
        agent.algorithm.update(gather(data, index))


# -- selection -------------------------------------------------------------------------------


def test_tournament_selection_keeps_the_elite_and_never_picks_the_worst_of_a_pair() -> None:
    fitnesses = [1.0, 5.0, 3.0, 5.0]
    parents = tournament_selection(fitnesses, 2, True, generator(0))
    assert len(parents) == 4 and parents[0] == 1  # the fittest, the first of equals
    assert 0 not in parents  # every pair it is drawn in holds a fitter agent
    assert tournament_selection(fitnesses, 4, False, generator(0)) == [1, 1, 1, 1]
    assert tournament_selection(fitnesses, 2, True, generator(7)) == tournament_selection(fitnesses, 2, True, generator(7))
    drawn = {tuple(tournament_selection(fitnesses, 1, False, generator(seed))) for seed in range(20)}
    assert len(drawn) > 1 and all(set(parents) <= {0, 1, 2, 3} for parents in drawn)


def test_mutation_kinds_follow_their_probabilities() -> None:
    assert {draw_mutation(MutationConfig(no_mutation=0, architecture=0, parameters=1, activation=0, rl_hp=0),
                          generator(seed)) for seed in range(10)} == {"parameters"}
    # Whatever the probabilities leave to 1 goes to no mutation.
    assert {draw_mutation(MutationConfig(no_mutation=0, architecture=0, parameters=0, activation=0, rl_hp=0),
                          generator(seed)) for seed in range(10)} == {"no_mutation"}
    config = MutationConfig()
    assert [draw_mutation(config, generator(3)) for _ in range(5)] == [draw_mutation(config, generator(3)) for _ in range(5)]


# -- mutations on tiny networks --------------------------------------------------------------


def test_add_layer_keeps_what_a_relu_network_computes_and_stops_at_max_layers() -> None:
    agent = tiny_agent()
    observations = torch.randn(6, 3, generator=generator(2))
    before = agent.algorithm.network(observations)
    label = mutate(agent, "architecture", MutationConfig(new_layer=1.0, max_layers=3), SpaceConfig(), builder(cql),
                   generator(0))
    assert label == "add_layer" and agent.model_config.hidden_sizes == (4, 3, 3)
    state = agent.algorithm.network.state_dict()
    assert torch.equal(state["trunk.4.weight"], torch.eye(3)) and torch.equal(state["trunk.4.bias"], torch.zeros(3))
    assert torch.allclose(agent.algorithm.network(observations), before, atol=1e-6)
    assert agent.algorithm.target_network.state_dict()["trunk.4.weight"].shape == (3, 3)
    assert mutate(agent, "architecture", MutationConfig(new_layer=1.0, max_layers=3), SpaceConfig(), builder(cql),
                  generator(0)) == "none"
    assert add_layer(agent.model_config, max_layers=3) is None


def test_add_nodes_keeps_the_function_within_max_nodes() -> None:
    agent = tiny_agent(model_config=dataclasses.replace(TINY, activation="tanh"))
    observations = torch.randn(6, 3, generator=generator(2))
    before = agent.algorithm.network(observations)
    assert add_nodes(agent.model_config, 0, 16, max_nodes=10).hidden_sizes == (10, 3)
    assert add_nodes(ModelConfig(kind="vector_obs", hidden_sizes=(10, 3)), 0, 16, max_nodes=10) is None
    label = mutate(agent, "architecture", MutationConfig(new_layer=0.0, max_nodes=10, new_nodes=[16]), SpaceConfig(),
                   builder(cql), generator(0))
    assert label == "add_nodes" and max(agent.model_config.hidden_sizes) == 10
    assert all(size <= 10 for size in agent.model_config.hidden_sizes)
    # The new nodes' outgoing weights start at 0: even a tanh network computes what it did.
    assert torch.allclose(agent.algorithm.network(observations), before, atol=1e-6)
    again = tiny_agent(model_config=dataclasses.replace(TINY, activation="tanh"))
    mutate(again, "architecture", MutationConfig(new_layer=0.0, max_nodes=10, new_nodes=[16]), SpaceConfig(),
           builder(cql), generator(0))
    for (name, value), other in zip(agent.algorithm.network.state_dict().items(),
                                    again.algorithm.network.state_dict().values()):
        assert torch.equal(value, other), name  # reproducible per seed


def test_parameter_noise_is_relative_reproducible_and_spares_the_target() -> None:
    agents = [tiny_agent(), tiny_agent()]
    before = [parameter.clone() for parameter in acting_parameters(agents[0].algorithm)]
    target = copy.deepcopy(agents[0].algorithm.target_network.state_dict())
    for agent in agents:
        assert mutate(agent, "parameters", MutationConfig(mutation_sd=0.1), SpaceConfig(), builder(cql),
                      generator(5)) == "parameters"
    after = acting_parameters(agents[0].algorithm)
    assert all(torch.equal(a, b) for a, b in zip(after, acting_parameters(agents[1].algorithm)))
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    for old, new in zip(before, after):  # zero weights (biases) stay zero: the noise scales each weight
        assert torch.equal(new[old == 0], old[old == 0])
    assert all(torch.equal(value, agents[0].algorithm.target_network.state_dict()[key]) for key, value in target.items())
    unchanged = tiny_agent()
    mutate(unchanged, "parameters", MutationConfig(mutation_sd=0.0), SpaceConfig(), builder(cql), generator(5))
    assert all(torch.equal(a, b) for a, b in zip(acting_parameters(unchanged.algorithm), before))


def test_activation_mutation_swaps_the_activation_and_keeps_weights_and_moments() -> None:
    agent = tiny_agent(module=iql)
    train_steps(agent, tiny_data())
    weights = copy.deepcopy(agent.algorithm.network.state_dict())
    moments = copy.deepcopy(agent.algorithm.optimizer.state_dict()["state"])
    assert mutate(agent, "activation", MutationConfig(), SpaceConfig(), builder(iql), generator(0)) == "activation"
    assert agent.model_config.activation == "tanh"
    assert isinstance(agent.algorithm.network.actor_trunk[1], torch.nn.Tanh)
    assert all(torch.equal(value, agent.algorithm.network.state_dict()[key]) for key, value in weights.items())
    state = agent.algorithm.optimizer.state_dict()["state"]
    assert all(torch.equal(moments[key]["exp_avg"], state[key]["exp_avg"]) for key in moments)


def test_hyperparameter_mutations_move_by_their_factors_within_range() -> None:
    assert mutate_value(3e-4, RangeConfig(1e-5, 1e-2, 1.2, 0.8), grow=True, integer=False) == pytest.approx(3.6e-4)
    assert mutate_value(3e-4, RangeConfig(1e-5, 1e-2, 1.2, 0.8), grow=False, integer=False) == pytest.approx(2.4e-4)
    assert mutate_value(9e-3, RangeConfig(1e-5, 1e-2, 1.2, 0.8), grow=True, integer=False) == 1e-2
    assert mutate_value(256, RangeConfig(32, 1024, 1.2, 0.8), grow=True, integer=True) == 307
    assert mutate_value(1, RangeConfig(1, 2000, 1.5, 0.75), grow=True, integer=True) == 2  # integers move by >= 1
    assert mutate_value(1, RangeConfig(1, 2000, 1.5, 0.75), grow=False, integer=True) == 1
    space = SpaceConfig(batch_size=RangeConfig(1, 64))
    for seed in range(30):
        agent = tiny_agent(lr=1e-2, tau=1.0, gamma=0.999)  # at the top of their ranges: they can only shrink
        name = mutate(agent, "rl_hp", MutationConfig(), space, builder(cql), generator(seed))
        values = agent.hyperparameters
        assert name in values
        for key, value in values.items():
            assert getattr(space, key).min <= value <= getattr(space, key).max
        assert agent.algorithm.optimizer.param_groups[0]["lr"] == values["lr"]
        if name in ("lr", "tau", "gamma"):
            assert values[name] < {"lr": 1e-2, "tau": 1.0, "gamma": 0.999}[name]
    assert set(tiny_agent(module=bc).hyperparameters) == {"lr", "batch_size"}


@pytest.mark.parametrize("kind", ["architecture", "parameters", "activation", "rl_hp"])
@pytest.mark.parametrize("name", searchable_algorithms())
def test_a_mutated_copy_owns_an_optimiser_of_its_own_parameters(name: str, kind: str) -> None:
    module = MODULES[name]
    parent = tiny_agent(module=module)
    data = tiny_data()
    train_steps(parent, data)
    child = parent.clone(9, generator(1))
    mutate(child, kind, MutationConfig(new_layer=0.5), SpaceConfig(), builder(module), generator(4))
    optimizer = child.algorithm.optimizer
    optimised = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    own = {id(parameter) for value in vars(child.algorithm).values() if isinstance(value, torch.nn.Module)
           for parameter in value.parameters()}
    parents = {id(parameter) for value in vars(parent.algorithm).values() if isinstance(value, torch.nn.Module)
               for parameter in value.parameters()}
    assert all(id(parameter) in own and id(parameter) not in parents for parameter in optimised)
    assert {id(parameter) for parameter in acting_parameters(child.algorithm)} <= {id(p) for p in optimised}
    for parameter in optimised:
        for value in optimizer.state.get(parameter, {}).values():
            assert value.dim() == 0 or value.shape == parameter.shape
    assert optimizer.param_groups[0]["lr"] == child.algorithm.config.lr
    before = [parameter.clone() for parameter in acting_parameters(child.algorithm)]
    train_steps(child, data, steps=1)
    assert any(not torch.equal(a, b) for a, b in zip(before, acting_parameters(child.algorithm)))


# -- the batched update ----------------------------------------------------------------------


@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_a_cohort_that_copies_its_targets_rarely_reads_their_values_from_a_table(matmul_dtype: str) -> None:
    """Batch 5, 40 rows, a copy every 8 steps: 8 x 5 >= 40, so the target's values come from a table over
    the data, refreshed after each copy; through two copies the steps equal those that run the target pass."""
    data = tiny_data()
    agents = [tiny_agent(seed=seed, lr=1e-2, target_update_interval=8, matmul_dtype=matmul_dtype) for seed in (0, 1)]
    twins = [copy.deepcopy(agent) for agent in agents]
    template = builder(cql)(agents[0].algorithm.config, TINY)
    with_table, without = Cohort(agents, template), Cohort(twins, template)
    for _ in range(20):
        metrics, expected = with_table.learn(data), without.step(without.sample(data))
        for name, value in expected.items():
            assert torch.allclose(metrics[name], value, rtol=1e-5, atol=1e-6), name
    assert with_table._target_table is not None and without._target_table is None
    assert torch.allclose(with_table.flat, without.flat, atol=1e-6)
    often = Cohort([copy.deepcopy(agent) for agent in twins], template)
    often.intervals = [7, 8]  # 7 x 5 < 40: a refresh would cost more than it saves
    often.learn(data)
    assert often._target_table is None


FAST_PATH_VARIANTS = {"cql_bfloat16": ("cql", {"matmul_dtype": "bfloat16"}), "cql_autograd": ("cql", {"fused": False})}
"""CQL's cohort step in bfloat16, and without its hand-written step (vmap and autograd, like the others)."""


@pytest.mark.parametrize("variant", [*searchable_algorithms(), *FAST_PATH_VARIANTS])
def test_the_batched_update_equals_per_agent_updates(variant: str) -> None:
    """CQL's cohort steps by hand (mazerun.fast.fused; in bfloat16 too), with fused=false through vmap and autograd
    like the others."""
    name, fast_path = FAST_PATH_VARIANTS.get(variant, (variant, {}))
    module = MODULES[name]
    data = tiny_data()
    settings = [{"lr": 1e-2, **fast_path}, {"lr": 3e-3, **fast_path}, {"lr": 5e-3, **fast_path}]
    if issubclass(module.Config, ValueLearningConfig):  # each agent its own discount and target schedule
        settings = [{**values, "gamma": gamma, "tau": tau, "target_update_interval": interval}
                    for values, gamma, tau, interval in zip(settings, (0.9, 0.95, 0.99), (1.0, 0.5, 0.1), (2, 1, 3))]
    agents = [tiny_agent(module=module, seed=seed, **values) for seed, values in enumerate(settings)]
    references = [copy.deepcopy(agent) for agent in agents]
    template = builder(module)(agents[0].algorithm.config, TINY)
    cohort = Cohort(agents, template)
    assert (cohort.stack is not None) == (variant in ("cql", "cql_bfloat16"))
    for _ in range(6):
        metrics = cohort.step(cohort.sample(data))
        for index, reference in enumerate(references):
            index_batch = torch.randint(len(data), (5,), generator=reference.generator)
            expected = reference.algorithm.update(gather(data, index_batch))
            for metric, value in metrics.items():
                assert value[index].item() == pytest.approx(expected[metric].item(), rel=1e-4, abs=1e-5), metric
    cohort.write_back()
    for agent, reference in zip(agents, references):
        assert agent.algorithm.updates == reference.algorithm.updates == 6
        for attribute, module_value in vars(reference.algorithm).items():
            if isinstance(module_value, torch.nn.Module):
                mine = getattr(agent.algorithm, attribute).state_dict()
                for key, value in module_value.state_dict().items():
                    assert torch.allclose(mine[key], value, atol=1e-5), f"{attribute}.{key}"
        mine, theirs = agent.algorithm.optimizer.state_dict(), reference.algorithm.optimizer.state_dict()
        for key, state in theirs["state"].items():
            for entry, value in state.items():
                assert torch.allclose(mine["state"][key][entry], value, atol=1e-6), entry


# -- end to end through `run` ----------------------------------------------------------------

QUICK = ("runner.eval_repeats=2", "runner.max_episode_steps=60", "model.hidden_sizes=[16,16]")


@pytest.fixture(scope="module")
def lunar_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lunar_noisy")
    rollout("LunarLander-v3", PolicyConfig(epsilon=0.3),
            RunnerConfig(type="sequential", n_episodes=4, max_episode_steps=100), directory, print_fn=lambda _: None)
    return directory / "trajectory_data"


def population_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "population.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_an_evolution_run_ends_in_best_last_and_population_csv(workdir: Path, lunar_records: Path) -> None:
    result = run_ok("-cn", "conf_train", "algorithm=cql", "hpo=evolution", f"runner.dataset.dir_or_file={lunar_records}",
                    "hpo.max_steps=30", "hpo.evo_steps=10", "hpo.mutation.architecture=0.4", "hpo.mutation.no_mutation=0",
                    *QUICK, cwd=workdir)
    assert "generation 2 (30 learn steps per agent)" in result.stdout and "fitness" in result.stdout
    run_dir = newest_run_dir(workdir)
    rows = population_rows(run_dir)
    assert [int(row["generation"]) for row in rows] == [0] * 4 + [1] * 4 + [2] * 4
    assert set(rows[0]) >= {"generation", "agent", "parent", "mutation", "lr", "batch_size", "learn_step", "gamma",
                            "tau", "hidden_sizes", "fitness"}
    assert [row["mutation"] for row in rows[4:8]][0] == "elite"
    assert sum(int(row["elite"]) for row in rows) == 3

    payload = torch.load(run_dir / "best.pt", weights_only=True)
    best = load_checkpoint(run_dir / "best.pt")
    values = dict(best.model_config)
    network = build_network(values.pop("network"), ModelConfig(**values), best.observation_space, best.action_space)
    network.load_state_dict(payload["model_state"])
    assert best.algorithm == "cql" and best.extra["hpo"]["fitness"] == max(float(row["fitness"]) for row in rows)
    last = load_checkpoint(run_dir / "last.pt")
    population = last.extra["population"]
    assert population["generation"] == 2 and len(population["agents"]) == 4
    assert all(agent["steps"] == 30 and "state" in agent["training_state"]["optimizer"] for agent in population["agents"])
    metrics = {(row["group"], row["metric"]) for row in csv.DictReader(open(run_dir / "metrics.csv"))}
    assert ("agent_0/eval", "fitness") in metrics and ("population", "best_fitness") in metrics
    assert ("agent_0/train", "td_loss") in metrics and ("agent_0/hp", "lr") in metrics
    assert list(run_dir.glob("events.out.tfevents.*"))

    run_ok("policy=torch_policy", f"input_dir={run_dir}", "runner.n_episodes=1", "runner.max_episode_steps=20",
           "runner.n_workers=1", cwd=workdir)
    assert load_records(newest_run_dir(workdir) / "trajectory_data")[0].policy == "torch_policy:cql"


def test_a_search_stopped_by_sigint_continues_its_generations(workdir: Path, lunar_records: Path) -> None:
    common = ("-cn", "conf_train", "algorithm=iql", "hpo=evolution", f"runner.dataset.dir_or_file={lunar_records}",
              "hpo.evo_steps=4", "runner.eval_repeats=1", "runner.max_episode_steps=20", "model.hidden_sizes=[8]")
    with spawn_cli(*common, "hpo.max_steps=1000000", cwd=workdir) as process:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            csv_files = list(workdir.glob("outputs/*/*/population.csv"))
            if csv_files and len(csv_files[0].read_text().splitlines()) > 9:  # two generations evaluated
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "holds the population (continue with input_dir=" in stderr and "Traceback" not in stderr
    stopped = newest_run_dir(workdir)
    saved = load_checkpoint(stopped / "last.pt").extra["population"]
    generation, steps = saved["generation"], min(agent["steps"] for agent in saved["agents"])
    assert generation >= 1

    run_ok(*common, f"hpo.max_steps={steps + 8}", f"input_dir={stopped}", cwd=workdir)
    resumed = newest_run_dir(workdir)
    assert resumed != stopped
    generations = [int(row["generation"]) for row in population_rows(resumed)]
    assert generations[:4] == [0] * 4  # the history came along
    assert max(generations) > generation and generations == sorted(generations)
    assert len(generations) == 4 * len(set(generations))
    assert load_checkpoint(resumed / "best.pt").extra["hpo"]["fitness"] >= \
        load_checkpoint(stopped / "best.pt").extra["hpo"]["fitness"]
    final = load_checkpoint(resumed / "last.pt").extra["population"]
    assert final["generation"] > generation and all(agent["steps"] == steps + 8 for agent in final["agents"])


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(("hpo", "message"), [
    ({"population_size": 1}, "hpo.population_size=1 must be at least 2"),
    ({"population_size": 3, "tournament_size": 4}, "hpo.tournament_size=4 is larger than hpo.population_size=3"),
    ({"mutation": {"rl_hp": 1.5}}, "hpo.mutation.rl_hp=1.5 must lie in [0, 1]"),
    ({"mutation": {"parameters": -0.1}}, "hpo.mutation.parameters=-0.1 must lie in [0, 1]"),
    ({"mutation": {"no_mutation": 0.5, "rl_hp": 0.6}}, "hpo.mutation probabilities sum to 1.5 > 1"),
    ({"space": {"lr": {"min": 1e-3, "max": 1e-3}}}, "hpo.space.lr is empty (min=0.001, max=0.001)"),
    ({"space": {"batch_size": {"min": 512, "max": 64}}}, "hpo.space.batch_size is inverted (min=512, max=64)"),
    ({"space": {"lr": {"min": 1e-2, "max": 1e-1}}}, "algorithm.lr=0.0003 lies outside hpo.space.lr [0.01, 0.1]"),
    ({"evo_steps": 0}, "hpo.evo_steps=0 must be at least 1"),
])
def test_bad_search_settings_are_one_line_errors(hpo: dict, message: str) -> None:
    with pytest.raises(MazerunError) as error:
        validate({"algorithm": {"name": "cql"}, "hpo": {"name": "evolution", **hpo}})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_defaults_of_the_yaml_pass_for_every_supported_algorithm() -> None:
    for name in searchable_algorithms():
        config = validate({"algorithm": {"name": name}, "hpo": {"name": "evolution"}})
        assert config.hpo.population_size == 4


@pytest.mark.parametrize(("overrides", "message"), [
    (("algorithm=ppo", "hpo=evolution"), "hpo=evolution supports bc, cql, iql"),
    (("hpo=evolution",), "add algorithm=<bc|cql|iql>"),
    (("algorithm=cql", "hpo=evolution", "hpo.population_size=1"), "hpo.population_size=1 must be at least 2"),
    (("algorithm=cql", "hpo=evolution", "hpo.tournament_size=5"), "hpo.tournament_size=5 is larger than"),
    (("algorithm=bc", "hpo=evolution", "algorithm.lr_schedule=linear"), "set algorithm.lr_schedule=constant"),
])
def test_bad_searches_through_run_fail_in_one_line_and_write_nothing(workdir: Path, overrides: tuple,
                                                                      message: str) -> None:
    result = run_cli(*overrides, "hydra.run.dir=outputs/bad", cwd=workdir)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    leftovers = {path.name for path in (workdir / "outputs" / "bad").glob("*")} if (workdir / "outputs").exists() else set()
    assert not leftovers & {"best.pt", "last.pt", "population.csv", "metrics.csv"}


def test_a_grown_architecture_s_fast_path_is_checked_against_the_loss(tmp_path: Path, monkeypatch, caplog) -> None:
    """A mutation builds its networks through the population, which holds the new fast path against autograd."""
    from types import SimpleNamespace

    from mazerun.compose.evolution import EvolutionConfig
    from mazerun.compose.population import Population
    from mazerun.config.schemas import structured

    setup = SimpleNamespace(algorithm=cql.Config(batch_size=5), run_dir=tmp_path,
                            spec=AlgorithmSpec(OBSERVATIONS, ACTIONS, TINY))
    population = Population(setup, structured(EvolutionConfig, {"name": "evolution"}, "hpo"), tiny_data())
    agent = tiny_agent()
    with caplog.at_level("WARNING"):
        mutate(agent, "architecture", MutationConfig(new_layer=1.0, max_layers=3), SpaceConfig(), population.build,
               generator(0))
    assert agent.model_config.hidden_sizes == (4, 3, 3) and agent.algorithm.stack is not None
    assert not [record for record in caplog.records if "differs from autograd" in record.getMessage()]
    readable = cql.conservative_loss
    monkeypatch.setattr(cql, "conservative_loss", lambda q_values, actions: 3 * readable(q_values, actions))
    with caplog.at_level("WARNING"):
        mutate(agent, "architecture", MutationConfig(new_layer=1.0, max_layers=4), SpaceConfig(), population.build,
               generator(0))
    assert agent.algorithm.stack is None
    assert [record for record in caplog.records if "cql's hand-written gradient differs" in record.getMessage()]
