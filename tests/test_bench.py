"""Benches are checks: a missed target or a missing peer is a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from common import Table  # noqa: E402


def test_a_missing_peer_fails_its_row_and_the_table() -> None:
    table = Table("t")
    table.add("speed", 100.0, 20.0, ">= 3x", True)
    table.add("shown only", 1.0, "-")
    assert table.exit_code() == 0
    table.add("against a peer that is not installed", 100.0, "missing", ">= 3x", True)
    assert table.exit_code() == 1
    text = table.render()
    assert "5.00x" in text and text.count("FAIL") == 1 and text.count("PASS") == 1


def test_ratios_only_between_positive_numbers() -> None:
    table = Table("t")
    table.add("returns", -50.0, -100.0)
    assert "0.50x" not in table.render()


@pytest.fixture
def without_peers(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing d3rlpy, stable_baselines3 or rliable fails, as when they are not installed."""
    for name in ("d3rlpy", "stable_baselines3", "rliable"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden by the test')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("command", [
    ["offline.py", "--smoke", "--parts", "speed"],
    ["ppo.py", "--smoke", "--parts", "cartpole", "--cartpole-steps", "256"],
    ["report.py", "--smoke"],
    ["continuous.py", "--smoke", "--parts", "sac"],
], ids=["offline", "ppo", "report", "continuous"])
def test_a_bench_without_its_peer_exits_non_zero(command: list[str], without_peers: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / command[0]), *command[1:]], capture_output=True,
                            text=True, env=without_peers, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "missing" in result.stdout and "FAIL" in result.stdout, result.stdout
    assert "hidden by the test" in result.stderr
