"""Data-parallel offline training under ``torchrun``: one process per rank, gradients averaged.

``torchrun --nproc_per_node=N -m mazerun -cn conf_train algorithm=bc ...`` starts N copies of
``run``; torchrun tells each its place through ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.
What changes against one process, and nothing else does:

* **one run directory.** Rank 0 lets Hydra choose it as usual and tells the others, which run
  in it without writing there: rank 0 alone writes ``run.log``, the checkpoints (their
  ``extra["world_size"]`` says how many processes trained), ``metrics.csv`` and TensorBoard.
* **one global batch.** Every rank draws the same global index vector from the same seeded
  generator and gathers its own slice of it (``batch_size / world_size`` rows), so N processes
  train on exactly the batches one process with the same ``batch_size`` trains on.
* **averaged gradients.** After each backward pass the gradients of all ranks are averaged
  with one all-reduce of a flat buffer (gloo on the CPU, NCCL on GPUs). Every rank then takes
  the same optimiser step, and the weights stay identical without being sent.
* **one place that reports.** Train metrics are averaged over the ranks; rank 0 alone
  validates and evaluates, while the others wait in the next all-reduce.
* **stopping together.** A stop signal is folded into that all-reduce, so every rank stops
  after the same update and rank 0 writes ``last.pt`` there.

One process (no torchrun, or ``--nproc_per_node=1``) runs none of this: the gradient step and
the sampler are exactly the single-process ones.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from mazerun.core import interrupts
from mazerun.core.errors import MazerunError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DATA_PARALLEL_LOOPS = ("offline",)
"""The loops whose algorithms train under torchrun: bc, cql and iql."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one torchrun job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Rank 0 writes the run's files; the others only compute."""
        return self.rank == 0


SINGLE = World()


def world_from_env(environ: Mapping[str, str] | None = None) -> World:
    """What torchrun says (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process without it."""
    environ = os.environ if environ is None else environ
    try:
        return World(rank=int(environ.get("RANK", 0)), size=int(environ.get("WORLD_SIZE", 1)),
                     local_rank=int(environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise MazerunError(
            f"RANK={environ.get('RANK')!r}, WORLD_SIZE={environ.get('WORLD_SIZE')!r} are not integers; "
            "start data-parallel runs with torchrun"
        ) from None


def current_world() -> World:
    """The world of this process once :func:`init` joined it, else one process."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group was joined
    return world_from_env() if dist is not None and dist.is_available() and dist.is_initialized() else SINGLE


def backend() -> str:
    """gloo for CPU tensors; NCCL as well for CUDA ones when there is a GPU."""
    import torch  # here and below on first use: `run` starts without torch, which a recording never needs

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init(world: World) -> None:
    """Join the process group torchrun set up (``MASTER_ADDR``/``MASTER_PORT`` from its environment)."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend=backend(), rank=world.rank, world_size=world.size)


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share_run_dir(run_dir: str | None) -> None:
    """Rank 0: tell the other ranks the run directory (None: this job failed before having one)."""
    import torch
    import torch.distributed as dist

    dist.broadcast_object_list([run_dir], src=0, device=torch.device("cpu"))


def receive_run_dir() -> str | None:
    """Ranks > 0: the run directory rank 0's Hydra chose, or None if rank 0 failed first."""
    import torch
    import torch.distributed as dist

    received: list[Any] = [None]
    dist.broadcast_object_list(received, src=0, device=torch.device("cpu"))
    return received[0]


def follower_overrides(run_dir: str) -> list[str]:
    """Hydra overrides of ranks > 0: rank 0's directory, no config copy, no run.log, warnings only on the console."""
    return [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]",
            "hydra.job_logging.root.level=WARNING", "+hydra.job_logging.handlers.file.delay=true"]


def is_peer_failure(error: BaseException) -> bool:
    """An error of a collective whose peer is gone (it failed or was killed), not of this process."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


def check_supported(loop: str | None, what: str, batch_key: str, batch: int, world: World) -> None:
    """Refuse, in one line, a run that cannot train data-parallel, before anything is written."""
    if not world.distributed:
        return
    if loop not in DATA_PARALLEL_LOOPS:
        raise MazerunError(
            f"{what} does not train data-parallel (torchrun started {world.size} processes); "
            "run it in one process (without torchrun), or train bc, cql or iql under torchrun"
        )
    if batch % world.size:
        raise MazerunError(
            f"{batch_key}={batch} does not split evenly over the {world.size} processes of this torchrun job; "
            f"use a multiple of {world.size}"
        )


class ShardedSampler:
    """A sampler's global batch, of which this rank gathers its contiguous share.

    The index vector is drawn exactly as the wrapped sampler draws it (same generator, same
    call), so the N shards together are the batch one process would draw.
    """

    def __init__(self, sampler: Any, world: World) -> None:
        self.sampler, self.world = sampler, world
        self.generator = sampler.generator
        self.dataset = sampler.dataset

    def sample(self) -> Any:
        import torch

        sampler = self.sampler
        recurrent = hasattr(sampler, "nrollouts")
        count, rows = (sampler.nrollouts, len(sampler)) if recurrent else (sampler.batch_size, len(sampler.dataset))
        index = torch.randint(rows, (count,), generator=sampler.generator, device=sampler.dataset.device)
        share = count // self.world.size
        return sampler.batch(index[self.world.rank * share:(self.world.rank + 1) * share])

    def epoch(self, shuffle: bool = True) -> Iterator[Any]:
        return self.sampler.epoch(shuffle)


class GradientSync:
    """Average the gradients of ``parameters`` over the ranks, and agree on stopping, in one all-reduce.

    The last element of the flat buffer carries this rank's pending stop signal: when any rank
    has one, every rank stops after the same update.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], world: World) -> None:
        self.parameters, self.world = parameters, world
        self.stop_signal = 0

    def __call__(self) -> None:
        import torch
        import torch.distributed as dist

        grads = [parameter.grad for parameter in self.parameters if parameter.grad is not None]
        pending = interrupts.pending()
        flag = torch.tensor([float(pending.signal_number if pending is not None else 0)], device=grads[0].device)
        flat = torch.cat([grad.reshape(-1) for grad in grads] + [flag])
        dist.all_reduce(flat)
        flat[:-1].div_(self.world.size)
        offset = 0
        for grad in grads:
            count = grad.numel()
            grad.copy_(flat[offset:offset + count].view_as(grad))
            offset += count
        if self.stop_signal == 0 and float(flat[-1]) > 0:
            self.stop_signal = pending.signal_number if pending is not None else int(signal.SIGTERM)

    def check(self) -> None:
        """Stop here if any rank asked to at the last all-reduce; a signal not yet shared waits for the next."""
        if self.stop_signal:
            if interrupts.pending() is not None:
                interrupts.check()
            raise interrupts.Interrupted(self.stop_signal)

    def average(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-metric means over the ranks (every rank holds the same names)."""
        import torch
        import torch.distributed as dist

        names = list(totals)  # the same order on every rank: the same code filled it
        if not names:
            return {}
        stacked = torch.stack([totals[name].detach().float().reshape(()) for name in names])
        dist.all_reduce(stacked)
        stacked /= self.world.size
        return dict(zip(names, stacked))


def broadcast_modules(modules: list[torch.nn.Module]) -> None:
    """Rank 0's parameters and buffers in every rank: all start from the same weights, whatever the init."""
    import torch.distributed as dist

    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


class NullLogger:
    """Stands in for :class:`mazerun.training.metrics.MetricsLogger` on ranks that write nothing."""

    def log(self, step: int, metrics: dict[str, float], group: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass
