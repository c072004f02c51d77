"""One early check of a composed `run` config: the run's sections, its algorithm and its pipeline.

:func:`validate` turns the tree Hydra composed into :class:`mazerun.config.schemas.RunConfig` with every
section as its dataclass (the algorithm's own ``Config``, each pipeline stage's), so that bad
input fails here, in one line that names the key, before any env, record or run directory is
touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mazerun.acting.envs import WRAPPER_SEPARATOR
from mazerun.algorithms import algorithm_config, algorithm_names
from mazerun.config.schemas import (
    NO_OP_WRAPPERS,
    RunConfig,
    available_memory,
    check_fields,
    check_rollout,
    check_training,
    structured,
)
from mazerun.core.errors import MazerunError

log = logging.getLogger(__name__)

RECORD_STAGE = "record"


@dataclass
class RecordStageConfig:
    """A pipeline stage that records the expert (the ``expert`` group, the env's heuristic by default)."""

    name: str = RECORD_STAGE
    n_episodes: int = 50
    """Episodes to record (the runner group's workers, seed and time limit apply)."""
    epsilon: float = 0.0
    """Share of the expert's actions replaced by random ones (noisy data for offline RL)."""

    @property
    def budget(self) -> int:
        return self.n_episodes

    def check(self, prefix: str) -> None:
        check_fields(self, prefix, positive=("n_episodes",), unit_interval=("epsilon",))


@dataclass
class PipelineConfig:
    """Stages trained one after another in one run; each stage starts from the one before."""

    name: str = "pipeline"
    stages: dict[str, Any] = field(default_factory=dict)
    """Stage name -> its algorithm's config (or a record stage's), in the order they run."""


def pipeline_config(values: Any) -> PipelineConfig:
    """The pipeline section with each stage as its config dataclass, range-checked."""
    pipeline = structured(PipelineConfig, values, "pipeline")
    if not pipeline.stages:
        raise MazerunError(f"pipeline {pipeline.name} has no stages; add pipeline.stages.<name>: {{name: <algorithm>}}")
    stages: dict[str, Any] = {}
    for index, (stage, section) in enumerate(pipeline.stages.items()):
        prefix = f"pipeline.stages.{stage}"
        if not isinstance(section, dict) or "name" not in section:
            raise MazerunError(f"{prefix} needs a name: record or an algorithm ({', '.join(algorithm_names())})")
        if section["name"] == RECORD_STAGE:
            stages[stage] = structured(RecordStageConfig, section, prefix)
            stages[stage].check(prefix)
        else:
            stages[stage] = algorithm_config(section, prefix)
    pipeline.stages = stages
    return pipeline


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Check a composed config against the schemas and the rules between keys."""
    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise MazerunError(f"{missing[0]} must be set (e.g. {missing[0]}=<value> on the command line)")
    config: RunConfig = structured(RunConfig, cfg)
    _apply_wrappers(config)
    check_rollout(config)
    if config.algorithm is not None and config.pipeline is not None:
        raise MazerunError("choose either algorithm=<name> or pipeline=<name>: a pipeline names its stages' algorithms")
    if config.algorithm is not None:
        config.algorithm = algorithm_config(config.algorithm)
    if config.pipeline is not None:
        config.pipeline = pipeline_config(config.pipeline)
    if config.hpo is not None:
        if config.pipeline is not None:
            raise MazerunError("hpo=evolution evolves one algorithm; drop pipeline and choose algorithm=<name>")
        from mazerun.compose.evolution import evolution_config  # torch, only when a search is asked for

        config.hpo = evolution_config(config.hpo, config.algorithm)
    if config.trains:
        check_training(config)
        _apply_maze_burn_in(config)
        check_sizes(config)
    return config


ROLLOUT_OVER_BUDGET = 64
"""One PPO rollout (``n_steps * runner.n_envs`` steps) may be at most this many times ``total_steps``.

The budget is rounded up to whole rollouts, so a small budget with many envs would train far
longer than asked (2,048 steps with 100,000 envs: 102M steps); the factor leaves room for the
tiny budgets of smoke runs (512 steps with the default 16 envs of 1,024 steps: 32 times)."""
BYTES_PER_PARAMETER = 4 * 4 * 3
"""float32 weights, their gradients and Adam's two moments, for up to three networks (actor, critic
or Q-function, target): the memory one hidden-layer parameter can cost."""


def check_sizes(config: RunConfig) -> None:
    """Sizes that cannot fit, refused before anything is allocated, in one line stating the limit.

    Network parameters and one batch's activations are estimated from ``model.hidden_sizes`` and
    the batch size against the memory available now (the input and output layers are left out:
    they are small next to a hidden layer that does not fit). A batch larger than the dataset is cut
    to the dataset's size, with one line, where the dataset is known (:class:`mazerun.data.tensors.BatchSampler`).
    """
    widths = _hidden_sizes(config.model)
    limit = available_memory()
    gib = 2**30
    parameters = sum(a * b + b for a, b in zip(widths, widths[1:])) + sum(widths)
    if parameters * BYTES_PER_PARAMETER > limit:
        raise MazerunError(
            f"model.hidden_sizes={list(widths)} has about {parameters:,} parameters per network, which with gradients, "
            f"Adam's moments and up to 3 networks take {parameters * BYTES_PER_PARAMETER / gib:,.1f} GiB, more than "
            f"the {limit / gib:,.1f} GiB of memory available; use smaller hidden sizes, e.g. model.hidden_sizes=[256,256]"
        )
    sections = [("algorithm", config.algorithm)] if config.pipeline is None else [
        (f"pipeline.stages.{name}", stage) for name, stage in config.pipeline.stages.items()]
    for prefix, section in sections:
        batch = getattr(section, "batch_size", None)
        if batch is not None and batch * (sum(widths) + 1) * 4 * 2 > limit:
            raise MazerunError(
                f"{prefix}.batch_size={batch} needs about {batch * (sum(widths) + 1) * 8 / gib:,.1f} GiB for one "
                f"batch's activations through model.hidden_sizes={list(widths)}, more than the {limit / gib:,.1f} GiB "
                f"of memory available; use a batch of at most {max(1, limit // ((sum(widths) + 1) * 8)):,}"
            )
        if hasattr(section, "total_steps") and hasattr(section, "n_steps"):
            rollout = section.n_steps * config.runner.n_envs
            if rollout > ROLLOUT_OVER_BUDGET * section.total_steps:
                envs = max(1, ROLLOUT_OVER_BUDGET * section.total_steps // section.n_steps)
                raise MazerunError(
                    f"one rollout of {prefix}.n_steps * runner.n_envs = {section.n_steps} * {config.runner.n_envs} = "
                    f"{rollout:,} steps is more than {ROLLOUT_OVER_BUDGET} times {prefix}.total_steps="
                    f"{section.total_steps} (budgets are rounded up to whole rollouts); use runner.n_envs={envs} "
                    f"or fewer, or raise {prefix}.total_steps"
                )


def _hidden_sizes(model: Any) -> tuple[int, ...]:
    """The model group's hidden sizes, when given as whole numbers (the model's own check names anything else)."""
    values = model.get("hidden_sizes") if isinstance(model, dict) else None
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return ()
    return tuple(max(0, v) for v in values)


def _apply_wrappers(config: RunConfig) -> None:
    """``wrappers=mask_velocity`` joins the env id (``CartPole-v1+mask_velocity``), which records and checkpoints carry."""
    wrapper = config.wrappers.name if config.wrappers is not None else None
    if wrapper is None or wrapper in NO_OP_WRAPPERS:
        return
    if config.env.name is None:
        raise MazerunError(f"wrappers={wrapper} needs the env it wraps: add env=<id>, e.g. env=CartPole-v1")
    config.env.name = f"{config.env.name}{WRAPPER_SEPARATOR}{wrapper}"


def _apply_maze_burn_in(config: RunConfig) -> None:
    """Maze's ``runner.critic_burn_in_epochs`` sets ``critic_burn_in_epochs`` of every PPO section."""
    epochs = config.runner.critic_burn_in_epochs
    if epochs is None:
        return
    if epochs < 0:
        raise MazerunError(f"runner.critic_burn_in_epochs={epochs} must be >= 0")
    sections = [config.algorithm] if config.pipeline is None else list(config.pipeline.stages.values())
    sections = [section for section in sections if hasattr(section, "critic_burn_in_epochs")]
    if not sections:
        raise MazerunError("runner.critic_burn_in_epochs applies to PPO; use it with algorithm=ppo")
    for section in sections:
        section.critic_burn_in_epochs = epochs
    log.info("runner.critic_burn_in_epochs=%d (Maze's key) sets PPO's critic_burn_in_epochs", epochs)
