"""The offline loop every algorithm that learns from records shares (BC, CQL, IQL).

The loop owns what is the same for all of them: the episode-wise split, tensors built once,
seeded batch sampling, periodic reports (train and validation metrics, an evaluation
rollout), best/last checkpoints and stopping cleanly. An algorithm only says how one batch
updates its networks.

``last.pt`` is written at every report and when the run is stopped; it holds the algorithm's
training state, the sampler's generator and the metrics of the report window in progress, so
a continued run (``input_dir=<this run>``) draws the same batches and logs the same rows as
the run that was never stopped.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import gymnasium as gym
import torch
from tqdm import tqdm

from mazerun import interrupts
from mazerun.algorithms import algorithm_module
from mazerun.algorithms.base import OfflineAlgorithm
from mazerun.data import (
    BatchSampler,
    SequenceBatch,
    SequenceSampler,
    TransitionDataset,
    longest_episode,
    observation_stats,
    records_to_dataset,
    split_by_episode,
)
from mazerun.errors import MazerunError
from mazerun.metrics import MetricsLogger
from mazerun.runsetup import TRAINING_STATE, CheckpointKeeper, RunSetup, TrainResult

log = logging.getLogger(__name__)


def train_offline(setup: RunSetup) -> TrainResult:
    """Learn from the setup's records with its offline algorithm, up to ``n_updates`` in total."""
    config = setup.algorithm
    device = setup.device
    train_records, validation_records = split_by_episode(setup.records, config.validation_percentage, setup.seed)
    train_data = records_to_dataset(train_records, setup.vocabulary)
    validation_data = records_to_dataset(validation_records, setup.vocabulary) if validation_records else None
    train_data = train_data.to(device)
    validation_data = validation_data.to(device) if validation_data is not None else None
    log.info(
        "dataset: %d episodes (%d transitions) for training, %d held out for validation",
        len(train_records), len(train_data), len(validation_records or []),
    )

    algorithm: OfflineAlgorithm = algorithm_module(config.name).Algorithm(
        config, setup.model_config, setup.observation_space, setup.action_space, setup.vocabulary, device
    )
    sampler = make_sampler(train_data, setup)
    validation_sampler = make_sampler(validation_data, setup) if validation_data else None
    window: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    window_size = 0
    start = setup.start
    if start is not None:
        algorithm.load_network_state(start.checkpoint.model_state)
    elif not isinstance(setup.observation_space, gym.spaces.Dict):
        algorithm.set_normalization(*observation_stats(train_data.observations))
    if setup.continuing:
        state = start.checkpoint.extra[TRAINING_STATE]
        algorithm.load_training_state(state["algorithm"])
        sampler.generator.set_state(state["sampler"])
        window.update({name: value.to(device) for name, value in state["window"].items()})
        window_size = int(state["window_size"])
    keeper = CheckpointKeeper(setup, algorithm.network, algorithm.network_type,
                              algorithm.selection_metric(validation_data is not None))
    update = setup.start.step if setup.start is not None else 0

    def training_state() -> dict[str, Any]:
        return {
            "algorithm": algorithm.training_state(),
            "sampler": sampler.generator.get_state(),
            "window": {name: value.detach().cpu() for name, value in window.items()},
            "window_size": window_size,
        }

    def report(logger: MetricsLogger) -> None:
        train_metrics = {name: float(total) / window_size for name, total in window.items()}
        keeper.check_finite(train_metrics, update)
        train_metrics.update(algorithm.report_metrics())
        logger.log(update, train_metrics, "train")
        everything = {f"train/{name}": value for name, value in train_metrics.items()}
        if validation_sampler is not None:
            validation = _mean_over_epoch(algorithm, validation_sampler)
            logger.log(update, validation, "validation")
            everything.update({f"validation/{name}": value for name, value in validation.items()})
        evaluation = setup.evaluate(algorithm.network)
        logger.log(update, evaluation, "eval")
        everything.update({f"eval/{name}": value for name, value in evaluation.items()})
        keeper.consider(everything, update)

    def on_stop() -> int:
        keeper.save_last(update, training_state())
        return update

    if not setup.continuing:
        keeper.save_last(update, training_state())  # a run that fails early still has a start to go on from
    with MetricsLogger(setup.run_dir, step_offset=setup.step_offset) as logger, keeper.stop_cleanly(on_stop), \
            interrupts.deferred():
        with tqdm(total=config.n_updates, initial=update, unit="update", desc=config.name, disable=None) as bar:
            while update < config.n_updates:
                interrupts.check()
                metrics = algorithm.update(sampler.sample())
                for name, value in metrics.items():
                    window[name] += value
                update += 1
                window_size += 1
                bar.update()
                if update % config.eval_every == 0 or update == config.n_updates:
                    report(logger)
                    window.clear()
                    window_size = 0
                    keeper.save_last(update, training_state())
    log.info("done: %d updates; checkpoints %s and %s in %s", update, keeper.best_path.name, keeper.last_path.name,
             setup.run_dir)
    result = keeper.result(update)
    result.write()
    return result


def make_sampler(data: TransitionDataset, setup: RunSetup) -> BatchSampler | SequenceSampler:
    """Transitions for a model without memory; chunks of consecutive ones for a model with it."""
    config = setup.algorithm
    if not setup.model_config.recurrent:
        return BatchSampler(data, config.batch_size, seed=setup.seed)
    longest = longest_episode(data)
    if config.rollout_len > longest:
        raise MazerunError(
            f"{setup.prefix}.rollout_len={config.rollout_len} is longer than every episode (the longest has "
            f"{longest} steps); use {setup.prefix}.rollout_len={longest} or less"
        )
    return SequenceSampler(data, config.rollout_len, config.nrollouts, config.burn_in, seed=setup.seed)


@torch.no_grad()
def _mean_over_epoch(algorithm: OfflineAlgorithm, sampler: BatchSampler | SequenceSampler) -> dict[str, float]:
    """Validation metrics over every held-out transition, weighted by batch size."""
    totals: dict[str, float] = defaultdict(float)
    count = 0
    for batch in sampler.epoch(shuffle=False):
        size = batch.actions.shape[0] * (batch.actions.shape[1] if isinstance(batch, SequenceBatch) else 1)
        for name, value in algorithm.validation_metrics(batch).items():
            totals[name] += float(value) * size
        count += size
    return {name: total / count for name, total in totals.items()}
