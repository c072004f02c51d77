"""What every training run needs before its loop starts, decided once for every loop.

:func:`prepare` settles, in this order: the device; where the run starts (``input_dir``: a
run of the same algorithm is continued from its ``last.pt``, any other run lends its policy);
the records, for algorithms that learn from a dataset; the env id, checked against the records
and the checkpoint; its spaces; the mission vocabulary; the model config. A loop then only
builds its algorithm and trains.

:class:`TrainResult` is what every loop returns: the selection metric and where the checkpoints
are. What a loop does around its updates (checkpoints, logging, evaluation, stops) is
:mod:`mazerun.training.session`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import torch

from mazerun.acting.envs import make_env, resolve_env_id
from mazerun.acting.evaluation import Stepper, evaluate
from mazerun.algorithms import algorithm_module
from mazerun.algorithms.base import resolve_matmul_dtype
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.config.schemas import DEFAULT_ENV_ID, ExpertConfig, RunConfig, RunnerConfig, structured
from mazerun.config.tuned import with_kind_defaults
from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write_bytes
from mazerun.core.rundir import RESULT_FILE
from mazerun.data.formats import load_dataset_records
from mazerun.data.records import StateTrajectoryRecord, find_newest_recording
from mazerun.data.store import ColumnarStore, is_store
from mazerun.data.tensors import build_vocabulary, check_records_match_spaces, env_id_of
from mazerun.nn.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    TRAINING_STATE,
    Checkpoint,
    load_checkpoint,
    resolve_run_dir,
)
from mazerun.nn.models import KIND_ACTIVATIONS, KIND_MEMORY, ModelConfig, Vocabulary, default_model_kind
from mazerun.training.distributed import SINGLE, World, current_world
from mazerun.training.metrics import copy_metrics_history

log = logging.getLogger(__name__)

MISSION_SAMPLES = 500
"""Seeded resets whose missions make the vocabulary of a MiniGrid/BabyAI run without records."""


def resolve_device(name: str) -> torch.device:
    """``auto`` takes the GPU when there is one; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MazerunError(f"device={name} but torch sees no CUDA GPU; use device=cpu or device=auto")
    return torch.device(name)


def choose_env_id(explicit: str | None, source_env_id: str | None, source: str) -> str:
    """The env to train in: the one named on the command line must match the data's or checkpoint's."""
    if explicit is None:
        return resolve_env_id(source_env_id or DEFAULT_ENV_ID)
    env_id = resolve_env_id(explicit)
    if source_env_id is not None and resolve_env_id(source_env_id) != env_id:
        raise MazerunError(
            f"env {env_id} differs from {source_env_id} of {source}; drop the env override "
            f"or use data/checkpoints of {env_id}"
        )
    return env_id


def algorithm_activation(algorithm_config: Any, action_space: gym.Space) -> str | None:
    """The MLP activation the algorithm's reference implementation uses for these actions (its config's optional
    ``model_activation``), or None: the model kind's own."""
    choose = getattr(algorithm_config, "model_activation", None)
    return None if choose is None else choose(action_space)


def resolved_matmul_dtype(algorithm_config: Any, action_space: gym.Space, model_config: ModelConfig,
                          device: torch.device, prefix: str) -> Any:
    """The config with ``matmul_dtype=auto`` made concrete (:func:`mazerun.algorithms.base.resolve_matmul_dtype`),
    logged so that run.log says what the products ran in."""
    resolved = resolve_matmul_dtype(algorithm_config, action_space, model_config, device)
    if resolved is not algorithm_config:
        log.info("%s.matmul_dtype=auto: %s", prefix, resolved.matmul_dtype)
    return resolved


def resolve_model_config(values: Any, observation_space: gym.Space, algorithm_activation: str | None = None,
                         memory_allowed: bool = True) -> ModelConfig:
    """The model group's values as a :class:`ModelConfig`, its kind picked from the space when unset, its
    activation, when unset, the algorithm's own (:func:`algorithm_activation`: ReLU for SAC, as SB3's)
    or else the kind's, and its memory, when unset, the kind's (none where ``memory_allowed`` is false: the
    population search), so ``model=auto`` builds what ``model=<kind>`` would."""
    values = dict(values or {})
    if values.get("kind") is None:
        values["kind"] = default_model_kind(observation_space)
    if values.get("activation") is None:
        values["activation"] = algorithm_activation or KIND_ACTIVATIONS.get(values["kind"], "tanh")
    if values.get("memory") is None:
        values["memory"] = KIND_MEMORY.get(values["kind"], "none") if memory_allowed else "none"
    return structured(ModelConfig, values, "model")


def model_config_dict(model_config: ModelConfig, network_type: str) -> dict[str, Any]:
    """How a checkpoint describes its network: plain values only."""
    values = dataclasses.asdict(model_config)
    return {"network": network_type, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}


def model_config_from_checkpoint(checkpoint: Checkpoint) -> tuple[str, ModelConfig]:
    return checkpoint.model_config["network"], ModelConfig.from_dict(checkpoint.model_config)


def sample_mission_vocabulary(env: gym.Env, seed: int) -> Vocabulary:
    """The words of the missions of a few hundred seeded resets; a word never seen maps to 'unknown'."""
    missions = [env.reset(seed=seed + index)[0]["mission"] for index in range(MISSION_SAMPLES)]
    return Vocabulary.build(missions)


def dataset_sources(dir_or_file: str | Sequence[str] | None) -> list[str]:
    """The configured sources, or the newest finished recording when none is given."""
    if dir_or_file is None:
        source: Any = find_newest_recording()
        log.info("training on the newest finished recording: %s", source)
    else:
        source = dir_or_file
    return [str(source)] if isinstance(source, (str, Path)) else [str(item) for item in source]


def load_dataset(
    dir_or_file: str | Sequence[str] | None, env_id: str | None = None, max_episodes: int | None = None
) -> tuple[list[StateTrajectoryRecord], list[str]]:
    """Records from the configured source (the newest finished recording when none is given) and where they came from.

    Sources may be trajectory_data, HDF5 files, ``minari:<id>`` or columnar stores
    (:mod:`mazerun.datasets`, :mod:`mazerun.data.store`); ``env_id`` labels the episodes of those that
    do not name their env. ``max_episodes`` keeps the first N episodes.
    """
    sources = dataset_sources(dir_or_file)
    return load_dataset_records(sources, env_id, max_episodes), sources


def streamed_store(sources: list[str]) -> ColumnarStore | None:
    """The store to train on through memory maps, when the sources are one store (with others: refused)."""
    stores = [source for source in sources if is_store(source)]
    if not stores:
        return None
    if len(sources) > 1:
        raise MazerunError(
            f"{stores[0]} is a columnar store and trains alone (memory-mapped); add the other sources to it with "
            f"python -m mazerun.datasets append <sources> {stores[0]}, then train on the store"
        )
    return ColumnarStore.open(stores[0])


@dataclass
class Start:
    """The checkpoint a run starts from, and whether it continues that run (same algorithm, training state kept)."""

    checkpoint: Checkpoint
    continuing: bool

    @property
    def step(self) -> int:
        """The budget counter (updates or env steps) the continued run had reached."""
        return int(self.checkpoint.extra["step"]) if self.continuing else 0


def load_start(input_dir: str, algorithm: str, network_type: str, starts_from: tuple[str, ...] = ()) -> Start:
    """The checkpoint of ``input_dir``: a run of ``algorithm`` continues from its ``last.pt``, any other lends its ``best.pt``
    (whose network must be a ``network_type``, or one of ``starts_from``)."""
    run_dir = resolve_run_dir(input_dir)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint.algorithm == algorithm and run_dir.is_dir():
        checkpoint = load_checkpoint(run_dir, prefer=(LAST_CHECKPOINT, BEST_CHECKPOINT))
    found = checkpoint.model_config.get("network")
    if found != network_type and found not in starts_from:
        raise MazerunError(
            f"input_dir {input_dir} holds a {found} ({checkpoint.algorithm}) and {algorithm} trains an "
            f"{network_type}: pass a run that trained an {network_type}, or drop input_dir to train from scratch"
        )
    return Start(checkpoint, continuing=checkpoint.algorithm == algorithm and TRAINING_STATE in checkpoint.extra)


def _check_action_kind(start: Checkpoint, action_space: gym.Space, env_id: str, input_dir: str) -> None:
    def kind(space: gym.Space) -> str:
        return "discrete" if isinstance(space, gym.spaces.Discrete) else "continuous"

    if kind(start.action_space) != kind(action_space):
        raise MazerunError(
            f"input_dir {input_dir} holds a policy for {kind(start.action_space)} actions ({start.env_id}) and "
            f"{env_id} has {kind(action_space)} actions; clone an expert of {env_id} first, or drop the env override"
        )


@dataclass
class RunSetup:
    """Everything a loop needs to build its learner in the right env and report where it should."""

    run_dir: Path
    algorithm: Any
    """The algorithm's config dataclass."""
    prefix: str
    """Where the algorithm's keys live on the command line: ``algorithm`` or ``pipeline.stages.<stage>``."""
    device: torch.device
    env_id: str
    observation_space: gym.Space
    action_space: gym.Space
    vocabulary: Vocabulary | None
    model_config: ModelConfig
    runner: RunnerConfig
    start: Start | None
    records: list[StateTrajectoryRecord] | None
    dataset_sources: list[str]
    store: ColumnarStore | None = None
    """The columnar store the offline loop samples through memory maps (records is None then)."""
    world: World = SINGLE
    """This process's place in a torchrun job (one process: rank 0 of 1)."""
    step_offset: int = 0
    """Added to every logged step: where this stage begins on its pipeline's counter."""
    expert: ExpertConfig | None = None
    continue_hint: Path | None = None
    """The ``input_dir`` that continues this run when it stops early (a pipeline's own directory)."""

    @property
    def seed(self) -> int:
        return self.runner.seed

    @property
    def continuing(self) -> bool:
        return self.start is not None and self.start.continuing

    @property
    def spec(self) -> AlgorithmSpec:
        """What the algorithm is built for."""
        return AlgorithmSpec(self.observation_space, self.action_space, self.model_config, self.vocabulary, self.device)

    def evaluate(self, network: Stepper) -> dict[str, float]:
        """``runner.eval_repeats`` greedy episodes of ``network`` on the fixed evaluation seeds."""
        return evaluate(
            network, self.env_id, self.runner.eval_repeats, observation_space=self.observation_space,
            vocabulary=self.vocabulary, device=self.device, max_episode_steps=self.runner.max_episode_steps,
        ).metrics()

    def budget_reached(self) -> None:
        """Refuse to continue a run that already trained for the whole budget (and owes no work after it, such as
        the updates on DAgger's last labels: a loop that does marks its ``last.pt`` ``unfinished``)."""
        budget = self.algorithm.budget
        start = self.start
        if (start is not None and start.continuing and start.step >= budget
                and not start.checkpoint.extra.get(TRAINING_STATE, {}).get("unfinished", False)):
            key = f"{self.prefix}.{self.algorithm.budget_key}"
            raise MazerunError(
                f"{self.start.checkpoint.path} already trained for {self.start.step} {self.algorithm.step_unit}s "
                f">= {key}={budget}; raise {key} to train longer (budgets are totals)"
            )


def prepare(
    config: RunConfig,
    algorithm_config: Any,
    run_dir: Path,
    *,
    prefix: str = "algorithm",
    input_dir: str | None = None,
    dataset: Any = None,
    step_offset: int = 0,
    continue_hint: Path | None = None,
    stream: bool = False,
) -> RunSetup:
    """Settle device, start, records, env, spaces, vocabulary and model config for one run (or stage).

    With ``stream`` (the offline loop), a dataset that is one columnar store stays on disk and is
    sampled through memory maps; otherwise every source is read into records.
    """
    world = current_world()
    device = resolve_device(config.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    algorithm_class = algorithm_module(algorithm_config.name).Algorithm
    explicit = config.env.name
    if explicit is not None:  # an env the algorithm cannot learn in fails before any record is read
        env = make_env(explicit)
        env.close()
        algorithm_config.check_spaces(env.observation_space, env.action_space)

    start = (load_start(input_dir, algorithm_config.name, algorithm_class.network_type, algorithm_class.starts_from)
             if input_dir else None)
    records, sources, store = None, [], None
    if algorithm_config.needs_dataset:
        if dataset is None and start is not None and start.checkpoint.extra.get("dataset"):
            dataset = list(start.checkpoint.extra["dataset"])  # e.g. PPO's imitation term on the clone's own demos
            log.info("%s reads the data %s trained on: %s", prefix, start.checkpoint.path, ", ".join(dataset))
        if dataset is None:
            algorithm_config.check_implicit_dataset(prefix)
        sources = dataset_sources(dataset)
        store = streamed_store(sources) if stream else None
        if store is None:
            records = load_dataset_records(sources, explicit, config.runner.dataset.max_episodes)

    env_id = explicit
    if records is not None:
        env_id = choose_env_id(env_id, env_id_of(records), f"the records in {', '.join(sources)}")
    if store is not None:
        env_id = choose_env_id(env_id, store.env_id, f"the store {store.path}")
    env = make_env(resolve_env_id(env_id or (start.checkpoint.env_id if start else DEFAULT_ENV_ID)),
                   max_episode_steps=config.runner.max_episode_steps)
    try:
        observation_space, action_space = env.observation_space, env.action_space
        if start is not None:
            _check_action_kind(start.checkpoint, action_space, resolve_env_id(env.spec.id), input_dir)
            env_id = choose_env_id(env_id, start.checkpoint.env_id, f"input_dir {input_dir}")
        env_id = resolve_env_id(env_id or DEFAULT_ENV_ID)
        algorithm_config.check_spaces(observation_space, action_space)
        if records is not None:
            check_records_match_spaces(records, observation_space, action_space)
        if store is not None:
            store.check_spaces(observation_space, action_space)

        if start is not None:
            _, model_config = model_config_from_checkpoint(start.checkpoint)
            vocabulary = None if start.checkpoint.vocabulary is None else Vocabulary.from_list(start.checkpoint.vocabulary)
        else:
            model_config = resolve_model_config(config.model, observation_space,
                                                algorithm_activation(algorithm_config, action_space),
                                                memory_allowed=config.hpo is None)
            vocabulary = None
        algorithm_config, runner, taken = with_kind_defaults(algorithm_config, config.runner, model_config.kind,
                                                             prefix, config.command_line)
        algorithm_config = resolved_matmul_dtype(algorithm_config, action_space, model_config, device, prefix)
        if taken:
            algorithm_config.check(prefix)
            log.info("%s defaults for %s observations: %s", algorithm_config.name, model_config.kind,
                     ", ".join(taken))
        if vocabulary is None and isinstance(observation_space, gym.spaces.Dict) and "mission" in observation_space.spaces:
            vocabulary = build_vocabulary(records) if records else sample_mission_vocabulary(env, config.runner.seed)
    finally:
        env.close()

    setup = RunSetup(
        run_dir=Path(run_dir), algorithm=algorithm_config, prefix=prefix, device=device, env_id=env_id,
        observation_space=observation_space, action_space=action_space, vocabulary=vocabulary,
        model_config=model_config, runner=runner, start=start, records=records, dataset_sources=sources,
        step_offset=step_offset, expert=config.expert, continue_hint=continue_hint or Path(run_dir), store=store,
        world=world,
    )
    setup.budget_reached()
    if start is not None and start.continuing:
        copy_metrics_history(start.checkpoint.path.parent, run_dir, int(start.checkpoint.extra["global_step"]))
        log.info("continuing %s at %s %d", start.checkpoint.path, algorithm_config.step_unit, start.step)
    elif start is not None:
        log.info("starting from the %s policy of %s", start.checkpoint.algorithm, start.checkpoint.path)
    return setup


@dataclass
class TrainResult:
    """What a training run (or stage) reached: the selection metric, the counters, the checkpoints."""

    run_dir: str
    algorithm: str
    metric: str
    mode: str
    best: float | None
    step: int
    """The budget counter reached (updates or env steps)."""
    global_step: int
    """``step`` plus the stage's offset on its pipeline's counter."""
    env_id: str

    @property
    def best_checkpoint(self) -> Path:
        return Path(self.run_dir) / BEST_CHECKPOINT

    @property
    def last_checkpoint(self) -> Path:
        return Path(self.run_dir) / LAST_CHECKPOINT

    def write(self) -> None:
        atomic_write_bytes(Path(self.run_dir) / RESULT_FILE, json.dumps(dataclasses.asdict(self), indent=2).encode())

    @classmethod
    def read(cls, run_dir: Path) -> TrainResult | None:
        path = Path(run_dir) / RESULT_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))
