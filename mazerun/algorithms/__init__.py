"""The algorithms `run algorithm=<name>` can train, each one file: its config and its update.

Each algorithm module defines ``Config`` (a dataclass with a ``check(prefix)`` and a ``loop``
class attribute naming the training loop that drives it: ``offline``, ``on_policy`` or
``interactive``) and ``Algorithm``. Modules are imported on first use, so a run loads only the
algorithm it trains.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from mazerun.config.schemas import structured
from mazerun.core.errors import MazerunError

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


def algorithm_config(values: Any, prefix: str = "algorithm") -> Any:
    """An algorithm section (``algorithm`` or a pipeline stage) as its config dataclass, range-checked."""
    name = values.get("name") if isinstance(values, dict) else None
    config = structured(algorithm_module(str(name), prefix).Config, values, prefix)
    config.check(prefix)
    return config
