"""Pipelines: stages trained one after another in one run directory (``run pipeline=<name>``).

Each stage runs in a sub-directory that is a normal run directory (checkpoints, metrics.csv,
TensorBoard events, or the trajectory_data of a ``record`` stage). A training stage starts
from the policy of the training stage before it and learns from the newest recording stage's
data unless ``runner.dataset.dir_or_file`` names other records. Every stage logs against one
counter: a stage's steps (updates or env steps) follow on from where the stage before ended,
so their curves line up in TensorBoard and in the pipeline's ``learning_curve.svg``.

``pipeline.json`` lists the stages, where each one ran and whether it finished. A pipeline
run given as ``input_dir`` is continued: its finished stages are kept where they are, the
first unfinished one continues from its ``last.pt`` (or starts again), and the rest follow.
A stage whose budget was raised on the command line counts as unfinished, which is how a
finished pipeline is extended.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mazerun.acting.rollout import rollout
from mazerun.compose.validation import RECORD_STAGE, PipelineConfig, RecordStageConfig
from mazerun.config.schemas import PolicyConfig, RunConfig
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write_bytes
from mazerun.data.records import STORE_DIR, TRAJECTORY_DIR, finished_recording
from mazerun.nn.checkpoint import LAST_CHECKPOINT, PIPELINE_MANIFEST, read_pipeline_manifest
from mazerun.training.metrics import LEARNING_CURVE, evaluation_curve, plot_curves
from mazerun.training.runsetup import TrainResult
from mazerun.training.train import train_stage

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "mazerun-pipeline"


@dataclass
class StageEntry:
    """One stage as ``pipeline.json`` lists it."""

    name: str
    algorithm: str
    """An algorithm's name, or ``record``."""
    dir: str
    finished: bool = False
    step: int = 0
    """The budget counter the stage reached (episodes recorded, updates or env steps)."""
    global_step: int = 0
    """Where the stage ended on the pipeline's counter."""


def _write_manifest(run_dir: Path, pipeline: PipelineConfig, entries: list[StageEntry]) -> None:
    manifest = {"format": MANIFEST_FORMAT, "pipeline": pipeline.name,
                "stages": [dataclasses.asdict(entry) for entry in entries]}
    atomic_write_bytes(run_dir / PIPELINE_MANIFEST, json.dumps(manifest, indent=2).encode())


def _previous_entries(input_dir: str | None) -> dict[str, StageEntry] | None:
    if input_dir is None:
        return None
    manifest = read_pipeline_manifest(Path(input_dir)) if Path(input_dir).is_dir() else None
    if manifest is None:
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise MazerunError(f"{Path(input_dir) / PIPELINE_MANIFEST} is not a mazerun pipeline manifest")
    return {entry["name"]: StageEntry(**entry) for entry in manifest["stages"]}


def plan(pipeline: PipelineConfig, run_dir: Path, input_dir: str | None) -> tuple[list[StageEntry], int, str | None]:
    """The stage entries of this run, the index of the first stage to train, and the run it continues.

    Finished stages of a continued pipeline keep their directories; the first stage that has
    not reached its (possibly raised) budget, and every stage after it, run in ``run_dir``.
    """
    previous = _previous_entries(input_dir)
    entries: list[StageEntry] = []
    first_to_run = None
    continues: str | None = None
    for index, (name, stage) in enumerate(pipeline.stages.items()):
        old = previous.get(name) if previous else None
        if first_to_run is None and old is not None and old.algorithm == stage.name:
            if old.finished and old.step >= stage.budget:
                entries.append(old)
                continue
            if (Path(old.dir) / LAST_CHECKPOINT).is_file():
                continues = old.dir
        if first_to_run is None:
            first_to_run = index
        entries.append(StageEntry(name=name, algorithm=stage.name, dir=str(run_dir / name)))
    if previous is not None and first_to_run is None:
        last = list(pipeline.stages)[-1]
        budget_key = getattr(pipeline.stages[last], "budget_key", "n_episodes")
        raise MazerunError(
            f"pipeline {input_dir} finished all its stages ({', '.join(pipeline.stages)}); to train longer raise a "
            f"stage's budget, e.g. pipeline.stages.{last}.{budget_key}=<more>, or start a new run from its policy "
            f"with input_dir={input_dir} and algorithm=<name>"
        )
    return entries, first_to_run or 0, continues


def run_pipeline(config: RunConfig, run_dir: Path) -> TrainResult:
    """Run the stages of ``config.pipeline`` in order in ``run_dir``; returns the last training stage's result."""
    pipeline: PipelineConfig = config.pipeline
    previous_is_pipeline = _previous_entries(config.input_dir) is not None
    entries, first_to_run, continues = plan(pipeline, run_dir, config.input_dir)
    torch.manual_seed(config.runner.seed)
    _write_manifest(run_dir, pipeline, entries)
    dataset = config.runner.dataset.dir_or_file
    start_from = None if previous_is_pipeline else config.input_dir
    step_offset = 0
    result: TrainResult | None = None
    for index, (entry, stage) in enumerate(zip(entries, pipeline.stages.values())):
        stage_dir = Path(entry.dir)
        if index < first_to_run:
            log.info("stage %s: finished in %s", entry.name, stage_dir)
        else:
            if index > first_to_run:
                continues = None
            log.info("stage %d/%d: %s (%s) in %s", index + 1, len(entries), entry.name, entry.algorithm, stage_dir)
            try:
                if isinstance(stage, RecordStageConfig):
                    entry.step = _record(config, stage, stage_dir)
                    entry.global_step = step_offset
                else:
                    result = train_stage(
                        config, stage, stage_dir, prefix=f"pipeline.stages.{entry.name}",
                        input_dir=continues or start_from, dataset=dataset or _recorded(entries[:index]),
                        step_offset=step_offset, continue_hint=run_dir,
                    )
                    entry.step, entry.global_step = result.step, result.global_step
            except KeyboardInterrupt as interrupt:
                raise interrupts.restated(interrupt, f"pipeline {pipeline.name}, stage {entry.name}: {interrupt}") from None
            finally:
                _write_curve(run_dir, pipeline, entries)
            entry.finished = True
            _write_manifest(run_dir, pipeline, entries)
        step_offset = entry.global_step
        if entry.algorithm != RECORD_STAGE:
            start_from = entry.dir
            result = result if index >= first_to_run else TrainResult.read(stage_dir)
    if result is None:
        raise MazerunError(f"pipeline {pipeline.name} has no training stage; add one after its record stage")
    log.info("pipeline %s done: %s", pipeline.name, ", ".join(entry.name for entry in entries))
    return result


def _record(config: RunConfig, stage: RecordStageConfig, stage_dir: Path) -> int:
    """A record stage: the expert's episodes into ``stage_dir/trajectory_data``; returns how many."""
    expert = config.expert
    policy = PolicyConfig(name=expert.name if expert else "heuristic", epsilon=stage.epsilon,
                          deterministic=expert.deterministic if expert else True, sees=expert.sees if expert else None)
    runner = dataclasses.replace(config.runner, n_episodes=stage.n_episodes)
    env_id = config.env.name or _expert_env(config)
    stats = rollout(env_id, policy, runner, stage_dir, input_dir=expert.input_dir if expert else None)
    return int(stats["episode_count"])


def _expert_env(config: RunConfig) -> str:
    """A record stage without ``env=`` records in the teacher's env (torch_policy), else the default env."""
    from mazerun.config.schemas import DEFAULT_ENV_ID
    from mazerun.nn.checkpoint import load_checkpoint

    expert = config.expert
    if expert is not None and expert.name == "torch_policy" and expert.input_dir:
        return load_checkpoint(expert.input_dir).env_id
    return DEFAULT_ENV_ID


def _recorded(entries: list[StageEntry]) -> str | None:
    """The trajectory_data (or, without pickles, the columnar store) of the newest record stage before this one."""
    for entry in reversed(entries):
        data = Path(entry.dir) / TRAJECTORY_DIR
        if not data.is_dir() and (Path(entry.dir) / STORE_DIR).is_dir():
            data = Path(entry.dir) / STORE_DIR  # runner.record_trajectory=false with runner.store=columnar
        if entry.algorithm == RECORD_STAGE and finished_recording(data) is not None:
            return str(data)
    return None


def _write_curve(run_dir: Path, pipeline: PipelineConfig, entries: list[StageEntry]) -> None:
    """Every training stage's evaluation return on the pipeline's counter, one line each."""
    curves: dict[str, Any] = {}
    for entry in entries:
        steps, returns = evaluation_curve(Path(entry.dir))
        if steps:
            curves[f"{entry.name} ({entry.algorithm})"] = (steps, returns)
    if curves:
        plot_curves(run_dir / LEARNING_CURVE, curves, f"pipeline {pipeline.name}", xlabel="steps (all stages)")
