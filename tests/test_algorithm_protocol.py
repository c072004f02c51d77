"""One harness over every registered algorithm, as d3rlpy's ``algo_tester`` is: build, update, save and load,
resume exactly, refuse bad settings.

The registry is iterated, so an algorithm registered tomorrow is tested here without a test edit. Each one is
built through :func:`mazerun.algorithms.build_algorithm` for every kind of env it accepts (its
``Config.check_spaces``: vector observations with discrete actions, continuous actions, a GRU, MiniGrid's dict
observations) and fed what its loop feeds (``Config.loop``): offline batches drawn from records by
:mod:`mazerun.data.tensors`' samplers, DAgger's labelled states, rollouts of real env copies scored with GAE, or
batches replayed from a buffer of real transitions.
Only the sizes the loops read (batch and chunk sizes, rollout length) are shrunk; every other setting is the
algorithm's default. An algorithm's own maths is tested in its own file.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import pytest
import torch

from mazerun.acting.envs import make_env
from mazerun.acting.evaluation import stack_observations
from mazerun.acting.vector import make_vector_env
from mazerun.algorithms import ALGORITHMS, algorithm_config, algorithm_module, build_algorithm
from mazerun.algorithms.protocol import Algorithm, AlgorithmSpec
from mazerun.core.errors import MazerunError
from mazerun.data.records import StateTrajectoryRecord
from mazerun.data.replay import ReplayBuffer
from mazerun.data.tensors import (
    BatchSampler,
    SequenceSampler,
    TransitionDataset,
    build_vocabulary,
    observation_stats,
    records_to_dataset,
)
from mazerun.nn.checkpoint import TRAINING_STATE, load_checkpoint, network_from_checkpoint, save_checkpoint
from mazerun.nn.models import ModelConfig, Vocabulary
from mazerun.training.loops.interactive import LabelledStates
from mazerun.training.loops.onpolicy import RolloutBuffer, RolloutCollector
from mazerun.training.runsetup import model_config_dict

CPU = torch.device("cpu")
EPISODE_STEPS = 10
"""Random play: episodes are cut at this many steps."""
N_ENVS = 4
"""On-policy rollouts: env copies stepped side by side."""
LOOP_SIZES: dict[str, dict[str, int]] = {
    "offline": {"batch_size": 8, "rollout_len": 4, "nrollouts": 3, "burn_in": 2},
    "interactive": {"batch_size": 8, "rollout_len": 4, "nrollouts": 3, "burn_in": 2},
    "on_policy": {"n_steps": 8, "batch_size": 16},
    "off_policy": {"batch_size": 8},
}
"""The settings each loop reads to size what it feeds (the samplers', the rollout's), shrunk to a few rows.
On-policy with memory: a minibatch of 16 is whole sequences of 8 steps from 2 of the 4 env copies."""


class SpecKind(NamedTuple):
    env_id: str
    model: ModelConfig


SPEC_KINDS = {
    "discrete": SpecKind("LunarLander-v3", ModelConfig(kind="vector_obs", hidden_sizes=(16, 16))),
    "continuous": SpecKind("LunarLanderContinuous-v3", ModelConfig(kind="vector_obs", hidden_sizes=(16, 16))),
    "gru": SpecKind("LunarLander-v3", ModelConfig(kind="vector_obs", hidden_sizes=(16,), memory="gru",
                                                  memory_size=8)),
    "minigrid": SpecKind("BabyAI-GoToLocal-v0", ModelConfig(kind="minigrid", activation="relu", hidden_sizes=(16,),
                                                            embedding_dim=4, image_channels=(8,), direction_dim=2,
                                                            mission_dim=8)),
}


@functools.cache
def spaces(env_id: str) -> tuple[gym.Space, gym.Space]:
    env = make_env(env_id)
    env.close()
    return env.observation_space, env.action_space


def accepts(name: str, kind: str) -> bool:
    """Whether algorithm ``name`` learns in ``kind``'s env (its own check refuses the others in one line)."""
    try:
        algorithm_module(name).Config().check_spaces(*spaces(SPEC_KINDS[kind].env_id))
    except MazerunError:
        return False
    return True


CASES = [(name, kind) for name in ALGORITHMS for kind in SPEC_KINDS if accepts(name, kind)]
CASE_IDS = [f"{name}-{kind}" for name, kind in CASES]


# -- what each loop feeds ------------------------------------------------------------------------


def random_episode(env: gym.Env, seed: int) -> StateTrajectoryRecord:
    """One episode of uniformly random actions in a real env, as the recorders store it."""
    env.action_space.seed(seed)
    observation, _ = env.reset(seed=seed)
    observations, actions, rewards = [observation], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        action = env.action_space.sample()
        observation, reward, terminated, truncated, _ = env.step(action)
        observations.append(observation)
        actions.append(action)
        rewards.append(reward)
    stacked = stack_observations(observations)
    if isinstance(stacked, dict):
        stacked = {key: np.asarray(value) for key, value in stacked.items()}
    return StateTrajectoryRecord(observations=stacked, actions=np.asarray(actions), rewards=np.asarray(rewards),
                                 terminated=terminated, truncated=truncated, env_id=env.spec.id, seed=seed,
                                 policy="random")


@functools.cache
def played(env_id: str) -> tuple[TransitionDataset, Vocabulary | None]:
    """Every transition of 5 random episodes, and the missions' vocabulary (MiniGrid)."""
    env = make_env(env_id, max_episode_steps=EPISODE_STEPS)
    records = [random_episode(env, seed) for seed in range(5)]
    env.close()
    vocabulary = build_vocabulary(records) if isinstance(records[0].observations, dict) else None
    return records_to_dataset(records, vocabulary), vocabulary


class Case(NamedTuple):
    """An algorithm's config for one kind of env, its spec, and what its loop would feed it."""

    config: Any
    spec: AlgorithmSpec
    env_id: str
    data: TransitionDataset

    @property
    def loop(self) -> str:
        return self.config.loop

    def build(self, seed: int) -> tuple[Algorithm, torch.Generator]:
        """The algorithm with weights drawn from ``seed``, and the loop's generator it draws from."""
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        algorithm = build_algorithm(self.config, self.spec, generator)
        if self.loop != "on_policy" and not isinstance(self.spec.observation_space, gym.spaces.Dict):
            algorithm.set_normalization(*observation_stats(self.data.observations))  # as the loops standardise
        return algorithm, generator

    def progress(self, updates: int) -> int:
        """Where the loop's budget stands after ``updates`` updates: env steps on-policy, else updates."""
        return updates * self.config.n_steps * N_ENVS if self.loop == "on_policy" else updates

    def update(self, algorithm: Algorithm, batch: Any) -> dict[str, Any]:
        """One update as the loop makes it (on-policy: the scheduled values applied first)."""
        if self.loop == "on_policy":
            algorithm.set_progress(self.progress(algorithm.updates))
        return algorithm.update(batch)

    def feed(self, count: int) -> list[Any]:
        """``count`` batches of what the algorithm's loop feeds it, the same on every call."""
        config, data = self.config, self.data
        recurrent = self.spec.model_config.recurrent
        if self.loop == "offline":
            sampler = (SequenceSampler(data, config.rollout_len, config.nrollouts, config.burn_in, seed=0) if recurrent
                       else BatchSampler(data, config.batch_size, seed=0))
            return [sampler.sample() for _ in range(count)]
        if self.loop == "interactive":  # the labelled states of one env copy, labelled by the actions taken
            aggregate = LabelledStates(len(data), self.spec.observation_space, self.spec.action_space, 1, CPU)
            aggregate.add(data.observations, data.actions, data.episode_starts)
            generator = torch.Generator().manual_seed(0)
            draw = (aggregate.sequences(config, generator).sample if recurrent
                    else functools.partial(aggregate.sample, config.batch_size, generator))
            return [draw() for _ in range(count)]
        if self.loop == "off_policy":  # a replay buffer holding the random episodes
            buffer = ReplayBuffer(len(data), self.spec.observation_space, self.spec.action_space, CPU)
            buffer.add(data.observations, data.actions, data.rewards, data.next_observations, data.dones)
            generator = torch.Generator().manual_seed(0)
            return [buffer.sample(config.batch_size, generator) for _ in range(count)]
        assert self.loop == "on_policy", f"{config.name}: unknown loop {self.loop!r}"
        return self.rollouts(count)

    def rollouts(self, count: int) -> list[Any]:
        """``count`` rollouts of ``N_ENVS`` real env copies by the policy of a fresh build, scored with GAE."""
        config, spec = self.config, self.spec
        torch.manual_seed(0)  # the same acting policy on every call
        network = build_algorithm(config, spec).network
        envs = make_vector_env(self.env_id, N_ENVS, "sync", EPISODE_STEPS, seed=0)
        try:
            collector = RolloutCollector(envs, network, spec.observation_space, spec.vocabulary, CPU, config.gamma,
                                         torch.Generator().manual_seed(0))
            batches = []
            for _ in range(count):
                buffer = RolloutBuffer(config.n_steps, N_ENVS, spec.observation_space, spec.action_space, CPU,
                                       state_size=network.state_size)
                collector.collect(buffer)
                batches.append(buffer.batch(collector.last_values(), config.gamma, config.gae_lambda))
            return batches
        finally:
            envs.close()


def make_case(name: str, kind: str) -> Case:
    env_id, model = SPEC_KINDS[kind]
    config = algorithm_module(name).Config()
    config = dataclasses.replace(config, **LOOP_SIZES[config.loop])
    config.check("algorithm")
    data, vocabulary = played(env_id)
    return Case(config, AlgorithmSpec(*spaces(env_id), model, vocabulary), env_id, data)


# -- comparing what a checkpoint carries --------------------------------------------------------------


def assert_same(expected: Any, found: Any, where: str) -> None:
    """Bit-identical tensors, equal everything else, through dicts, lists and tuples."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(found, torch.Tensor) and expected.dtype == found.dtype, where
        assert torch.equal(expected, found), f"{where} differs"
    elif isinstance(expected, dict):
        assert isinstance(found, dict) and expected.keys() == found.keys(), f"{where}: {expected.keys()} != {found}"
        for key in expected:
            assert_same(expected[key], found[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(found, (list, tuple)) and len(expected) == len(found), where
        for index, (one, other) in enumerate(zip(expected, found)):
            assert_same(one, other, f"{where}[{index}]")
    else:
        assert expected == found, f"{where}: {expected!r} != {found!r}"


def save(path: Path, case: Case, algorithm: Algorithm, generator: torch.Generator) -> None:
    """A last.pt as the loops write it: the acting network, and the training state with the loop's generator."""
    spec, progress = case.spec, case.progress(algorithm.updates)
    save_checkpoint(
        path, model_state={key: value.detach().cpu() for key, value in algorithm.network.state_dict().items()},
        model_config=model_config_dict(spec.model_config, algorithm.network_type),
        observation_space=spec.observation_space, action_space=spec.action_space, env_id=case.env_id,
        algorithm=case.config.name, vocabulary=None if spec.vocabulary is None else spec.vocabulary.to_list(),
        extra={TRAINING_STATE: {"algorithm": algorithm.training_state(), "generator": generator.get_state()},
               "step": progress, "global_step": progress},
    )


def load(path: Path, case: Case, algorithm: Algorithm, generator: torch.Generator) -> None:
    """Continue ``algorithm`` from ``path`` as the loops do (read with ``torch.load(weights_only=True)``)."""
    checkpoint = load_checkpoint(path)
    state = checkpoint.extra[TRAINING_STATE]
    algorithm.load_network_state(checkpoint.model_state)
    algorithm.load_training_state(state["algorithm"], checkpoint.extra["step"])
    generator.set_state(state["generator"])


def observations_of(case: Case, rows: int = 6) -> Any:
    observations = case.data.observations
    if isinstance(observations, dict):
        return {key: value[:rows] for key, value in observations.items()}
    return observations[:rows]


def greedy_actions(network: torch.nn.Module, observations: Any) -> torch.Tensor:
    """The actions a network takes on the first step of an episode (memory from zero)."""
    rows = len(next(iter(observations.values())) if isinstance(observations, dict) else observations)
    return network.act_step(observations, network.initial_state(rows, CPU), torch.ones(rows, dtype=torch.bool),
                             deterministic=True)[0]


# -- the harness --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), CASES, ids=CASE_IDS)
def test_an_update_reports_finite_scalars_and_trains_the_acting_network(name: str, kind: str) -> None:
    case = make_case(name, kind)
    algorithm, _ = case.build(seed=0)
    before = {key: value.clone() for key, value in algorithm.network.state_dict().items()}
    metrics = case.update(algorithm, case.feed(1)[0])
    assert metrics and algorithm.updates == 1
    for metric, value in metrics.items():
        number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        assert isinstance(number, (int, float)) and math.isfinite(number), f"{metric}={value!r}"
    after = algorithm.network.state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before), "the acting network did not move"


@pytest.mark.parametrize(("name", "kind"), CASES, ids=CASE_IDS)
def test_a_checkpoint_holds_the_network_that_acts_and_the_training_state(name: str, kind: str,
                                                                          tmp_path: Path) -> None:
    case = make_case(name, kind)
    algorithm, generator = case.build(seed=0)
    case.update(algorithm, case.feed(1)[0])
    save(tmp_path / "last.pt", case, algorithm, generator)

    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint.algorithm == name
    assert_same(algorithm.training_state(), checkpoint.extra[TRAINING_STATE]["algorithm"], "training_state")
    acting = network_from_checkpoint(checkpoint)  # rebuilt from network_type, as `policy=torch_policy` does
    observations = observations_of(case)
    with torch.no_grad():
        assert torch.equal(greedy_actions(acting, observations), greedy_actions(algorithm.network.eval(), observations))


@pytest.mark.parametrize(("name", "kind"), CASES, ids=CASE_IDS)
def test_two_updates_equal_one_update_a_checkpoint_and_one_more(name: str, kind: str, tmp_path: Path) -> None:
    """Bit-identical networks, optimisers and generator: a continued run is the run that was never stopped."""
    case = make_case(name, kind)
    first, second = case.feed(2)
    whole, whole_generator = case.build(seed=0)
    for batch in (first, second):
        case.update(whole, batch)

    stopped, stopped_generator = case.build(seed=0)
    case.update(stopped, first)
    save(tmp_path / "last.pt", case, stopped, stopped_generator)
    continued, continued_generator = case.build(seed=1)  # other weights: everything must come from the file
    load(tmp_path / "last.pt", case, continued, continued_generator)
    case.update(continued, second)

    assert continued.updates == whole.updates == 2
    assert whole.networks().keys() == continued.networks().keys()
    for network, module in whole.networks().items():
        assert_same(module.state_dict(), continued.networks()[network].state_dict(), network)
    for optimizer, state in whole.optimizers().items():
        assert_same(state.state_dict(), continued.optimizers()[optimizer].state_dict(), optimizer)
    assert_same(whole.training_state(), continued.training_state(), "training_state")
    assert torch.equal(whole_generator.get_state(), continued_generator.get_state())


# -- bad settings ---------------------------------------------------------------------------------


def bad_values(annotation: Any) -> list[Any]:
    """Values a setting of this type must refuse: a negative number, NaN, an unknown word, a non-boolean."""
    options = set(typing.get_args(annotation)) - {type(None)} or {annotation}
    kind = options.pop()
    if kind is bool:
        return ["maybe"]
    if kind is int:
        return [-2]  # not -1: SAC's gradient_steps=-1 means one update per transition, as SB3's
    if kind is float:
        return [-1.0, math.nan]
    if kind is str:
        return ["no_such_choice"]
    raise AssertionError(f"no bad value known for a setting of type {annotation}")


SIGNED_SETTINGS = {"box.log_std_init": [3.0, math.nan], "box.gap_threshold": [math.nan, math.inf]}
"""Settings whose range holds negative numbers, and values outside it (IQL's log-std starts in [-20, 2], Box CQL's
gap threshold is any finite number)."""


def settings(config_class: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf setting of a config dataclass (nested sections included) with its type; ``name`` picks the
    algorithm itself."""
    hints = typing.get_type_hints(config_class)
    found = []
    for field in dataclasses.fields(config_class):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            found += settings(hint, f"{prefix}{field.name}.")
        elif f"{prefix}{field.name}" != "name":
            found.append((f"{prefix}{field.name}", hint))
    return found


def nested(path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: nested(rest, value) if rest else value}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_setting_refuses_a_bad_value_in_one_line_naming_it(name: str) -> None:
    config_class = algorithm_module(name).Config
    assert settings(config_class)
    for path, annotation in settings(config_class):
        for value in SIGNED_SETTINGS.get(path, bad_values(annotation)):
            with pytest.raises(MazerunError) as error:
                algorithm_config({"name": name, **nested(path, value)})
            message = str(error.value)
            assert re.search(rf"\balgorithm\.{re.escape(path)}\b", message), f"{path}={value!r}: {message}"
            assert "\n" not in message


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_the_defaults_pass_their_own_checks(name: str) -> None:
    config_class = algorithm_module(name).Config
    assert algorithm_config({"name": name}) == config_class()
    assert config_class.loop in LOOP_SIZES


def test_an_unknown_algorithm_names_the_key_and_the_choices() -> None:
    with pytest.raises(MazerunError) as error:
        algorithm_config({"name": "a2c"})
    assert "algorithm.name='a2c' is unknown" in str(error.value)
    assert all(name in str(error.value) for name in ALGORITHMS)
