"""Helpers to drive the real `run` command in a scratch directory, as a user would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from multiprocessing import forkserver, resource_tracker
from pathlib import Path
from typing import Iterator, Sequence
from xml.etree import ElementTree

import gymnasium as gym
import pytest
import torch

from mazerun.algorithms.rollouts import RolloutBatch
from mazerun.nn.checkpoint import save_checkpoint
from mazerun.nn.models import ModelConfig
from mazerun.training.runsetup import model_config_dict

REPO = Path(__file__).resolve().parent.parent


MAZERUN = (sys.executable, "-m", "mazerun")
"""The `run` command; ``program=`` takes another (``DATASETS``, ``EXPORT``, ``torchrun``)."""
DATASETS = (sys.executable, "-m", "mazerun.datasets")
EXPORT = (sys.executable, "-m", "mazerun.export")


def install_example(name: str, target: Path) -> dict[str, str]:
    """``pip install examples/<name>`` into ``target``, as a user installs a plugin; returns the environment in which
    `run` finds it. mazerun is installed already and hatchling builds the wheel here, so nothing is fetched."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip(f"pip is not available to {sys.executable}, so examples/{name} cannot be installed")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                             "--target", str(target), str(REPO / "examples" / name)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pip could not install examples/{name}:\n{result.stderr}"
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


def run_cli(*overrides: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300,
            program: Sequence[str] = MAZERUN) -> subprocess.CompletedProcess:
    """`run <overrides>` in ``cwd``; the output is captured, the exit code left to the test."""
    with spawn_cli(*overrides, cwd=cwd, env=env, program=program) as process:
        stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_ok(*overrides: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = run_cli(*overrides, cwd=cwd, env=env)
    assert result.returncode == 0, f"run {' '.join(overrides)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _default_signals() -> None:
    """In the child, before exec: take Ctrl-C and SIGTERM as a terminal would deliver them.

    A suite started from a background job (``nohup pytest &``) inherits SIGINT as ignored, and
    Python then never installs its KeyboardInterrupt handler; restoring the default here makes
    the tests independent of how they were started.
    """
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


@contextlib.contextmanager
def spawn_cli(*overrides: str, cwd: Path, env: dict[str, str] | None = None,
              program: Sequence[str] = MAZERUN) -> Iterator[subprocess.Popen]:
    """`run <overrides>` as a background process the test can signal; killed with its workers on every exit path."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [*program, *overrides], cwd=cwd, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_signals, start_new_session=True,
    )
    try:
        yield process
    finally:
        kill_group(process.pid)
        process.communicate()


def group_members(group: int) -> list[int]:
    """Live processes of process group ``group`` (zombies are dead already)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it just ended
        state, process_group = fields[0], int(fields[2])
        if process_group == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


def kill_group(group: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of ``group`` and wait until none is left alive; a group with none is left alone.

    A kill only marks a process: it may take a moment to exit, and a worker whose parent already
    ended is nobody's child to wait for. Without the wait, the last test's workers could outlive
    the suite by a few milliseconds. An emptied group's number may be reused, so it is not signalled.
    """
    if not group_members(group):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while group_members(group) and time.monotonic() < deadline:
        time.sleep(0.01)


def svg_polylines(path: Path) -> list[list[tuple[float, float]]]:
    """The points of each line of a learning-curve SVG; parsing it also proves the file is well-formed XML."""
    root = ElementTree.parse(path).getroot()
    return [[tuple(float(value) for value in pair.split(",")) for pair in line.get("points").split()]
            for line in root.iter("{http://www.w3.org/2000/svg}polyline")]


def newest_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "outputs").glob("*/*"), key=lambda path: path.stat().st_mtime)
    assert runs, f"no run directory under {cwd / 'outputs'}"
    return runs[-1]


@pytest.fixture(scope="session", autouse=True)
def _multiprocessing_helpers_end_with_the_suite() -> Iterator[None]:
    """The forkserver and resource tracker that in-process parallel rollouts start end, and are reaped, before pytest.

    Left to themselves they exit a moment after the suite, when they see its pipes close: a
    process outliving the test run.
    """
    yield
    forkserver._forkserver._stop()
    resource_tracker._resource_tracker._stop()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch directory that is also the working directory (outputs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def save_network(
    path: Path, network: torch.nn.Module, network_type: str, model_config: ModelConfig, env_id: str,
    observation_space: gym.Space, action_space: gym.Space, algorithm: str, extra: dict | None = None,
) -> Path:
    """A checkpoint of ``network`` as a training run writes it (no training state)."""
    save_checkpoint(path, model_state=network.state_dict(), model_config=model_config_dict(model_config, network_type),
                    observation_space=observation_space, action_space=action_space, env_id=env_id,
                    algorithm=algorithm, extra=extra or {})
    return path


def synthetic_batch(network: torch.nn.Module, size: int = 64) -> RolloutBatch:
    """A seeded PPO rollout of ``size`` random LunarLander-shaped observations acted on by ``network``."""
    generator = torch.Generator().manual_seed(1)
    observations = torch.randn(size, 8, generator=generator)
    with torch.no_grad():
        distribution = network.distribution(observations)
        actions = distribution.sample()
        return RolloutBatch(observations, actions, distribution.log_prob(actions), network.value(observations),
                            torch.randn(size, generator=generator), torch.randn(size, generator=generator))
