"""What every bench shares: recording, real `run` commands, evaluation on unseen seeds, the table, the verdict.

A bench is a check: :meth:`Table.exit_code` is non-zero when a row misses its target or a
peer is missing, so a bench run can gate a change like a test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mazerun.checkpoint import load_checkpoint, network_from_checkpoint, resolve_run_dir
from mazerun.config import PolicyConfig, RunnerConfig
from mazerun.evaluation import evaluate
from mazerun.models import Vocabulary
from mazerun.rollout import rollout

UNSEEN_SEED_OFFSET = 2_000_000
"""Seeds used by neither recordings (0, 1, ...) nor training's evaluations (1_000_000, ...)."""

QUIET = {"print_fn": lambda _: None}


def load_average() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def run(*overrides: str, cwd: Path, quiet: bool = True) -> float:
    """The real `run <overrides>` in ``cwd``; returns its wall time in seconds (raises if it fails)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mazerun", *overrides], cwd=cwd, text=True,
                            capture_output=quiet, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"run {' '.join(overrides)} failed:\n{result.stderr if quiet else ''}")
    return time.perf_counter() - started


def record(env_id: str, episodes: int, directory: Path, *, seed: int = 0, epsilon: float = 0.0) -> Path:
    """The env's expert for ``episodes`` episodes (seeds ``seed``, ``seed + 1``, ...) into ``directory``."""
    rollout(env_id, PolicyConfig(epsilon=epsilon), RunnerConfig(n_episodes=episodes, seed=seed), directory, **QUIET)
    return directory / "trajectory_data"


def expert_return(env_id: str, episodes: int, directory: Path) -> dict[str, float]:
    """The expert's statistics on the unseen seeds every clone is scored on."""
    return rollout(env_id, PolicyConfig(), RunnerConfig(n_episodes=episodes, seed=UNSEEN_SEED_OFFSET,
                                                        record_trajectory=False), directory, **QUIET)


def evaluate_run(run_dir: Path, episodes: int, checkpoint_name: str = "best.pt") -> dict[str, float]:
    """Greedy episodes of a run's checkpoint on the unseen seeds (a pipeline run: its last stage)."""
    checkpoint = load_checkpoint(resolve_run_dir(run_dir) / checkpoint_name)
    vocabulary = Vocabulary.from_list(checkpoint.vocabulary) if checkpoint.vocabulary else None
    return evaluate(network_from_checkpoint(checkpoint), checkpoint.env_id, episodes,
                    observation_space=checkpoint.observation_space, vocabulary=vocabulary, device="cpu",
                    seed_offset=UNSEEN_SEED_OFFSET).metrics()


@dataclass
class Row:
    measure: str
    ours: Any
    peer: Any
    target: str
    passed: bool | None
    """None: an informative row without a target."""


class Table:
    """Rows of ``measure | ours | peer | ratio | target | verdict``, printed once, judged once."""

    def __init__(self, title: str, peer_name: str = "peer") -> None:
        self.title, self.peer_name = title, peer_name
        self.rows: list[Row] = []

    def add(self, measure: str, ours: Any, peer: Any, target: str = "", passed: bool | None = None) -> None:
        if isinstance(peer, str) and target:
            passed = False  # a missing peer is a failed check, not a skipped one
        self.rows.append(Row(measure, ours, peer, target, passed))

    @staticmethod
    def _cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:>12.4g}"
        return f"{'-' if value is None else str(value):>12}"

    def render(self) -> str:
        header = f"{'measure':<46}|{'ours':>12}|{self.peer_name:>12}|{'ratio':>8}|{'target':>26}|"
        lines = ["", self.title, header, "-" * (len(header) + 6)]
        for row in self.rows:
            numbers = isinstance(row.ours, (int, float)) and isinstance(row.peer, (int, float)) and row.peer
            ratio = f"{row.ours / row.peer:>7.2f}x" if numbers else f"{'-':>8}"
            verdict = "" if row.passed is None else ("PASS" if row.passed else "FAIL")
            lines.append(f"{row.measure:<46}|{self._cell(row.ours)}|{self._cell(row.peer)}|{ratio}|"
                         f"{row.target:>26}| {verdict}")
        return "\n".join(lines)

    def exit_code(self) -> int:
        return 1 if any(row.passed is False for row in self.rows) else 0
