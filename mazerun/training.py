"""Training entry point and the offline loop every algorithm that learns from records shares.

The loop owns what is the same for BC, CQL and IQL: finding and loading the records, the
episode-wise split, tensors built once, seeded batch sampling, periodic reports (train and
validation metrics, an evaluation rollout), best/last checkpoints and Ctrl-C handling. An
algorithm only says how one batch updates its networks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import torch
from tqdm import tqdm

from mazerun.algorithms import ON_POLICY_ALGORITHMS, algorithm_module
from mazerun.algorithms.base import OfflineAlgorithm, OfflineConfig
from mazerun.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mazerun.config import DEFAULT_ENV_ID, RunConfig, structured
from mazerun.data import (
    BatchSampler,
    build_vocabulary,
    check_records_match_spaces,
    env_id_of,
    observation_stats,
    records_to_dataset,
    split_by_episode,
)
from mazerun.envs import make_env, resolve_env_id
from mazerun.errors import MazerunError
from mazerun.evaluation import evaluate
from mazerun.metrics import MetricsLogger
from mazerun.models import ModelConfig, Vocabulary, default_model_kind
from mazerun.records import StateTrajectoryRecord, load_records
from mazerun.rollout import TRAJECTORY_DIR

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"


def train(config: RunConfig, run_dir: Path) -> None:
    """Train the algorithm the config selects; writes checkpoints, metrics and events to ``run_dir``."""
    name = config.algorithm.name
    torch.manual_seed(config.runner.seed)
    if name in ON_POLICY_ALGORITHMS:
        from mazerun.onpolicy import train_on_policy

        train_on_policy(config, run_dir)
    else:
        train_offline(config, run_dir)


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


def resolve_model_config(values: Any, observation_space: gym.Space) -> ModelConfig:
    """The model group's values as a :class:`ModelConfig`, its kind picked from the space when unset."""
    values = dict(values or {})
    if values.get("kind") is None:
        values["kind"] = default_model_kind(observation_space)
    return structured(ModelConfig, values, "model")


def model_config_dict(model_config: ModelConfig, network_type: str) -> dict[str, Any]:
    """How a checkpoint describes its network: plain values only."""
    values = dataclasses.asdict(model_config)
    return {"network": network_type, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}


def model_config_from_checkpoint(checkpoint: Checkpoint) -> tuple[str, ModelConfig]:
    values = dict(checkpoint.model_config)
    network_type = values.pop("network")
    return network_type, ModelConfig(**values)


def find_newest_trajectory_data(root: Path = Path("outputs")) -> Path:
    """The most recently written ``trajectory_data`` directory under ``outputs/`` (and ``multirun/``)."""
    candidates = [
        path
        for base in (root, root.parent / "multirun")
        if base.is_dir()
        for path in base.glob(f"**/{TRAJECTORY_DIR}")
        if path.is_dir() and any(path.glob("*.pkl"))
    ]
    if not candidates:
        raise MazerunError(
            f"no recorded trajectory_data under {root.resolve()}; record some first with "
            "`run env=LunarLander-v3 policy=heuristic`, or set runner.dataset.dir_or_file=<dir>"
        )
    return max(candidates, key=lambda path: path.stat().st_mtime)


def load_dataset(dir_or_file: str | Sequence[str] | None) -> tuple[list[StateTrajectoryRecord], list[str]]:
    """Records from the configured source (newest recording when none is given) and where they came from."""
    if dir_or_file is None:
        source: Any = find_newest_trajectory_data()
        log.info("training on the newest recording: %s", source)
    else:
        source = dir_or_file
    sources = [str(source)] if isinstance(source, (str, Path)) else [str(item) for item in source]
    return load_records(sources), sources


def save_run_checkpoint(
    path: Path,
    network: torch.nn.Module,
    network_type: str,
    model_config: ModelConfig,
    env_id: str,
    observation_space: gym.Space,
    action_space: gym.Space,
    algorithm: str,
    vocabulary: Vocabulary | None,
    extra: dict[str, Any],
) -> None:
    save_checkpoint(
        path,
        model_state={key: value.detach().cpu() for key, value in network.state_dict().items()},
        model_config=model_config_dict(model_config, network_type),
        observation_space=observation_space,
        action_space=action_space,
        env_id=env_id,
        algorithm=algorithm,
        vocabulary=vocabulary.to_list() if vocabulary is not None else None,
        extra=extra,
    )


class BestTracker:
    """Remembers the best value of the selection metric and says when a new one beats it."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric, self.mode = metric, mode
        self.best: float | None = None

    def improved(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None:
            return False
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best = value
        return better


def train_offline(config: RunConfig, run_dir: Path) -> None:
    """Learn from recorded trajectories with an offline algorithm (BC, CQL, IQL)."""
    algorithm_config: OfflineConfig = config.algorithm
    device = resolve_device(config.device)
    if config.env.name is not None:  # an env the algorithm cannot learn in fails before any record is read
        _check_env_fits(algorithm_config, config.env.name)
    records, sources = load_dataset(config.runner.dataset.dir_or_file)
    checkpoint = load_checkpoint(config.input_dir) if config.input_dir else None
    env_id = choose_env_id(config.env.name, env_id_of(records), f"the records in {', '.join(sources)}")
    if checkpoint is not None:
        env_id = choose_env_id(env_id, checkpoint.env_id, f"input_dir {config.input_dir}")
    env = make_env(env_id)
    observation_space, action_space = env.observation_space, env.action_space
    env.close()
    algorithm_config.check_spaces(observation_space, action_space)
    check_records_match_spaces(records, observation_space, action_space)

    vocabulary: Vocabulary | None = None
    if checkpoint is not None:
        _, model_config = model_config_from_checkpoint(checkpoint)
        vocabulary = Vocabulary.from_list(checkpoint.vocabulary) if checkpoint.vocabulary is not None else None
    else:
        model_config = resolve_model_config(config.model, observation_space)
    if vocabulary is None and isinstance(observation_space, gym.spaces.Dict):
        vocabulary = build_vocabulary(records)

    train_records, validation_records = split_by_episode(
        records, algorithm_config.validation_percentage, config.runner.seed
    )
    train_data = records_to_dataset(train_records, vocabulary).to(device)
    validation_data = records_to_dataset(validation_records, vocabulary).to(device) if validation_records else None
    log.info(
        "dataset: %d episodes (%d transitions) for training, %d held out for validation",
        len(train_records), len(train_data), len(validation_records or []),
    )

    algorithm: OfflineAlgorithm = algorithm_module(algorithm_config.name).Algorithm(algorithm_config, model_config, observation_space, action_space, vocabulary, device)
    if checkpoint is not None:
        if checkpoint.model_config.get("network") != algorithm.network_type:
            raise MazerunError(
                f"input_dir {config.input_dir} holds a {checkpoint.model_config.get('network')} network and "
                f"{algorithm_config.name} trains a {algorithm.network_type}; start {algorithm_config.name} from scratch"
            )
        algorithm.load_network_state(checkpoint.model_state)
    elif not isinstance(train_data.observations, dict):
        algorithm.set_normalization(*observation_stats(train_data))

    sampler = BatchSampler(train_data, algorithm_config.batch_size, seed=config.runner.seed)
    validation_sampler = (
        BatchSampler(validation_data, algorithm_config.batch_size, seed=config.runner.seed) if validation_data else None
    )
    best = BestTracker(*algorithm.selection_metric(validation_data is not None))

    def save(path: Path, update: int) -> None:
        save_run_checkpoint(
            path, algorithm.network, algorithm.network_type, model_config, env_id, observation_space,
            action_space, algorithm_config.name, vocabulary,
            extra={"update": update, "dataset": sources, "best": {best.metric: best.best}},
        )

    def report(update: int, window: dict[str, torch.Tensor], window_size: int, logger: MetricsLogger) -> None:
        train_metrics = {name: float(total) / window_size for name, total in window.items()}
        train_metrics.update(algorithm.report_metrics())
        logger.log(update, train_metrics, "train")
        everything = {f"train/{name}": value for name, value in train_metrics.items()}
        if validation_sampler is not None:
            validation = _mean_over_epoch(algorithm, validation_sampler)
            logger.log(update, validation, "validation")
            everything.update({f"validation/{name}": value for name, value in validation.items()})
        evaluation = evaluate(
            lambda observations: algorithm.act(observations, deterministic=True), env_id, config.runner.eval_repeats,
            observation_space=observation_space, vocabulary=vocabulary, device=device,
            max_episode_steps=config.runner.max_episode_steps,
        ).metrics()
        logger.log(update, evaluation, "eval")
        everything.update({f"eval/{name}": value for name, value in evaluation.items()})
        if best.improved(everything):
            log.info("-> new best model %s=%.3f, saved %s", best.metric, best.best, BEST_CHECKPOINT)
            save(run_dir / BEST_CHECKPOINT, update)

    update = 0
    with MetricsLogger(run_dir) as logger:
        window: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        window_size = 0
        try:
            with tqdm(total=algorithm_config.n_updates, unit="update", desc=algorithm_config.name, disable=None) as bar:
                while update < algorithm_config.n_updates:
                    metrics = algorithm.update(sampler.sample())
                    for name, value in metrics.items():
                        window[name] += value
                    update += 1
                    window_size += 1
                    bar.update()
                    if update % algorithm_config.eval_every == 0 or update == algorithm_config.n_updates:
                        report(update, window, window_size, logger)
                        window.clear()
                        window_size = 0
        except KeyboardInterrupt:
            save(run_dir / LAST_CHECKPOINT, update)
            raise KeyboardInterrupt(f"stopped at update {update}; saved {run_dir / LAST_CHECKPOINT}") from None
        save(run_dir / LAST_CHECKPOINT, update)
    log.info("done: %d updates; checkpoints %s and %s in %s", update, BEST_CHECKPOINT, LAST_CHECKPOINT, run_dir)


def _check_env_fits(algorithm_config: OfflineConfig, env_id: str) -> None:
    env = make_env(env_id)
    env.close()
    algorithm_config.check_spaces(env.observation_space, env.action_space)


@torch.no_grad()
def _mean_over_epoch(algorithm: OfflineAlgorithm, sampler: BatchSampler) -> dict[str, float]:
    """Validation metrics over every held-out transition, weighted by batch size."""
    totals: dict[str, float] = defaultdict(float)
    count = 0
    for batch in sampler.epoch(shuffle=False):
        size = len(batch.actions)
        for name, value in algorithm.validation_metrics(batch).items():
            totals[name] += float(value) * size
        count += size
    return {name: total / count for name, total in totals.items()}
