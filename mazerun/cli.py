"""The `run` command: Hydra composes the config, this module hands it to plain functions.

The task function returns each job's selection metric, so a Hydra sweeper (Optuna) can read
it, and it never exits: a failed job of a ``-m`` sweep is reported and the sweep goes on.
:func:`main` decides the exit code once Hydra returns, and turns Hydra's own multi-line
reports (a misspelt key, an unknown group, an override it cannot parse) into one line.
"""

from __future__ import annotations

import os

# Before anything loads torch's OpenMP runtime: threads that wait for work sleep instead of
# spinning. Spinning threads make every parallel op wait for the slowest core, so on a machine
# whose other core is busy, 2 threads ran CQL's updates 18x slower than 1; passive threads ran
# them as fast as 1 thread there, and lose little on an idle machine (batches of 256 rows are
# coarse work). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import difflib
import errno
import fcntl
import gc
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mazerun import interrupts
from mazerun.config import RunConfig
from mazerun.errors import MazerunError
from mazerun.validation import validate

log = logging.getLogger("mazerun")

CONFIG_GROUPS = ("env", "policy", "runner", "algorithm", "pipeline", "expert", "model", "wrappers", "critic", "hpo")
PLUGIN_EXTRAS = {"joblib": "launchers", "submitit_local": "launchers", "submitit_slurm": "launchers",
                 "optuna": "launchers", "ray": "ray"}
"""Hydra launcher and sweeper plugins, and the mazerun extra that installs each."""
RUN_OUTPUTS = ("trajectory_data", "best.pt", "last.pt", "metrics.csv", "pipeline.json", "result.json",
               "rollout_stats.json")
"""What a run leaves in its directory; finding any of them means the directory was used before."""


def _config_dir() -> str:
    """conf/ ships inside the wheel as mazerun/conf; a source checkout keeps it at the top level."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf")


def execute(config: RunConfig, run_dir: Path) -> float:
    """Roll out, train or run a pipeline, as the config says; returns the selection metric (NaN if none)."""
    if config.hpo is not None:
        from mazerun.population import train_population

        return _metric(train_population(config, run_dir).best)
    if config.pipeline is not None:
        from mazerun.pipeline import run_pipeline

        return _metric(run_pipeline(config, run_dir).best)
    if config.algorithm is not None:
        from mazerun.train import train

        return _metric(train(config, run_dir).best)
    from mazerun.rollout import run_rollout

    return _metric(run_rollout(config, run_dir)["mean"])


def _metric(value: float | None) -> float:
    return float("nan") if value is None else float(value)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this run alone: another run there at the same time, or before, would mix outputs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise MazerunError(
                f"{run_dir} is in use by another run; give each run its own hydra.run.dir"
            ) from None
        used = sorted(name for name in RUN_OUTPUTS if (run_dir / name).exists())
        if used:
            raise MazerunError(
                f"{run_dir} already holds an earlier run's {', '.join(used)}; choose a new hydra.run.dir, "
                f"or continue that run with input_dir={run_dir}"
            )
        yield


class _Jobs:
    """How the jobs of this invocation ended (a ``-m`` sweep runs several in this process)."""

    failed = 0


@hydra.main(config_path=_config_dir(), config_name="conf_rollout", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = validate(cfg)
        with claim_run_dir(run_dir):
            return execute(config, run_dir)
    except MazerunError as error:
        log.error("error: %s", error)
        _Jobs.failed += 1
        return float("nan")
    except KeyboardInterrupt as interrupt:
        log.error("interrupted: %s", interrupt or "stopped by the user")
        raise


def check_group_choices(arguments: list[str], config_dir: Path) -> None:
    """Name an unknown group option in one line, before Hydra's multi-line report."""
    for argument in arguments:
        group, sep, choice = argument.lstrip("+~").partition("=")
        if not sep or group not in CONFIG_GROUPS or choice in ("", "null") or "," in choice:
            continue
        options = sorted(path.stem for path in (config_dir / group).glob("*.yaml"))
        if choice not in options:
            raise MazerunError(f"unknown {group} {choice!r}; choose one of: {', '.join(options)}")


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
        if f"/{plugin}'" in message:
            return f"{plugin} needs its Hydra plugin: pip install 'mazerun[{extra}]'"
    return message.strip().splitlines()[0]


def main() -> None:
    """Console entry point of `run` (and `python -m mazerun`); the exit code is decided here."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors reach this function, which reports them in one line
    interrupts.install()
    try:
        check_group_choices(sys.argv[1:], Path(_config_dir()))
        hydra_main()
    except MazerunError as error:
        _fail(str(error))
    except KeyboardInterrupt as interrupt:
        sys.exit(interrupt.exit_code if isinstance(interrupt, interrupts.Interrupted) else 130)
    except HydraException as error:
        _fail(explain_hydra_error(error))
    except OSError as error:
        _fail(f"{error.strerror or error}: {error.filename or ''}; point hydra.run.dir at a writable directory")
    finally:
        # The process ends here: the interpreter's last garbage collections would walk torch's whole
        # object graph (a third of a second); every file is written and closed by now.
        gc.freeze()
    if _Jobs.failed:
        sys.exit(2)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

