"""The offline loop every algorithm that learns from records shares (BC, CQL, IQL, TD3+BC).

The loop owns what is the same for all of them: the episode-wise split, tensors built once,
seeded batch sampling, periodic reports (train and validation metrics, an evaluation
rollout), best/last checkpoints and stopping cleanly. An algorithm only says how one batch
updates its networks.

``last.pt`` is written at every report and when the run is stopped; it holds the algorithm's
training state, the sampler's generator (which also draws whatever the algorithm draws) and
the metrics of the report window in progress, so a continued run (``input_dir=<this run>``)
draws the same batches and logs the same rows as the run that was never stopped.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import gymnasium as gym
import torch

from mazerun.algorithms import build_algorithm
from mazerun.algorithms.base import OfflineAlgorithm
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.data.store import StoreDataset, store_split
from mazerun.data.tensors import (
    BatchSampler,
    SequenceBatch,
    SequenceSampler,
    TransitionDataset,
    observation_stats,
    records_to_dataset,
    split_by_episode,
)
from mazerun.nn.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, TRAINING_STATE
from mazerun.training import distributed
from mazerun.training.runsetup import RunSetup, TrainResult
from mazerun.training.session import LoopShell

log = logging.getLogger(__name__)


def train_offline(setup: RunSetup) -> TrainResult:
    """Learn from the setup's records with its offline algorithm, up to ``n_updates`` in total."""
    config = setup.algorithm
    device = setup.device
    world = setup.world
    train_data, validation_data = _datasets(setup)

    sampler = make_sampler(train_data, setup)
    # What an algorithm draws (TD3+BC's smoothing noise) comes from the sampler's generator, which last.pt keeps
    algorithm: OfflineAlgorithm = build_algorithm(config, setup.spec, sampler.generator)
    if isinstance(sampler, BatchSampler):  # chunks for a network with memory have no fast path
        problem = algorithm.check_fast_path(sampler.first())
        if problem is not None:
            log.warning(problem)
    validation_sampler = make_sampler(validation_data, setup) if validation_data else None
    sync = None
    if world.distributed:  # torchrun: each rank gathers its share of the global batch, gradients are averaged
        key = f"{setup.prefix}.{'nrollouts' if setup.model_config.recurrent else 'batch_size'}"
        distributed.check_supported(config.loop, f"algorithm={config.name}", key, _global_batch(config, setup), world)
        sampler = distributed.ShardedSampler(sampler, world)
        sync = algorithm.gradient_sync = distributed.GradientSync(algorithm.trained_parameters(), world)
        log.info("data-parallel: world size %d (%s); each process samples %d of every global batch",
                 world.size, distributed.backend(), _global_batch(config, setup) // world.size)
    window: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    window_size = 0
    start = setup.start
    if start is not None:
        algorithm.load_network_state(start.checkpoint.model_state)
    elif not isinstance(setup.observation_space, gym.spaces.Dict):
        algorithm.set_normalization(*(train_data.observation_stats() if isinstance(train_data, StoreDataset)
                                      else observation_stats(train_data.observations)))
    if setup.continuing:
        state = start.checkpoint.extra[TRAINING_STATE]
        algorithm.load_training_state(state["algorithm"], start.step)
        sampler.generator.set_state(state["sampler"])
        window.update({name: value.to(device) for name, value in state["window"].items()})
        window_size = int(state["window_size"])
    if world.distributed:
        distributed.broadcast_modules(list(algorithm.networks().values()))

    def training_state() -> dict[str, Any]:
        return {
            "algorithm": algorithm.training_state(),
            "sampler": sampler.generator.get_state(),
            "window": {name: value.detach().cpu() for name, value in window.items()},
            "window_size": window_size,
        }

    shell = LoopShell(setup, algorithm, algorithm.selection_metric(validation_data is not None), training_state)

    def report() -> None:
        totals = sync.average(window) if sync is not None else window
        train_metrics = {name: float(total) / window_size for name, total in totals.items()}
        shell.check_finite(train_metrics)
        if not world.writes:
            return  # rank 0 validates, evaluates and keeps the best; the others wait in the next all-reduce
        train_metrics.update(algorithm.report_metrics())
        shell.log(train_metrics, "train")
        others = {f"train/{name}": value for name, value in train_metrics.items()}
        if validation_sampler is not None:
            validation = _mean_over_epoch(algorithm, validation_sampler)
            shell.log(validation, "validation")
            others.update({f"validation/{name}": value for name, value in validation.items()})
        shell.evaluate(others)

    if not setup.continuing:
        shell.save_last()  # a run that fails early still has a start to go on from
    stop_check = sync.check if sync is not None else interrupts.check
    started, first_update = time.perf_counter(), shell.step
    with shell.running(config.n_updates):
        while shell.step < config.n_updates:
            stop_check()
            batch = sampler.sample()
            metrics = algorithm.learn(batch)
            for name, value in metrics.items():
                window[name] += value
            shell.advance()
            window_size += 1
            if shell.step % config.eval_every == 0 or shell.step == config.n_updates:
                report()
                window.clear()
                window_size = 0
                shell.save_last()
    seconds = time.perf_counter() - started
    log.info("done: %d updates (%.0f updates/s, reports included); checkpoints %s and %s in %s", shell.step,
             (shell.step - first_update) / seconds if seconds > 0 else 0.0, BEST_CHECKPOINT, LAST_CHECKPOINT,
             setup.run_dir)
    return shell.finish()


def _datasets(setup: RunSetup) -> tuple[TransitionDataset | StoreDataset, TransitionDataset | StoreDataset | None]:
    """Training and validation transitions: tensors built once from records, or views of a memory-mapped store."""
    config = setup.algorithm
    if setup.store is not None:
        train_data, validation_data = store_split(setup.store, config.validation_percentage, setup.seed, setup.device,
                                                  setup.runner.dataset.max_episodes)
        log.info("dataset: %d episodes (%d transitions) for training, %d held out for validation, memory-mapped "
                 "from %s", len(train_data.episodes), len(train_data),
                 0 if validation_data is None else len(validation_data.episodes), setup.store.path)
        return train_data, validation_data
    train_records, validation_records = split_by_episode(setup.records, config.validation_percentage, setup.seed)
    train_data = records_to_dataset(train_records, setup.vocabulary).to(setup.device)
    validation_data = None
    if validation_records:
        validation_data = records_to_dataset(validation_records, setup.vocabulary).to(setup.device)
    log.info(
        "dataset: %d episodes (%d transitions) for training, %d held out for validation",
        len(train_records), len(train_data), len(validation_records or []),
    )
    return train_data, validation_data


def _global_batch(config: Any, setup: RunSetup) -> int:
    return config.nrollouts if setup.model_config.recurrent else config.batch_size


def make_sampler(data: TransitionDataset, setup: RunSetup) -> BatchSampler | SequenceSampler:
    """Transitions for a model without memory; chunks of consecutive ones for a model with it."""
    config = setup.algorithm
    if not setup.model_config.recurrent:
        return BatchSampler(data, config.batch_size, seed=setup.seed)
    # A chunk may be longer than any episode: it crosses episode ends, where a mask restarts the
    # state. It cannot be longer than the whole dataset.
    if config.rollout_len > len(data):
        raise MazerunError(
            f"{setup.prefix}.rollout_len={config.rollout_len} is longer than the whole training set "
            f"({len(data)} steps); use {setup.prefix}.rollout_len={len(data)} or less, or train on more episodes"
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
