"""Training one algorithm: prepare the run, hand it to the loop the algorithm names, return the result.

Each algorithm's ``Config.loop`` says which loop trains it (``offline``, ``on_policy``,
``interactive`` or ``off_policy``); loops are imported on first use. Process-wide settings (the seed of torch's
global generator, which initialises networks, and the CPU thread count) are made here, above
the loops, so a loop never changes what another learner in the process sees.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from mazerun.config.schemas import RunConfig
from mazerun.training.runsetup import TrainResult, prepare

LOOPS = {
    "offline": ("mazerun.training.loops.offline", "train_offline"),
    "on_policy": ("mazerun.training.loops.onpolicy", "train_on_policy"),
    "interactive": ("mazerun.training.loops.interactive", "train_interactive"),
    "off_policy": ("mazerun.training.loops.offpolicy", "train_off_policy"),
}

SINGLE_THREADED_LOOPS = ("on_policy", "interactive")
"""Loops of many tiny ops (one env step, one small minibatch): on the CPU, more threads only add
synchronisation, and spin on a busy machine. Offline batches of 256 gain from every core."""

DEFAULT_THREADS = torch.get_num_threads()
"""Torch's thread count at import (OMP_NUM_THREADS or every usable core): what offline training and the population use."""


def train(config: RunConfig, run_dir: Path) -> TrainResult:
    """Train the algorithm of ``config`` in ``run_dir`` (``input_dir`` and ``runner.dataset`` as given)."""
    torch.manual_seed(config.runner.seed)
    return train_stage(config, config.algorithm, run_dir, input_dir=config.input_dir,
                       dataset=config.runner.dataset.dir_or_file)


def train_stage(
    config: RunConfig,
    algorithm_config: Any,
    run_dir: Path,
    *,
    prefix: str = "algorithm",
    input_dir: str | None = None,
    dataset: Any = None,
    step_offset: int = 0,
    continue_hint: Path | None = None,
) -> TrainResult:
    """One algorithm's training in ``run_dir``: a whole run, or one stage of a pipeline."""
    loop = algorithm_config.loop
    setup = prepare(config, algorithm_config, run_dir, prefix=prefix, input_dir=input_dir, dataset=dataset,
                    step_offset=step_offset, continue_hint=continue_hint, stream=loop == "offline")
    single = loop in SINGLE_THREADED_LOOPS and setup.device.type == "cpu"
    torch.set_num_threads(1 if single else DEFAULT_THREADS)
    module, function = LOOPS[loop]
    return getattr(importlib.import_module(module), function)(setup)
