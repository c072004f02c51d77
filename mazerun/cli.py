"""The `run` command: Hydra composes the config, this module hands it to plain functions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mazerun.config import RunConfig, validate
from mazerun.errors import MazerunError

log = logging.getLogger("mazerun")


def _config_dir() -> str:
    """conf/ ships inside the wheel as mazerun/conf; a source checkout keeps it at the top level."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf")


def execute(config: RunConfig, run_dir: Path) -> None:
    """Roll out or train, as the config says; what tests call without Hydra."""
    if config.trains:
        from mazerun.training import train

        train(config, run_dir)
    else:
        from mazerun.rollout import run_rollout

        run_rollout(config, run_dir)


CONFIG_GROUPS = ("env", "policy", "runner", "algorithm", "model", "wrappers", "critic")


def check_group_choices(arguments: list[str], config_dir: Path) -> None:
    """Name an unknown group option in one line, before Hydra's multi-line report."""
    for argument in arguments:
        group, sep, choice = argument.lstrip("+~").partition("=")
        if not sep or group not in CONFIG_GROUPS or choice in ("", "null") or "," in choice:
            continue
        options = sorted(path.stem for path in (config_dir / group).glob("*.yaml"))
        if choice not in options:
            raise MazerunError(f"unknown {group} {choice!r}; choose one of: {', '.join(options)}")


def main() -> None:
    """Console entry point of `run` (and `python -m mazerun`)."""
    try:
        check_group_choices(sys.argv[1:], Path(_config_dir()))
    except MazerunError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


@hydra.main(config_path=_config_dir(), config_name="conf_rollout", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        execute(validate(cfg), run_dir)
    except MazerunError as error:
        log.error("error: %s", error)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        log.error("interrupted: %s", interrupt or "stopped by the user")
        sys.exit(130)
