"""The replay buffer's two stores (issue 27): memory-mapped column files draw what tensors in memory draw, last.pt
carries either into either, ``buffer_store=auto`` weighs the buffer against the memory available, and a SAC run
on disk continues exactly through the real CLI."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import run_cli, run_ok, save_network
from test_sac import TINY, assert_same_run

from mazerun.algorithms.sac import SACConfig
from mazerun.core.errors import MazerunError
from mazerun.data import replay
from mazerun.data.replay import COLUMNS, ReplayBuffer, buffer_bytes, choose_store
from mazerun.nn.checkpoint import TRAINING_STATE, load_checkpoint
from mazerun.nn.models import ModelConfig, build_actor_critic, default_model_kind
from mazerun.training.loops import offpolicy
from mazerun.training.loops.offpolicy import REPLAY_DIR, open_replay_buffer

OBSERVATIONS = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
ACTIONS = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
CAPACITY = 7
KEY = "algorithm.buffer_store"


def make_buffer(directory: Path | None) -> ReplayBuffer:
    return ReplayBuffer(CAPACITY, OBSERVATIONS, ACTIONS, "cpu", directory)


def fill(buffer: ReplayBuffer, steps: int = 4, copies: int = 3) -> ReplayBuffer:
    """``steps`` seeded steps of ``copies`` env copies: 12 rows into 7 wrap the ring past its start."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        buffer.add(torch.randn(copies, 3, generator=generator), torch.randn(copies, 2, generator=generator),
                   torch.randn(copies, generator=generator), torch.randn(copies, 3, generator=generator),
                   torch.rand(copies, generator=generator) < 0.3)
    return buffer


def assert_same_state(state: dict, other: dict) -> None:
    assert {key: state[key] for key in ("capacity", "position", "size")} == {
        key: other[key] for key in ("capacity", "position", "size")}
    for name in COLUMNS:
        assert torch.equal(state[name], other[name]), name


def draws(buffer: ReplayBuffer, seed: int = 3) -> list[torch.Tensor]:
    """Every column of four seeded batches."""
    generator = torch.Generator().manual_seed(seed)
    return [tensor for _ in range(4) for tensor in buffer.sample(5, generator)[:len(COLUMNS)]]


def save_last(path: Path, buffer: ReplayBuffer) -> Path:
    """A ``last.pt`` as the off-policy loop writes it: a network, and the buffer in the training state."""
    config = ModelConfig(kind=default_model_kind(OBSERVATIONS), hidden_sizes=(8, 8))
    network = build_actor_critic(config, OBSERVATIONS, ACTIONS, None)
    return save_network(path, network, "actor_critic", config, "Pendulum-v1", OBSERVATIONS, ACTIONS, "sac",
                        extra={"step": 12, "global_step": 12,
                               TRAINING_STATE: {"algorithm": {}, "buffer": buffer.state()}})


def test_the_disk_store_draws_exactly_what_the_memory_store_draws_past_a_wrap(tmp_path: Path) -> None:
    memory = fill(make_buffer(None))
    with fill(make_buffer(tmp_path / REPLAY_DIR)) as disk:
        assert (len(disk), disk.position) == (CAPACITY, 12 % CAPACITY)
        assert sorted(path.name for path in (tmp_path / REPLAY_DIR).iterdir()) == sorted(f"{name}.bin"
                                                                                          for name in COLUMNS)
        assert isinstance(disk.observations, torch.Tensor)
        for mine, theirs in zip(draws(memory), draws(disk), strict=True):
            assert torch.equal(mine, theirs)
        assert_same_state(memory.state(), disk.state())
    assert not (tmp_path / REPLAY_DIR).exists()  # scratch: closing removes the files and their directory


def test_the_disk_stores_state_is_its_filled_rows_in_place(tmp_path: Path) -> None:
    """state() hands torch.save the rows in the files themselves, sized to the filled rows: save_checkpoint would
    copy a view of a whole column out first, the disk store's whole buffer into RAM."""
    with make_buffer(tmp_path / REPLAY_DIR) as disk:
        fill(disk, steps=1)
        state = disk.state()
        for name in COLUMNS:
            column = getattr(disk, name)
            assert state[name].data_ptr() == column.data_ptr()
            assert state[name].untyped_storage().nbytes() == 3 * column[0].numel() * column.element_size()


@pytest.mark.parametrize("saved_on_disk, loaded_on_disk", [(False, True), (True, False), (True, True)],
                         ids=["memory-to-disk", "disk-to-memory", "disk-to-disk"])
def test_last_pt_carries_the_buffer_into_either_store(tmp_path: Path, saved_on_disk: bool,
                                                      loaded_on_disk: bool) -> None:
    with fill(make_buffer(tmp_path / "saved" if saved_on_disk else None)) as saved:
        path = save_last(tmp_path / "run" / "last.pt", saved)
        expected = draws(saved)
        state = saved.state()
        torch.save(state, tmp_path / "expected.pt")  # the saved buffer's own files go away with it
    state = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert torch.load(path, weights_only=True)["extra"][TRAINING_STATE]["buffer"]["size"] == CAPACITY
    with make_buffer(tmp_path / "loaded" if loaded_on_disk else None) as loaded:
        loaded.load_state(load_checkpoint(path).extra[TRAINING_STATE]["buffer"])
        assert_same_state(loaded.state(), state)
        for mine, theirs in zip(draws(loaded), expected, strict=True):
            assert torch.equal(mine, theirs)
        fill(loaded, steps=1)  # the ring goes on from the saved write position
        assert loaded.position == (12 + 3) % CAPACITY


def test_auto_puts_a_buffer_over_half_the_available_memory_on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    nbytes = buffer_bytes(1000, OBSERVATIONS, ACTIONS)
    assert nbytes == 1000 * 4 * (3 + 3 + 2 + 1 + 1)
    cpu = torch.device("cpu")
    monkeypatch.setattr(replay, "available_memory", lambda: 2 * nbytes - 1)
    on_disk, reason = choose_store("auto", nbytes, cpu, KEY)
    assert on_disk and reason == (f"{KEY}=auto, and it exceeds half of the {(2 * nbytes - 1) / 2**20:,.1f} MiB of "
                                  "memory available")
    monkeypatch.setattr(replay, "available_memory", lambda: 2 * nbytes)
    on_disk, reason = choose_store("auto", nbytes, cpu, KEY)
    assert not on_disk and "it fits in half" in reason
    monkeypatch.setattr(replay, "available_memory", lambda: 0)
    assert choose_store("memory", nbytes, cpu, KEY) == (False, f"{KEY}=memory")  # asked for: not weighed
    assert not choose_store("auto", nbytes, torch.device("cuda"), KEY)[0]  # the GPU's memory holds it
    assert choose_store("disk", nbytes, cpu, KEY) == (True, f"{KEY}=disk")


@pytest.mark.parametrize("available, on_disk", [(0, True), (2**40, False)], ids=["over-half", "within-half"])
def test_the_loop_opens_the_store_auto_picks_and_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, available: int, on_disk: bool
) -> None:
    monkeypatch.setattr(replay, "available_memory", lambda: available)
    setup = SimpleNamespace(algorithm=SACConfig(buffer_size=1000), prefix="algorithm", observation_space=OBSERVATIONS,
                            action_space=ACTIONS, device=torch.device("cpu"), run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger=offpolicy.__name__), open_replay_buffer(setup) as buffer:
        assert buffer.directory == (tmp_path / REPLAY_DIR if on_disk else None)
        assert (tmp_path / REPLAY_DIR).is_dir() == on_disk
    where = f"on disk in {tmp_path / REPLAY_DIR}" if on_disk else "in memory"
    assert [record.getMessage() for record in caplog.records] == [
        f"a replay buffer of 1,000 transitions (0.0 MiB) {where}: {KEY}=auto, and it "
        f"{'exceeds' if on_disk else 'fits in'} half of the {available / 2**20:,.1f} MiB of memory available"]
    assert not (tmp_path / REPLAY_DIR).exists()


def test_the_disk_store_on_a_gpu_is_refused_in_one_line() -> None:
    with pytest.raises(MazerunError, match=rf"^{KEY}=disk keeps the replay buffer in memory-mapped files read on the "
                                           rf"CPU and this run trains on cuda; use {KEY}=memory, or device=cpu$"):
        choose_store("disk", 1, torch.device("cuda"), KEY)


def test_an_unknown_buffer_store_is_refused_in_one_line(workdir: Path) -> None:
    result = run_cli("env=Pendulum-v1", "algorithm=sac", "algorithm.buffer_store=ram", cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: algorithm.buffer_store='ram' is unknown; use memory or disk or auto"], result.stderr


def test_a_sac_run_on_disk_continues_exactly_through_the_cli(workdir: Path) -> None:
    """The whole run keeps its buffer in memory, the stopped and the continued one on disk: the same run."""
    tiny = [override for override in TINY if not override.startswith("algorithm.total_steps=")]
    tiny.append("algorithm.buffer_size=1000")
    run_ok(*tiny, "algorithm.total_steps=72", "algorithm.buffer_store=memory", "hydra.run.dir=whole", cwd=workdir)
    first = run_ok(*tiny, "algorithm.total_steps=24", "algorithm.buffer_store=disk", "hydra.run.dir=first",
                   cwd=workdir)
    assert f"on disk in {workdir / 'first' / REPLAY_DIR}: {KEY}=disk" in first.stdout + first.stderr
    run_ok(*tiny, "algorithm.total_steps=72", "algorithm.buffer_store=disk", "input_dir=first",
           "hydra.run.dir=continued", cwd=workdir)
    assert_same_run(workdir / "whole", workdir / "continued")
    assert not (workdir / "first" / REPLAY_DIR).exists() and not (workdir / "continued" / REPLAY_DIR).exists()
