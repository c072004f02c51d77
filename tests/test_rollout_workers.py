"""The parallel runner's own worker pool: a dying worker costs nothing, a deadly episode stops the run."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import group_members, newest_run_dir, spawn_cli

from mazerun.acting.rollout import EpisodePlayer, rollout
from mazerun.config import schemas as config
from mazerun.config.schemas import PolicyConfig, RunnerConfig, usable_cpus, worker_count
from mazerun.core.errors import MazerunError
from mazerun.data.records import load_records


def _children(pid: int) -> list[int]:
    """The processes ``pid`` forked: its workers (a fork keeps the parent's command line)."""
    try:
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    children = []
    for child in map(int, listed):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes() == command:
                children.append(child)
        except OSError:
            pass  # it just ended
    return children


def test_a_killed_worker_is_replaced_and_no_episode_is_lost(workdir: Path) -> None:
    with spawn_cli("runner.n_episodes=300", "runner.n_workers=2", "runner.max_episode_steps=60", cwd=workdir) as process:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(workdir.glob("outputs/*/*/trajectory_data/*.pkl"))) < 3:
            time.sleep(0.01)
        workers = _children(process.pid)
        assert workers, "the run had no worker to kill"
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert stderr.count("SIGKILL") == 1, stderr
        # The kill lands mid-episode (that episode is played again) or, on a fast machine, between two
        # episodes (nothing to replay); either way a fresh worker takes over and every seed is recorded.
        assert "playing it again in a fresh worker" in stderr or "between episodes; no episode was lost" in stderr
        assert not group_members(process.pid), "a process of the run outlived it"
    data = newest_run_dir(workdir) / "trajectory_data"
    assert not [path for path in data.iterdir() if path.suffix != ".pkl"]  # no temp files left
    assert sorted(record.seed for record in load_records(data)) == list(range(300))


def test_an_episode_that_kills_its_worker_twice_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original_play = EpisodePlayer.play

    def play(self: EpisodePlayer, index: int):
        if index == 5:
            os._exit(3)
        return original_play(self, index)

    monkeypatch.setattr(EpisodePlayer, "play", play)  # the forked workers inherit it
    runner = RunnerConfig(n_episodes=40, n_workers=2, max_episode_steps=30)
    with caplog.at_level(logging.WARNING, logger="mazerun.acting.rollout"):
        with pytest.raises(MazerunError) as raised:
            rollout("LunarLander-v3", PolicyConfig(), runner, tmp_path, print_fn=lambda _: None)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("episode 5 (seed 5) killed its worker twice (exit code 3); ")
    kept = load_records(tmp_path / "trajectory_data")
    assert message.endswith(f"; {len(kept)} finished episodes are kept in {tmp_path}")
    assert 5 not in {record.seed for record in kept} and len(kept) < 40
    assert "exited with code 3 during episode 5; playing it again in a fresh worker" in caplog.text
    assert not multiprocessing.active_children()


def test_a_worker_error_stops_the_run_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original_play = EpisodePlayer.play

    def play(self: EpisodePlayer, index: int):
        if index == 3:
            raise MazerunError(f"cannot write {tmp_path}/x: No space left on device")
        return original_play(self, index)

    monkeypatch.setattr(EpisodePlayer, "play", play)
    with pytest.raises(MazerunError, match=r"^cannot write .*: No space left on device$"):
        rollout("LunarLander-v3", PolicyConfig(), RunnerConfig(n_episodes=200, n_workers=2, max_episode_steps=30),
                tmp_path, print_fn=lambda _: None)
    assert not multiprocessing.active_children()
    assert not [path for path in (tmp_path / "trajectory_data").iterdir() if path.suffix != ".pkl"]


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
