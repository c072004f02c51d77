"""The CPU's floating-point mode around updates (:func:`mazerun.core.numerics.subnormals_flushed`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mazerun.algorithms.protocol import Algorithm
from mazerun.core.numerics import subnormals_flushed


def test_subnormals_are_zero_inside_the_block_only() -> None:
    subnormal = torch.tensor([1e-40])  # below float32's smallest normal number, about 1.18e-38
    with subnormals_flushed():
        assert (subnormal * 1.0).item() == 0.0
        assert (torch.tensor([1e-30]) * 1.0).item() == pytest.approx(1e-30)  # normal numbers are untouched
    assert (subnormal * 1.0).item() > 0.0
    assert np.float32(1e-40) * np.float32(1.0) > 0.0  # numpy, in the same thread, sees them again


def test_the_mode_is_put_back_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), subnormals_flushed():
        raise RuntimeError("an update failed")
    assert (torch.tensor([1e-40]) * 1.0).item() > 0.0


def test_every_algorithm_learns_with_subnormals_flushed() -> None:
    """Loops call ``Algorithm.learn``, which runs the algorithm's own ``update`` in the flushed mode: an algorithm
    a researcher adds gets it without knowing of it, and the mode is back to torch's after."""

    class Probe(Algorithm):
        network_type = "actor_critic"

        def update(self, batch: torch.Tensor) -> dict[str, float]:
            return {"product": (batch * 1.0).item()}

    probe = Probe(config=None, spec=None)
    assert probe.learn(torch.tensor([1e-40])) == {"product": 0.0}
    assert probe.update(torch.tensor([1e-40]))["product"] > 0.0
