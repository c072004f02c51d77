"""The parallel runner's workers: how many there are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mazerun import config
from mazerun.config import RunnerConfig, usable_cpus, worker_count


@pytest.mark.parametrize("cpu_max, expected", [
    ("200000 100000\n", 2),
    ("250000 100000\n", 3),  # a fractional quota is rounded up
    ("50000 100000\n", 1),
    ("max 100000\n", 8),
    ("garbled\n", 8),
    (None, 8),  # no cgroup v2 quota
])
def test_usable_cpus_reads_affinity_and_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str | None, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert usable_cpus(path) == expected


def test_worker_count_follows_the_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    monkeypatch.setattr(config, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert worker_count(RunnerConfig(n_episodes=50)) == 3
    assert worker_count(RunnerConfig(n_episodes=2)) == 2
    assert worker_count(RunnerConfig(n_episodes=50, n_workers=5)) == 5
