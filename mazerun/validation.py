"""One early check of a composed `run` config: the run's sections, its algorithm and its pipeline.

:func:`validate` turns the tree Hydra composed into :class:`mazerun.config.RunConfig` with every
section as its dataclass (the algorithm's own ``Config``, each pipeline stage's), so that bad
input fails here, in one line that names the key, before any env, record or run directory is
touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mazerun.algorithms import ALGORITHMS, algorithm_config
from mazerun.config import NO_OP_WRAPPERS, RunConfig, check_fields, check_rollout, check_training, structured
from mazerun.envs import WRAPPER_SEPARATOR
from mazerun.errors import MazerunError

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
            raise MazerunError(f"{prefix} needs a name: record or an algorithm ({', '.join(sorted(ALGORITHMS))})")
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
        from mazerun.evolution import evolution_config  # torch, only when a search is asked for

        config.hpo = evolution_config(config.hpo, config.algorithm)
    if config.trains:
        check_training(config)
        _apply_maze_burn_in(config)
    return config


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
