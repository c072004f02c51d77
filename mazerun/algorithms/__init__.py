"""The registry of algorithms `run algorithm=<name>` can train, each one file: its config and its update.

Each algorithm module defines ``Config`` and ``Algorithm`` as :mod:`mazerun.algorithms.protocol`
says. The built-ins are :data:`ALGORITHMS`; an installed package adds its own through the entry
point group ``mazerun.algorithms`` (name -> module, see :mod:`mazerun.config.plugins`). Modules
are imported on first use, so a run loads only the algorithm it trains. Loops build algorithms
here (:func:`build_algorithm`) and never import one.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mazerun.config.plugins import ALGORITHM_PLUGINS, describe, load_plugin, plugins_beside
from mazerun.config.schemas import structured
from mazerun.core.errors import MazerunError

if TYPE_CHECKING:  # the registry loads no torch: `run` validates its config before anything heavy is imported
    import torch

    from mazerun.algorithms.protocol import Algorithm, AlgorithmSpec

ALGORITHMS = {
    "bc": "mazerun.algorithms.bc",
    "cql": "mazerun.algorithms.cql",
    "iql": "mazerun.algorithms.iql",
    "ppo": "mazerun.algorithms.ppo",
    "dagger": "mazerun.algorithms.dagger",
    "sac": "mazerun.algorithms.sac",
    "td3_bc": "mazerun.algorithms.td3_bc",
}
"""The built-in algorithms: name -> module."""


def algorithm_names() -> list[str]:
    """Every algorithm `run` can train: the built-ins and those of installed plugins."""
    return sorted([*ALGORITHMS, *plugins_beside(ALGORITHMS, ALGORITHM_PLUGINS, "algorithm")])


def algorithm_module(name: str, prefix: str = "algorithm") -> ModuleType:
    """The module of algorithm ``name`` (its ``Config`` and ``Algorithm``)."""
    plugins = plugins_beside(ALGORITHMS, ALGORITHM_PLUGINS, "algorithm")
    if name in ALGORITHMS:
        return importlib.import_module(ALGORITHMS[name])
    if name not in plugins:
        raise MazerunError(f"{prefix}.name={name!r} is unknown; choose one of {', '.join(algorithm_names())}")
    module = load_plugin(plugins[name], "algorithm")
    check_plugin_module(module, describe(plugins[name]))
    return module


def check_plugin_module(module: ModuleType, plugin: str) -> None:
    """A plugin's module holds what the loops build: ``Config``, a dataclass, and ``Algorithm``, a protocol class."""
    from mazerun.algorithms.protocol import Algorithm  # torch: the plugin's own import has loaded it already

    config, algorithm = getattr(module, "Config", None), getattr(module, "Algorithm", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise MazerunError(f"the algorithm plugin {plugin} has no Config dataclass (its settings); define Config in "
                           "that module, as the README's \"Writing your own algorithm\" shows")
    if not (isinstance(algorithm, type) and issubclass(algorithm, Algorithm)):
        raise MazerunError(f"the algorithm plugin {plugin} has no Algorithm class (a subclass of "
                           "mazerun.algorithms.protocol.Algorithm); define Algorithm in that module, as the README's "
                           "\"Writing your own algorithm\" shows")


def build_algorithm(config: Any, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> Algorithm:
    """The algorithm that ``config`` names, built for ``spec``."""
    return algorithm_module(config.name).Algorithm(config, spec, generator)


def searchable_algorithms() -> list[str]:
    """The algorithms a population search can train: offline ones whose ``Algorithm.searchable`` says so."""
    modules = {name: algorithm_module(name) for name in algorithm_names()}
    return sorted(name for name, module in modules.items()
                  if module.Config.loop == "offline" and module.Algorithm.searchable)


def algorithm_config(values: Any, prefix: str = "algorithm") -> Any:
    """An algorithm section (``algorithm`` or a pipeline stage) as its config dataclass, range-checked."""
    name = values.get("name") if isinstance(values, dict) else None
    config = structured(algorithm_module(str(name), prefix).Config, values, prefix)
    config.check(prefix)
    return config
