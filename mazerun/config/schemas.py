"""Structured configs: the schema every composed `run` config is checked against, once, early.

Hydra composes YAML groups (``env``, ``policy``, ``runner``, ``algorithm``, ``pipeline``...)
into one tree; :func:`mazerun.compose.validation.validate` turns that tree into the plain dataclasses
below, with one-line errors that name the key and say how to fix it. Nothing past validation
reads OmegaConf objects. This module knows no algorithm: each algorithm's own ``Config``
dataclass lives in its file under :mod:`mazerun.algorithms`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mazerun.config.plugins import POLICY_PLUGINS, plugins_beside
from mazerun.core.errors import MazerunError
from mazerun.core.schedules import SCHEDULE_KINDS

DEFAULT_ENV_ID = "LunarLander-v3"

PLANNER_SEES = ("agent", "all")
"""What the planner plans on: the cells the agent has seen this episode (demonstrations a clone with the agent's
view can imitate), or the full state (the shortest plan)."""


@dataclass
class EnvConfig:
    name: Optional[str] = None
    """A gymnasium id (MiniGrid/BabyAI ids included); removed v2 ids map to v3. None: the env
    of the input (records, input_dir checkpoint), else LunarLander-v3."""


@dataclass
class PolicyConfig:
    name: str = "heuristic"
    """heuristic | planner | bot | random | torch_policy | onnx (``lunar_lander_heuristics`` is heuristic), or a
    plugin's."""
    epsilon: float = 0.0
    """Share of actions replaced by random ones, for noisy datasets."""
    deterministic: bool = True
    """torch_policy and onnx: greedy actions (argmax / mean); false samples from the policy."""
    path: Optional[str] = None
    """onnx: the file ``python -m mazerun.export <run> --format onnx`` wrote (its ``.json`` lies beside it)."""
    sees: Optional[str] = None
    """planner, and heuristic where it is the planner: plan on the cells the agent has seen this episode (agent:
    demonstrations a clone with the agent's view can imitate) or on the full state (all: the shortest plan);
    null: the policy's own, agent for heuristic, all for planner."""


@dataclass
class ExpertConfig:
    """The teacher of ``algorithm=dagger`` and of a pipeline's ``record`` stage."""

    name: str = "heuristic"
    """heuristic (the env's scripted expert), planner or bot (MiniGrid/BabyAI), random, torch_policy, or a
    plugin's policy."""
    input_dir: Optional[str] = None
    """torch_policy: the trained run (or checkpoint file) that teaches."""
    deterministic: bool = True
    """torch_policy: greedy labels; false samples them from the teacher's policy."""
    sees: Optional[str] = None
    """planner, and heuristic where it is the planner: label from the cells the agent has seen (agent) or from the
    full state (all); null: agent for heuristic, all for planner (see ``PolicyConfig.sees``)."""


@dataclass
class WrappersConfig:
    name: Optional[str] = None
    """mask_velocity (hide velocities: a POMDP), or vector_obs (Maze's name; nothing to wrap)."""


NO_OP_WRAPPERS = ("vector_obs",)


@dataclass
class DatasetConfig:
    dir_or_file: Any = None
    """A trajectory_data directory, a record file, or a list of either; default: newest finished recording under outputs/."""
    max_episodes: Optional[int] = None
    """Train on the first N episodes only (records sort by episode index), so one command serves a small and a full dataset."""


@dataclass
class RunnerConfig:
    type: str = "parallel"
    """sequential (one process) or parallel (episodes spread over worker processes)."""
    n_episodes: int = 50
    n_workers: Optional[int] = None
    """Worker processes for the parallel runner; default: the CPUs this process may use."""
    max_episode_steps: Optional[int] = None
    """Time limit per episode; default: the env's own."""
    seed: int = 0
    """Episode i is seeded seed + i, whatever the number of workers; training is seeded with it too."""
    render: bool = False
    record_video: bool = False
    record_trajectory: bool = True
    store: Optional[str] = None
    """``columnar``: also write the episodes as a columnar store under ``<run>/trajectory_store``."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    eval_repeats: int = 10
    """Training: episodes per evaluation rollout (deterministic actions, fixed seeds)."""
    n_envs: int = 16
    """PPO, DAgger and SAC: environments stepped side by side."""
    vector: str = "auto"
    """PPO, DAgger and SAC: how the env copies step. sync: in the main process. worker: a worker process steps half
    of them over shared memory while the main process acts on the other half and steps it (two cores). async: one
    process per copy (gymnasium's). auto: worker where two CPUs are usable, else sync. Every mode gives the same
    results."""
    critic_burn_in_epochs: Optional[int] = None
    """Maze's name for ``algorithm.critic_burn_in_epochs`` (PPO); accepted so seed 004's command runs."""


@dataclass
class RunConfig:
    """The whole composed config of one `run` invocation."""

    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    algorithm: Any = None
    """None rolls out a policy; a mapping with a ``name`` trains that algorithm."""
    pipeline: Any = None
    """None, or a pipeline of stages (``pipeline=bc_ppo``) trained one after another in one run."""
    expert: Optional[ExpertConfig] = None
    """The teacher of DAgger and of record stages; None: the env's heuristic."""
    hpo: Any = None
    """None, or a hyper-parameter search over the algorithm (``hpo=evolution``: a population)."""
    input_dir: Optional[str] = None
    """An earlier run (or checkpoint file) to start from, to continue, or to roll out."""
    device: str = "auto"
    optimized_metric: Optional[str] = None
    """What the run returns to a Hydra sweeper: None = its selection metric at its best; a logged
    metric (``eval/mean_return``) or a rollout statistic (``mean``) = its value at the last report."""
    model: Any = None
    wrappers: Optional[WrappersConfig] = None
    critic: Any = None
    command_line: List[str] = field(default_factory=list)
    """The overrides `run` was given (Hydra's task overrides; set by the CLI, not a key to write): an
    algorithm's defaults for the observation kind (:func:`mazerun.config.tuned.with_kind_defaults`) never
    replace a key named there."""

    @property
    def trains(self) -> bool:
        return self.algorithm is not None or self.pipeline is not None


RUNNER_TYPES = ("sequential", "parallel")
VECTOR_MODES = ("auto", "sync", "worker", "async")
"""``runner.vector``: how PPO's and DAgger's env copies step (:mod:`mazerun.acting.vector`)."""
HEURISTIC_ALIASES = ("heuristic", "lunar_lander_heuristics")
POLICY_NAMES = (*HEURISTIC_ALIASES, "planner", "bot", "random", "torch_policy", "onnx")
"""The built-in policies; installed packages add more (:func:`policy_names`)."""
NOT_EXPERTS = ("onnx",)
"""Policies that cannot teach: the expert section has no ``path`` for an exported file."""


def policy_names() -> tuple[str, ...]:
    """Every policy ``policy=`` and (but :data:`NOT_EXPERTS`) ``expert=`` take: the built-ins, then those of
    installed plugins (entry point group ``mazerun.policies``)."""
    return (*POLICY_NAMES, *sorted(plugins_beside(POLICY_NAMES, POLICY_PLUGINS, "policy")))


def structured(schema: type, values: Any, prefix: str = "") -> Any:
    """``values`` (a mapping) checked against the dataclass ``schema``, as an instance of it.

    Every float field is also checked to be finite: ``lr=nan`` would pass any ``<= 0`` check.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        instance = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        message = str(getattr(error, "msg", None) or error).splitlines()[0]
        key = getattr(error, "full_key", None)
        where = ".".join(part for part in (prefix, key) if part)
        place = f" at {where}" if where else ""
        raise MazerunError(f"invalid config{place}: {message}; fix that override or YAML key") from None
    check_finite(instance, prefix)
    return instance


def check_finite(instance: Any, prefix: str = "") -> None:
    """Refuse NaN and infinite floats anywhere in a dataclass tree, naming the key."""
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        key = f"{prefix}.{item.name}" if prefix else item.name
        if isinstance(value, float) and not math.isfinite(value):
            raise MazerunError(f"{key}={value} must be a finite number")
        if dataclasses.is_dataclass(value):
            check_finite(value, key)


def check_fields(
    config: Any, prefix: str, positive: tuple[str, ...] = (), unit_interval: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (), schedules: tuple[str, ...] = (),
) -> None:
    """Shared range checks of config sections: name the key and the range (or, for schedules, the kinds) it needs."""
    for key in positive:
        value = getattr(config, key)
        if value <= 0:
            raise MazerunError(f"{prefix}.{key}={value} must be > 0")
    for key in non_negative:
        value = getattr(config, key)
        if value < 0:
            raise MazerunError(f"{prefix}.{key}={value} must be >= 0")
    for key in unit_interval:
        value = getattr(config, key)
        if not 0.0 <= value <= 1.0:
            raise MazerunError(f"{prefix}.{key}={value} must lie in [0, 1]")
    for key in schedules:
        value = getattr(config, key)
        if value not in SCHEDULE_KINDS:
            raise MazerunError(f"{prefix}.{key}={value!r} is unknown; use {' or '.join(SCHEDULE_KINDS)}")


def check_rollout(config: RunConfig) -> None:
    """The policy and runner keys every `run` reads."""
    runner = config.runner
    if runner.type not in RUNNER_TYPES:
        raise MazerunError(f"runner.type={runner.type!r} is unknown; use runner=sequential or runner=parallel")
    if runner.n_episodes <= 0:
        raise MazerunError(f"runner.n_episodes={runner.n_episodes} must be at least 1")
    if runner.n_workers is not None and runner.n_workers <= 0:
        raise MazerunError(f"runner.n_workers={runner.n_workers} must be at least 1 (or null for one per usable CPU)")
    if runner.max_episode_steps is not None and runner.max_episode_steps <= 0:
        raise MazerunError(
            f"runner.max_episode_steps={runner.max_episode_steps} must be at least 1 (or null for the env's limit)"
        )
    if runner.seed < 0:
        raise MazerunError(f"runner.seed={runner.seed} must be >= 0")
    if runner.store not in (None, "columnar"):
        raise MazerunError(f"runner.store={runner.store!r} is unknown; use runner.store=columnar or leave it null")
    if runner.dataset.max_episodes is not None and runner.dataset.max_episodes <= 0:
        raise MazerunError(f"runner.dataset.max_episodes={runner.dataset.max_episodes} must be >= 1 (or null for all)")
    policy = config.policy
    names = policy_names()
    if policy.name not in names:
        raise MazerunError(f"policy.name={policy.name!r} is unknown; choose one of {', '.join(names)}")
    if not 0.0 <= policy.epsilon <= 1.0:
        raise MazerunError(f"policy.epsilon={policy.epsilon} must lie in [0, 1]")
    for section in (policy, config.expert):
        if section is not None and section.sees not in (None, *PLANNER_SEES):
            key = "policy" if section is policy else "expert"
            raise MazerunError(f"{key}.sees={section.sees!r} is unknown; use {' or '.join(PLANNER_SEES)}")
    if policy.name == "onnx" and not policy.path:
        raise MazerunError("policy=onnx needs policy.path=<an .onnx file written by python -m mazerun.export>")
    expert = config.expert
    if expert is not None:
        experts = tuple(name for name in names if name not in NOT_EXPERTS)
        if expert.name not in experts:
            raise MazerunError(f"expert.name={expert.name!r} is unknown; choose one of {', '.join(experts)}")
        if expert.name == "torch_policy" and not expert.input_dir:
            raise MazerunError("expert=torch_policy needs expert.input_dir=<a trained run's output directory>")


def check_training(config: RunConfig) -> None:
    """The runner and device keys every training run reads."""
    runner = config.runner
    if runner.eval_repeats <= 0:
        raise MazerunError(f"runner.eval_repeats={runner.eval_repeats} must be at least 1")
    if runner.n_envs <= 0:
        raise MazerunError(f"runner.n_envs={runner.n_envs} must be at least 1")
    if runner.vector not in VECTOR_MODES:
        raise MazerunError(f"runner.vector={runner.vector!r} is unknown; use {', '.join(VECTOR_MODES)}")
    if runner.vector == "worker" and runner.n_envs < 2:
        raise MazerunError(f"runner.vector=worker steps half of the env copies in a worker and runner.n_envs="
                           f"{runner.n_envs}; use runner.n_envs >= 2 or runner.vector=sync")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise MazerunError(f"device={config.device!r} is unknown; use auto, cpu or cuda")


def available_memory() -> int:
    """Bytes of memory this machine can still give (``MemAvailable``), else its physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(shape: tuple[int, ...], dtype: Any, what: str, fix: str = "") -> None:
    """Refuse, before allocating, an array of ``shape`` larger than the memory available now."""
    import numpy as np

    size = math.prod(int(dim) for dim in shape) * np.dtype(dtype).itemsize
    limit = available_memory()
    if size > limit:
        raise MazerunError(f"{what} would take {size / 2**30:,.1f} GiB ({tuple(shape)} of {np.dtype(dtype)}), more than "
                           f"the {limit / 2**30:,.1f} GiB of memory available{'; ' + fix if fix else ''}")


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU quota of this container or job: ``<quota> <period>`` in microseconds, or ``max <period>``."""


def usable_cpus(cpu_max: Path) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 quota in ``cpu_max``.

    ``os.cpu_count()`` counts the whole node; a job that a scheduler pinned to a few cores, or
    a container with a quota, would start one worker per core of the node and oversubscribe
    the CPUs it shares. A fractional quota (1.5 CPUs) is rounded up, as Go and the JVM do.
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        pass  # no cgroup v2 quota here, or one written in a form we do not know: no cap
    return max(1, cpus)


def worker_count(runner: RunnerConfig) -> int:
    """Workers for the parallel runner: as asked, else one per usable CPU, never more than episodes."""
    wanted = runner.n_workers or usable_cpus(CGROUP_CPU_MAX)
    return max(1, min(wanted, runner.n_episodes))
