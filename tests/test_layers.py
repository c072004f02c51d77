"""The package layout shows the layers, and imports go only down them (the contract in pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mazerun
from mazerun.algorithms import ALGORITHMS

PACKAGE = Path(mazerun.__file__).parent
ENTRY_MODULES = {"__init__.py", "__main__.py", "cli.py", "datasets.py", "export.py", "report.py"}
LAYERS = ["compose", "training", "algorithms", "fast", "acting", "data", "nn", "config", "core"]


def test_the_top_of_the_package_is_the_layers_and_the_command_line_entries() -> None:
    entries = {path.name for path in PACKAGE.iterdir() if path.name != "__pycache__"}
    assert entries - ENTRY_MODULES == set(LAYERS)
    assert len(entries - ENTRY_MODULES) <= 10


def test_every_layer_imports_only_the_layers_below_it() -> None:
    contract = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=PACKAGE.parent,
                              env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},  # this tree, not an installed copy
                              capture_output=True, text=True, timeout=120)
    assert contract.returncode == 0, contract.stdout + contract.stderr
    assert "layers import only down KEPT" in contract.stdout
    assert "loops and searches meet algorithms only through the protocol and the registry KEPT" in contract.stdout


def test_the_contracts_name_every_layer_in_order_and_every_built_in_algorithm() -> None:
    """A new folder or algorithm must be placed in the contracts, or it escapes them."""
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    layers, forbidden = config["tool"]["importlinter"]["contracts"]
    assert layers["layers"][1:] == [f"mazerun.{layer}" for layer in LAYERS]
    assert sorted(forbidden["forbidden_modules"]) == sorted(ALGORITHMS.values())  # every built-in algorithm
