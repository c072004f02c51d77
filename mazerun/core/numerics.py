"""The CPU's floating-point mode around the work that gains from it, and nowhere else."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Within the block, torch's CPU arithmetic reads and writes subnormal floats (below about 1.2e-38 in float32)
    as zero.

    Trained networks drift into subnormal values (Adam's moments, products of tiny gradients), which x86 cores
    compute many times slower: continuous CQL on Hopper's shapes slowed from 18 to 9 updates/s over 10k updates,
    and continued with subnormals flushed it keeps 17-18. The mode is the thread's (its MXCSR register), shared
    with numpy and the envs' physics, so it is put back to torch's default after the block: record checks and
    env steps see subnormals as they are.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
