"""The registry of algorithms `run algorithm=<name>` can train, each one file: its config and its update.

Each algorithm module defines ``Config`` and ``Algorithm`` as :mod:`mazerun.algorithms.protocol`
says. Modules are imported on first use, so a run loads only the algorithm it trains. Loops
build algorithms here (:func:`build_algorithm`) and never import one.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

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
}


def algorithm_module(name: str, prefix: str = "algorithm") -> ModuleType:
    """The module of algorithm ``name`` (its ``Config`` and ``Algorithm``)."""
    if name not in ALGORITHMS:
        raise MazerunError(f"{prefix}.name={name!r} is unknown; choose one of {', '.join(sorted(ALGORITHMS))}")
    return importlib.import_module(ALGORITHMS[name])


def build_algorithm(config: Any, spec: AlgorithmSpec, generator: torch.Generator | None = None) -> Algorithm:
    """The algorithm that ``config`` names, built for ``spec``."""
    return algorithm_module(config.name).Algorithm(config, spec, generator)


def searchable_algorithms() -> list[str]:
    """The algorithms a population search can train: offline ones whose ``Algorithm.searchable`` says so."""
    modules = {name: algorithm_module(name) for name in ALGORITHMS}
    return sorted(name for name, module in modules.items()
                  if module.Config.loop == "offline" and module.Algorithm.searchable)


def algorithm_config(values: Any, prefix: str = "algorithm") -> Any:
    """An algorithm section (``algorithm`` or a pipeline stage) as its config dataclass, range-checked."""
    name = values.get("name") if isinstance(values, dict) else None
    config = structured(algorithm_module(str(name), prefix).Config, values, prefix)
    config.check(prefix)
    return config
