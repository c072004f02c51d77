"""A replay buffer: the last ``capacity`` transitions of a vector env, in columns allocated once.

Rows are written in the order the env copies step (a ring: the oldest are overwritten) and
drawn uniformly, as a :class:`~mazerun.data.tensors.TransitionBatch`, the batch every
batch-fed algorithm reads. ``dones`` marks terminal transitions only: an episode cut off by a
time limit keeps its future, and its ``next_observations`` row is the episode's final
observation (not the next episode's first, which the env returns in its place). Observations
are vectors (a 1-D Box): the continuous-action learners that replay never meet MiniGrid's dicts.

The columns live in one of two stores, with the same ring and the same draws:

* memory: tensors on the training device;
* disk: one raw C-order ``<column>.bin`` per column in a directory of the run (as a columnar
  store's, :mod:`mazerun.data.store`), memory-mapped and viewed as CPU tensors, so resident memory
  does not grow with the capacity: the kernel keeps what fits of the files in its page cache.
  The files are scratch, made when the buffer is (each run in its own run directory) and removed
  when it closes, however the run ends: ``last.pt`` holds the buffer, and a continued run reads it
  from there. A run killed outright (SIGKILL, a power cut) leaves them behind, to delete by hand.

:func:`choose_store` picks the store (``auto``: disk where the buffer would take more than half
of the memory available).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from mazerun.config.schemas import available_memory
from mazerun.core.errors import MazerunError
from mazerun.data.tensors import TransitionBatch, allocate_actions

COLUMNS = ("observations", "next_observations", "actions", "rewards", "dones")
STORES = ("memory", "disk", "auto")
"""Where the columns live: tensors on the device, memory-mapped files, or whichever fits (:func:`choose_store`)."""


def column_layouts(observation_space: gym.Space,
                   action_space: gym.Space) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each of :data:`COLUMNS`' row shape and dtype."""
    actions = allocate_actions((0,), action_space, "meta")  # its shape and dtype, no memory
    vector, scalar = (tuple(observation_space.shape), torch.float32), ((), torch.float32)
    return {"observations": vector, "next_observations": vector, "actions": (tuple(actions.shape[1:]), actions.dtype),
            "rewards": scalar, "dones": scalar}


def buffer_bytes(capacity: int, observation_space: gym.Space, action_space: gym.Space) -> int:
    """Bytes of the five columns of ``capacity`` rows."""
    return capacity * sum(math.prod(shape) * dtype.itemsize
                          for shape, dtype in column_layouts(observation_space, action_space).values())


def choose_store(setting: str, nbytes: int, device: torch.device, key: str) -> tuple[bool, str]:
    """Whether a buffer of ``nbytes`` goes on disk under ``setting`` (one of :data:`STORES`, the value of ``key``), and
    why, for the run's log. The disk store is read on the CPU: asked for on another device it is refused."""
    if setting == "disk" and device.type != "cpu":
        raise MazerunError(f"{key}=disk keeps the replay buffer in memory-mapped files read on the CPU and this run "
                           f"trains on {device}; use {key}=memory, or device=cpu")
    if setting != "auto":
        return setting == "disk", f"{key}={setting}"
    if device.type != "cpu":
        return False, f"{key}=auto on {device}, whose memory holds it (the disk store is read on the CPU)"
    available = available_memory()
    on_disk = nbytes > available / 2
    return on_disk, (f"{key}=auto, and it {'exceeds' if on_disk else 'fits in'} half of the {available / 2**20:,.1f} "
                     "MiB of memory available")


class ReplayBuffer:
    """Transitions ``(capacity, ...)``; :meth:`state` is what ``last.pt`` keeps of them.

    With ``directory`` the columns are memory-mapped files in it (the disk store, on the CPU; :meth:`close` removes
    them), else tensors on ``device``.
    """

    def __init__(self, capacity: int, observation_space: gym.Space, action_space: gym.Space,
                 device: torch.device | str, directory: Path | None = None) -> None:
        self.capacity, self.device, self.directory = capacity, torch.device(device), directory
        layouts = column_layouts(observation_space, action_space)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

        def column(name: str) -> torch.Tensor:
            shape, dtype = layouts[name]
            if directory is None:
                return torch.zeros((capacity, *shape), dtype=dtype, device=self.device)
            return self._map(directory / f"{name}.bin", (capacity, *shape), dtype)

        try:
            self.observations = column("observations")
            self.next_observations = column("next_observations")
            self.actions = column("actions")
            self.rewards = column("rewards")
            self.dones = column("dones")
        except BaseException:  # a full disk: none of the files stay
            self.close()
            raise
        self.position = 0
        """Where the next row is written."""
        self.size = 0
        """Rows filled so far (at most ``capacity``)."""

    @staticmethod
    def _map(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed column file of ``shape``, as a tensor. Its blocks are reserved now: a disk that fills up fails
        here, in one line, rather than as a SIGBUS when a write reaches an unbacked page."""
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            with open(path, "wb") as handle:  # a file of a killed run is truncated: every row starts at zero
                os.posix_fallocate(handle.fileno(), 0, nbytes)
        except OSError as error:
            raise MazerunError(f"cannot make the replay buffer's {path} ({nbytes / 2**20:,.1f} MiB): "
                               f"{error.strerror or error}; free disk space, or point hydra.run.dir at a larger "
                               "disk") from None
        return torch.from_numpy(np.memmap(path, dtype=torch.empty(0, dtype=dtype).numpy().dtype, mode="r+",
                                          shape=shape))

    def __len__(self) -> int:
        return self.size

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the disk store's files (and its directory, if nothing else is in it); nothing for the memory store."""
        if self.directory is None:
            return
        for name in COLUMNS:
            (self.directory / f"{name}.bin").unlink(missing_ok=True)
        if not any(self.directory.iterdir()):
            self.directory.rmdir()

    def add(self, observations: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
            next_observations: torch.Tensor, terminated: torch.Tensor) -> None:
        """One row per env copy; ``terminated`` (not ``truncated``) is what stops the bootstrap."""
        count = len(actions)
        index = torch.arange(self.position, self.position + count, device=self.device) % self.capacity
        self.observations[index] = observations
        self.next_observations[index] = next_observations
        self.actions[index] = actions
        self.rewards[index] = rewards
        self.dones[index] = terminated.to(self.dones.dtype)
        self.position = (self.position + count) % self.capacity
        self.size = min(self.size + count, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> TransitionBatch:
        """``batch_size`` rows drawn uniformly (with replacement) from ``generator``."""
        index = torch.randint(self.size, (batch_size,), generator=generator, device=self.device)
        return TransitionBatch(self.observations[index], self.actions[index], self.rewards[index],
                               self.next_observations[index], self.dones[index])

    def state(self) -> dict[str, Any]:
        """The filled rows on the CPU, the capacity and the write position: plain tensors and numbers, for
        ``torch.load(weights_only=True)``.

        Each column's rows are a tensor with storage of their own size, sharing the buffer's memory (or its
        files): ``torch.save`` writes a tensor's whole storage, and a view of the whole column would be copied out
        first (``save_checkpoint``), the disk store's rows included. Save it before the next :meth:`add`.
        """
        return {"capacity": self.capacity, "position": self.position, "size": self.size,
                **{name: torch.from_numpy(getattr(self, name)[: self.size].cpu().numpy()) for name in COLUMNS}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` of a buffer of the same capacity, in either store, a column at a time (from a
        memory-mapped ``last.pt``, nothing is read whole into RAM for the disk store)."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"the saved replay buffer holds {state['capacity']} transitions, this one {self.capacity}")
        self.size, self.position = int(state["size"]), int(state["position"])
        for name in COLUMNS:
            getattr(self, name)[: self.size] = state[name].to(self.device)
