"""The `run` command: Hydra composes the config, this module hands it to plain functions.

The task function returns each job's selection metric (or the metric ``optimized_metric``
names), so a Hydra sweeper (Optuna) can read it, and it never exits: a failed job of a ``-m``
sweep is reported and the sweep goes on. :func:`main` decides the exit code once Hydra
returns, and turns Hydra's own multi-line reports (a misspelt key, an unknown group, an
override it cannot parse, a launcher plugin that is not installed) into one line.

Jobs of a sweep may run in other processes (joblib, submitit, Ray): a job that fails leaves
``failed.txt`` (its one-line error) in its directory, and :class:`SweepOutcome`, a Hydra
callback in the main process, counts them when the sweep ends. Under ``torchrun`` every rank
runs this module; rank 0 lets Hydra pick the run directory and tells the other ranks (see
:mod:`mazerun.training.distributed`).
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

from mazerun.compose.validation import RECORD_STAGE, validate
from mazerun.config import plugins
from mazerun.config.schemas import RunConfig
from mazerun.config.tuned import applied_tuned_defaults, config_dirs
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.core.rundir import FAILED_JOB, RESULT_FILE, RUN_LOCK, take_lock
from mazerun.training import distributed

log = logging.getLogger("mazerun")

CONFIG_GROUPS = ("env", "policy", "runner", "algorithm", "pipeline", "expert", "model", "wrappers", "critic", "hpo")
PLUGIN_EXTRAS = {"joblib": "launchers", "submitit_local": "launchers", "submitit_slurm": "launchers",
                 "optuna": "launchers", "ray": "ray"}
"""Hydra launcher and sweeper plugins, and the mazerun extra that installs each."""
RUN_OUTPUTS = ("trajectory_data", "trajectory_store", "best.pt", "last.pt", "metrics.csv", "pipeline.json",
               RESULT_FILE, "rollout_stats.json")
"""What a run leaves in its directory; finding any of them means the directory was used before."""


def _config_dir() -> str:
    """The directory Hydra composes `run` from: mazerun's conf/."""
    return str(plugins.config_dir())


def execute(config: RunConfig, run_dir: Path) -> float:
    """Roll out, train or run a pipeline, as the config says; returns the metric a sweeper optimises (NaN if none).

    That is the run's selection metric (best ``eval/mean_return``, or best
    ``validation/policy_loss`` for BC with a validation split; a recording's mean return), or,
    with ``optimized_metric=<group>/<name>``, that metric's value at the run's last report.
    """
    metric = _run(config, run_dir)
    if config.optimized_metric is None:
        return metric
    from mazerun.training.metrics import last_value

    return last_value(run_dir, config.optimized_metric)


def _run(config: RunConfig, run_dir: Path) -> float:
    if config.hpo is not None:
        from mazerun.compose.population import train_population

        return _metric(train_population(config, run_dir).best)
    if config.pipeline is not None:
        from mazerun.compose.pipeline import run_pipeline

        return _metric(run_pipeline(config, run_dir).best)
    if config.algorithm is not None:
        from mazerun.training.train import train

        return _metric(train(config, run_dir).best)
    from mazerun.acting.rollout import run_rollout

    return _metric(run_rollout(config, run_dir)["mean"])


def _metric(value: float | None) -> float:
    return float("nan") if value is None else float(value)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this run alone: another run there at the same time, or before, would mix outputs."""
    if run_dir.resolve() == Path.cwd().resolve():
        raise MazerunError(f"hydra.run.dir names the current directory {run_dir}, which the run would fill with its "
                           "outputs; give it a directory of its own, e.g. hydra.run.dir=outputs/<name>")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_LOCK, "a+") as lock:
        if not take_lock(lock):
            raise MazerunError(f"{run_dir} is in use by another run; give each run its own hydra.run.dir")
        used = sorted(name for name in RUN_OUTPUTS if (run_dir / name).exists())
        if used:
            raise MazerunError(
                f"{run_dir} already holds an earlier run's {', '.join(used)}; choose a new hydra.run.dir, "
                f"or continue that run with input_dir={run_dir}"
            )
        yield


class _Jobs:
    """How the jobs of this invocation ended (a ``-m`` sweep runs several, maybe in other processes)."""

    failed = 0
    run_dir_shared = False
    """Rank 0 of a torchrun job has told the other ranks where the run is."""
    claimed: Path | None = None
    """The run directory :meth:`SweepOutcome.on_run_start` claimed for this process, before Hydra wrote into it."""
    claim = contextlib.ExitStack()
    """Holds that claim (its lock) until :func:`main` returns."""


class SweepOutcome(Callback):
    """mazerun's Hydra callback (see ``conf_rollout.yaml``): claims a single run's directory before Hydra
    writes into it, and counts the failed jobs of a ``-m`` sweep, wherever its launcher ran them."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse a used or busy ``hydra.run.dir`` here: Hydra writes ``.hydra/`` and opens ``run.log`` right after,
        so a check in the task function would already have changed the run it refuses.

        Hydra turns an exception of a callback into a warning, so the refusal exits here (SystemExit passes).
        """
        world = distributed.current_world()
        if not world.writes:
            return
        run_dir = Path(os.path.abspath(str(config.hydra.run.dir)))  # as Hydra's run_job resolves it
        try:
            _Jobs.claim.enter_context(claim_run_dir(run_dir))
        except MazerunError as error:
            _fail(str(error), world)
        except OSError as error:
            _fail(unwritable(error), world)
        _Jobs.claimed = run_dir

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse a ``hydra.sweep.dir`` that holds an earlier sweep's jobs: Hydra would rewrite their ``.hydra/``
        (and the jobs refuse their used directories only after that)."""
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.started = time.time() - 1
        used = sorted(str(job.relative_to(self.sweep_dir)) for job in self.sweep_dir.glob("*/")
                      if job.is_dir() and ((job / ".hydra").is_dir() or any((job / name).exists() for name in RUN_OUTPUTS)))
        if used:
            _fail(f"{self.sweep_dir} already holds the jobs of an earlier sweep ({', '.join(used[:5])}); choose a new "
                  "hydra.sweep.dir", distributed.current_world())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = [path for path in self.sweep_dir.rglob(FAILED_JOB) if path.stat().st_mtime >= self.started]
        _Jobs.failed = len(failed)
        if failed:  # each job said why on its own error line; this one says which, beside them on stderr
            print(f"{len(failed)} job{'s' * (len(failed) > 1)} of this sweep failed: "
                  f"{', '.join(str(path.parent) for path in sorted(failed))}", file=sys.stderr)


@hydra.main(config_path=_config_dir(), config_name="conf_rollout", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    world = distributed.current_world()
    if world.distributed and world.writes:
        distributed.share_run_dir(str(run_dir))
        _Jobs.run_dir_shared = True
    sweep = hydra_config.mode == RunMode.MULTIRUN
    try:
        config = validate(cfg)
        config.command_line = list(hydra_config.overrides.task)
        check_optimized_metric(config)
        check_data_parallel(config, world)
        if sweep:
            check_sweep_dataset(config)
        claimed = not world.writes or _Jobs.claimed == run_dir  # a sweep's job claims its directory here
        with contextlib.nullcontext() if claimed else claim_run_dir(run_dir):
            for line in applied_tuned_defaults(hydra_config.runtime.choices,
                                               config_dirs(hydra_config.runtime.config_sources),
                                               hydra_config.overrides.task):
                log.info("%s", line)
            return execute(config, run_dir)
    except MazerunError as error:
        if world.writes:
            log.error("error: %s", error)
        if sweep:
            _mark_failed(run_dir, str(error))
        _Jobs.failed += 1
        return failed_job_value(hydra_config.sweeper)
    except KeyboardInterrupt as interrupt:
        if world.writes:
            log.error("interrupted: %s", interrupt or "stopped by the user")
        raise


def failed_job_value(sweeper: Any) -> float:
    """What a failed job returns: NaN, or for Optuna the worst value of its direction.

    hydra-optuna-sweeper (1.3, on optuna 2.10) cannot record a NaN trial as failed: it stops
    the sweep with a traceback. The worst value keeps the sweep going and steers the search
    away, while the job's error line, its failed.txt and the exit code say it failed.
    """
    if "optuna" not in str(getattr(sweeper, "_target_", "") or "").lower():
        return float("nan")
    direction = getattr(sweeper, "direction", "minimize")
    if isinstance(direction, (list, tuple, ListConfig)):  # several objectives: the first is the one returned
        direction = direction[0] if len(direction) else "minimize"
    first = str(getattr(direction, "name", direction)).lower()  # a str, or optuna's Direction enum
    return float("-inf") if "max" in first else float("inf")


def _mark_failed(run_dir: Path, message: str) -> None:
    from mazerun.core.files import atomic_write_bytes

    try:
        atomic_write_bytes(run_dir / FAILED_JOB, f"error: {message}\n".encode())
    except MazerunError as error:  # a full disk: the log line above still says what failed
        log.error("could not mark the job as failed: %s", error)


ROLLOUT_STATISTICS = ("mean", "std", "min", "max", "median_step_count", "mean_step_count", "total_step_count",
                      "episode_count", "success_rate")


def check_optimized_metric(config: RunConfig) -> None:
    """A misspelt optimized_metric fails before the run, not after it (as far as names are known up front)."""
    name = config.optimized_metric
    if name is None:
        return
    if not config.trains and name not in ROLLOUT_STATISTICS:
        raise MazerunError(f"optimized_metric={name} is not a statistic of a recording; choose one of: "
                           f"{', '.join(ROLLOUT_STATISTICS)}")
    if config.trains and "/" not in name:
        raise MazerunError(f"optimized_metric={name} names no logged metric; write <group>/<name> as in metrics.csv, "
                           "e.g. eval/mean_return or validation/policy_loss")


def check_data_parallel(config: RunConfig, world: distributed.World) -> None:
    """Under torchrun with more than one process, only bc, cql and iql train (see :mod:`mazerun.training.distributed`)."""
    if not world.distributed:
        return
    if config.pipeline is not None:
        what, loop = "pipeline=" + config.pipeline.name, None
    elif config.hpo is not None:
        what, loop = "hpo=evolution", None
    elif config.algorithm is not None:
        what, loop = f"algorithm={config.algorithm.name}", config.algorithm.loop
    else:
        what, loop = "a recording (run without algorithm=)", None
    distributed.check_supported(loop, what, "", 0, world)


def check_sweep_dataset(config: RunConfig) -> None:
    """In a sweep, training on "the newest recording" could pick another job's, still being written: refuse."""
    if config.runner.dataset.dir_or_file is not None:
        return
    if config.algorithm is not None and config.algorithm.needs_dataset:
        reader = f"algorithm={config.algorithm.name}"
    elif config.pipeline is not None:
        reader = None
        for stage, section in config.pipeline.stages.items():
            if section.name == RECORD_STAGE:
                return  # later stages learn from this job's own recording
            if section.needs_dataset:
                reader = f"pipeline stage {stage} ({section.name})"
                break
        if reader is None:
            return
    else:
        return
    raise MazerunError(
        f"{reader} would train on the newest recording under outputs/, which another job of this sweep may be "
        "writing; inside a sweep name the data: runner.dataset.dir_or_file=<records>, or use a pipeline that "
        "records its own (pipeline=bc_ppo)"
    )


def check_group_choices(arguments: list[str], config_dir: Path) -> None:
    """Name an unknown group option in one line, before Hydra's multi-line report.

    Options come from mazerun's conf/, from the directories the command adds
    (``hydra.searchpath=[file://...]``, ``--config-dir``), where a user keeps envs of their own,
    and from installed plugins: their config packages, and their policies (``policy``, ``expert``).
    """
    config_dirs = [config_dir, *_added_config_dirs(arguments), *plugins.config_package_dirs()]
    for argument in arguments:
        group, sep, choice = argument.lstrip("+~").partition("=")
        if not sep or group not in CONFIG_GROUPS or choice in ("", "null") or "," in choice:
            continue
        known = {path.stem for folder in config_dirs for path in (folder / group).glob("*.yaml")}
        if group in ("policy", "expert"):
            known |= plugins.plugin_entries(plugins.POLICY_PLUGINS).keys()
        options = sorted(known)
        if choice not in options:
            raise MazerunError(f"unknown {group} {choice!r}; choose one of: {', '.join(options)}")


def _added_config_dirs(arguments: list[str]) -> list[Path]:
    """``file://`` entries of ``hydra.searchpath=[...]`` and the ``--config-dir``/``-cd`` directory."""
    found: list[Path] = []
    for position, argument in enumerate(arguments):
        key, sep, value = argument.lstrip("+~").partition("=")
        if key == "hydra.searchpath" and sep:
            found += [Path(entry.strip().strip("'\"")[len("file://"):])
                      for entry in value.strip("[]").split(",") if entry.strip().strip("'\"").startswith("file://")]
        elif key in ("--config-dir", "-cd"):
            if sep:
                found.append(Path(value))
            elif position + 1 < len(arguments):
                found.append(Path(arguments[position + 1]))
    return found


def explain_hydra_error(error: Exception) -> str:
    """One line for what Hydra reports in several: the key, where it was looked up, what would fit."""
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return _unknown_key(str(cause.full_key), getattr(cause, "parent_node", None))
    if isinstance(error, MissingConfigException):
        return _missing_config(str(error))
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {str(error).splitlines()[0]}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{first}; check the override's spelling and syntax (see `run --help`)"


def _unknown_key(full_key: str, section: Any) -> str:
    *parents, key = full_key.split(".")
    where = ".".join(parents)
    valid = sorted(str(name) for name in section.keys() if name != "hydra") if section is not None else []
    if key in CONFIG_GROUPS and not parents:
        return f"this run has no {key} section to override; choose one first, e.g. {key}=<option> (see conf/{key}/)"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    place = f"in section {where}" if where else "at the top level"
    groups = f"; groups: {', '.join(CONFIG_GROUPS)}" if not where else ""
    return f"unknown key {full_key} {place}; {hint}its keys: {', '.join(valid)}{groups}"


def _missing_config(message: str) -> str:
    for plugin, extra in PLUGIN_EXTRAS.items():
        for group in ("launcher", "sweeper"):
            if f"hydra/{group}/{plugin}'" in message:
                return (f"hydra/{group}={plugin} needs its Hydra plugin, which is not installed: "
                        f"pip install 'mazerun[{extra}]'")
    for group in ("launcher", "sweeper"):
        if f"'hydra/{group}/" in message:
            plugin = message.split(f"'hydra/{group}/", 1)[1].split("'", 1)[0]
            known = ", ".join(f"{name} (mazerun[{extra}])" for name, extra in PLUGIN_EXTRAS.items())
            return f"hydra/{group}={plugin} is not an installed Hydra plugin; mazerun's extras bring {known}"
    return message.strip().splitlines()[0]


HYDRA_FLAGS_WITH_VALUE = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c",
                          "--package", "-p", "--experimental-rerun")


def hydra_argv(arguments: list[str]) -> list[str]:
    """Hydra's flags first, then the overrides in their order: ``run -m a=1 -cn conf_train b=2`` as typed.

    Hydra's argparse takes the overrides as one positional list, which a flag between them
    would cut short ("unrecognized arguments").
    """
    flags: list[str] = []
    overrides: list[str] = []
    position = 0
    while position < len(arguments):
        argument = arguments[position]
        if argument.startswith("-") and argument != "-":
            flags.append(argument)
            name = argument.split("=", 1)[0]
            if name in HYDRA_FLAGS_WITH_VALUE and "=" not in argument and position + 1 < len(arguments):
                position += 1
                flags.append(arguments[position])
            elif name in ("--info", "-i") and position + 1 < len(arguments) and "=" not in arguments[position + 1] \
                    and not arguments[position + 1].startswith("-"):
                position += 1
                flags.append(arguments[position])
        else:
            overrides.append(argument)
        position += 1
    return flags + overrides


def main() -> None:
    """Console entry point of `run` (and `python -m mazerun`); the exit code is decided here."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors reach this function, which reports them in one line
    interrupts.install()
    sys.argv[1:] = hydra_argv(sys.argv[1:])
    world = distributed.SINGLE
    try:
        world = distributed.world_from_env()
        if world.distributed:
            _join_data_parallel(world)
        check_group_choices(sys.argv[1:], Path(_config_dir()))
        # Start-up (Hydra, config checks, loading data) runs deferred too: a stop raised inside a library's
        # half-done update (OmegaConf's flags) left it broken and ended in its traceback. The loops' checks,
        # or this region's end, raise it; a second signal still stops at once.
        with interrupts.deferred():
            hydra_main()
    except MazerunError as error:
        _fail(str(error), world)
    except KeyboardInterrupt as interrupt:
        sys.exit(interrupts.exit_code(interrupt))
    except HydraException as error:
        _fail(explain_hydra_error(error), world)
    except OSError as error:
        _fail(unwritable(error), world)
    except RuntimeError as error:
        if world.distributed and distributed.is_peer_failure(error):
            _fail(f"another process of this torchrun job stopped ({str(error).splitlines()[0]}); "
                  "its own output says why", world)
        if "slurm" in str(error).lower():  # submitit looks for srun/sbatch when the launcher starts
            _fail(f"hydra/launcher=submitit_slurm: {error}; run the sweep on a SLURM login node, or use "
                  "hydra/launcher=submitit_local or hydra/launcher=joblib on this machine", world)
        raise
    finally:
        if world.distributed:
            if world.writes and not _Jobs.run_dir_shared:
                with contextlib.suppress(Exception):
                    distributed.share_run_dir(None)  # Hydra failed before the job began: the others stop too
            distributed.destroy()
        _Jobs.claim.close()
        # The process ends here: the interpreter's last garbage collections would walk torch's whole
        # object graph (a third of a second); every file is written and closed by now.
        gc.freeze()
    if _Jobs.failed:
        sys.exit(2)


def _join_data_parallel(world: distributed.World) -> None:
    """A torchrun rank: join the group; ranks > 0 run in rank 0's directory and write nothing there."""
    if any(argument in ("-m", "--multirun") for argument in sys.argv[1:]):
        raise MazerunError("torchrun runs one training job: drop -m, or run the sweep with a launcher "
                           "(hydra/launcher=joblib) and no torchrun")
    distributed.init(world)
    if world.writes:
        return
    run_dir = distributed.receive_run_dir()
    if run_dir is None:
        sys.exit(2)  # rank 0 failed before its run began and said why
    sys.argv += distributed.follower_overrides(run_dir)


def unwritable(error: OSError) -> str:
    return f"{error.strerror or error}: {error.filename or ''}; point hydra.run.dir at a writable directory"


def _fail(message: str, world: distributed.World = distributed.SINGLE) -> None:
    if world.writes:  # under torchrun rank 0 says it once; the other ranks fail the same way
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

