"""The algorithms `run algorithm=<name>` can train, each one file: its config and its update.

Each algorithm module defines ``Config`` (a dataclass with a ``check()``) and ``Algorithm``;
modules are imported on first use so that a run loads only the algorithm it trains.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from mazerun.config import structured
from mazerun.errors import MazerunError

OFFLINE_ALGORITHMS = {"bc": "mazerun.algorithms.bc", "cql": "mazerun.algorithms.cql", "iql": "mazerun.algorithms.iql"}
"""Algorithms that learn from recorded trajectories in the shared offline loop."""

ON_POLICY_ALGORITHMS = {"ppo": "mazerun.algorithms.ppo"}
"""Algorithms that learn from their own interaction with vectorised environments."""


def algorithm_module(name: str) -> ModuleType:
    """The module of algorithm ``name`` (its ``Config`` and ``Algorithm``)."""
    modules = {**OFFLINE_ALGORITHMS, **ON_POLICY_ALGORITHMS}
    if name not in modules:
        raise MazerunError(f"algorithm.name={name!r} is unknown; choose one of {', '.join(sorted(modules))}")
    return importlib.import_module(modules[name])


def validate_algorithm(values: Any) -> Any:
    """The algorithm section as its config dataclass, range-checked."""
    name = values.get("name") if isinstance(values, dict) else None
    config = structured(algorithm_module(str(name)).Config, values, "algorithm")
    config.check()
    return config
