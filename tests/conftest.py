"""Helpers to drive the real `run` command in a scratch directory, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*overrides: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`run <overrides>` in ``cwd``; the output is captured, the exit code left to the test."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mazerun", *overrides],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout,
    )


def run_ok(*overrides: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = run_cli(*overrides, cwd=cwd, env=env)
    assert result.returncode == 0, f"run {' '.join(overrides)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def newest_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "outputs").glob("*/*"), key=lambda path: path.stat().st_mtime)
    assert runs, f"no run directory under {cwd / 'outputs'}"
    return runs[-1]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch directory that is also the working directory (outputs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
