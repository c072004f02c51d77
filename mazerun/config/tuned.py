"""Which tuned defaults a run took: ``conf/tuned/<env option>_<algorithm or pipeline>.yaml`` (the
algorithm's keys), ``conf/tuned_model/<env option>_<algorithm>.yaml`` (the model's) and
``conf/tuned_runner/<env option>_<algorithm>.yaml`` (the runner's: evaluation episodes, env copies);
and the defaults an algorithm keeps per observation kind (:func:`with_kind_defaults`), which follow
the env itself, however it was named or found.

Hydra itself applies them: ``conf_rollout.yaml``'s defaults list names the files that match the
run's ``env`` and ``algorithm`` (or ``pipeline``) choices, so ``--cfg job`` shows the values,
a sweep gets each job's own, and an override on the command line wins as over any default.
This module only reads back what applied, so that ``run.log`` can say it.

To tune an env of your own, add ``conf/env/<id>.yaml`` (``name: <id>``) and
``conf/tuned/<id>_<algorithm>.yaml`` with that algorithm's keys (``conf/tuned_model/...`` for the
model's, ``conf/tuned_runner/...`` for the runner's), in mazerun's conf/, in a directory on
``hydra.searchpath``, or in an installed plugin's config package.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from omegaconf import OmegaConf

from mazerun.config.plugins import package_dirs

TUNED_GROUPS = ("tuned", "tuned_model", "tuned_runner")


def yaml_scalar(value: Any) -> str:
    """``value`` as YAML writes it on one line (``1.0e-05``, ``null``, ``true``, a quoted string where needed):
    how a Hydra override types it, and how conf/algorithm/ (written by ``mazerun.compose.algorithm_yaml``) shows it."""
    return yaml.safe_dump(value, default_flow_style=True, width=sys.maxsize).removesuffix("...\n").strip()


def dotted_items(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` under ``prefix`` as ``{"prefix.a.b": 1}`` (``{"a.b": 1}`` under ``""``): the keys as a
    command line names them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(dotted_items(value, name))
        else:
            flat[name] = value
    return flat


def overridden_keys(task_overrides: Iterable[str]) -> set[str]:
    """The dotted keys set on the command line (``algorithm.lr=0.01``, ``+algorithm.x=1``)."""
    return {override.split("=", 1)[0].lstrip("+~") for override in task_overrides if "=" in override}


def applied_tuned_defaults(choices: Mapping[str, Any], config_dirs: Iterable[Path],
                           task_overrides: Iterable[str]) -> list[str]:
    """One line per tuned-defaults file this run composed: its keys and values, and which the command line overrode.

    ``choices`` is Hydra's ``runtime.choices`` (``{"tuned@algorithm": "CartPole-v1_ppo", ...}``; an
    optional entry whose file does not exist is listed there too, and skipped here).
    """
    explicit = overridden_keys(task_overrides)
    dirs = list(config_dirs)
    lines = []
    for entry, choice in sorted(choices.items()):
        group, _, package = entry.partition("@")
        if group not in TUNED_GROUPS or not choice:
            continue
        path = next((folder / group / f"{choice}.yaml" for folder in dirs
                     if (folder / group / f"{choice}.yaml").is_file()), None)
        if path is None:
            continue
        values = OmegaConf.to_container(OmegaConf.load(path))
        assert isinstance(values, dict)
        values.pop("defaults", None)
        flat = dotted_items(values, package)
        if not flat:
            continue  # a file that only includes others (a pipeline's), which are listed themselves
        taken = [f"{key}={value}" for key, value in flat.items() if key not in explicit]
        line = f"tuned defaults {group}/{choice}.yaml: {', '.join(taken) or 'none taken'}"
        overridden = sorted(key for key in flat if key in explicit)
        if overridden:
            line += f"; the command line overrides {', '.join(overridden)}"
        lines.append(line)
    return lines


def config_dirs(config_sources: Iterable[Any]) -> list[Path]:
    """The directories of Hydra's ``runtime.config_sources``: mazerun's conf/, hydra.searchpath's, and the packages of
    installed plugins (``pkg://``, see :mod:`mazerun.config.plugins`)."""
    dirs: list[Path] = []
    for source in config_sources:
        if source.schema == "file" and source.path:
            dirs.append(Path(source.path))
        elif source.schema == "pkg" and source.path:
            dirs += package_dirs(source.path)
    return dirs


def _value(section: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        section = getattr(section, part)
    return section


def _replaced(section: Any, dotted: str, value: Any) -> Any:
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(section, **{head: _replaced(getattr(section, head), rest, value) if rest else value})


def with_kind_defaults(algorithm: Any, runner: Any, kind: str, prefix: str, command_line: Iterable[str]
                       ) -> tuple[Any, Any, list[str]]:
    """``algorithm`` and ``runner`` (config dataclasses) with the algorithm's defaults for observations of ``kind``,
    and the ``key=value`` of each one taken.

    An algorithm's config class may keep ``kind_defaults``: ``{"minigrid": {"n_updates": 10000,
    "runner.eval_repeats": 100, ...}}`` (dotted keys; ``runner.`` ones are the runner's). They are what its
    benches found best for that kind of task, where the plain defaults (written for vector tasks) miss. Each
    replaces a value only while it is the plain default: a key named on the command line (``<prefix>.<key>``,
    ``runner.<key>``), or changed by a tuned file, a pipeline or a config of one's own, keeps its value.
    """
    table = getattr(type(algorithm), "kind_defaults", {}).get(kind, {})
    if not table:
        return algorithm, runner, []
    explicit = overridden_keys(command_line)
    plain_algorithm, plain_runner = type(algorithm)(), type(runner)()
    taken = []
    for key, value in table.items():
        in_runner = key.startswith("runner.")
        name = key.removeprefix("runner.")
        section, plain = (runner, plain_runner) if in_runner else (algorithm, plain_algorithm)
        dotted = f"runner.{name}" if in_runner else f"{prefix}.{name}"
        if dotted in explicit or _value(section, name) != _value(plain, name) or _value(section, name) == value:
            continue
        if in_runner:
            runner = _replaced(runner, name, value)
        else:
            algorithm = _replaced(algorithm, name, value)
        taken.append(f"{dotted}={yaml_scalar(value)}")  # as one would type it
    return algorithm, runner, taken
