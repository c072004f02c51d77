"""A fused actor-critic acting in numpy: a rollout step over a few env copies without torch's cost per op.

A rollout step of PPO's 64x64 actor and critic on 8 env copies is about fifteen ops. Torch
spends 4 to 8 us dispatching each op on tensors that small, numpy about 1 us, so in numpy the
step takes a quarter of the time (about 25 us against 100 us on a Xeon core). The arrays
here are views of :class:`~mazerun.fast.fused.FusedActorCritic`'s storage on the CPU: the
update's steps are seen at once and nothing is copied.

The randomness comes from the caller as noise drawn from the loop's torch generator, one
number per copy for discrete actions (a uniform in ``[0, 1)``) and one per action dimension
for continuous ones (a standard normal). :func:`mazerun.nn.models.sample_with_noise` turns the
same noise into the same actions from a torch ``Distribution``, which the tests hold this
module to.
"""

from __future__ import annotations

import numpy as np

from mazerun.fast.fused import LOG_SQRT_2PI, FusedActorCritic
from mazerun.nn.models import NORMALIZED_OBS_CLIP


class ArrayActor:
    """The actor (row 0) and critic (row 1) of a CPU :class:`FusedActorCritic`, as numpy views of its storage."""

    def __init__(self, fused: FusedActorCritic) -> None:
        if fused.flat.device.type != "cpu":
            raise ValueError("an ArrayActor reads the fused storage as numpy arrays: the network must be on the CPU")
        layers = fused.stack.layers
        self.weights = [layer.weight_t.numpy() for layer in layers]  # (2, in, out)
        self.biases = [layer.bias.numpy() for layer in layers]  # (2, 1, out)
        self.tanh = fused.activation == "tanh"
        self.discrete = fused.discrete
        self.obs_mean, self.obs_std = fused.obs_mean.numpy(), fused.obs_std.numpy()  # (2, 1, D)
        self.log_std = None if fused.log_std is None else fused.log_std.numpy()
        self._workspaces: dict[int, list[np.ndarray]] = {}

    def _workspace(self, rows: int) -> list[np.ndarray]:
        """The inputs and each layer's outputs for ``rows`` rows, allocated once per row count."""
        workspace = self._workspaces.get(rows)
        if workspace is None:
            widths = [self.weights[0].shape[1], *(weight.shape[2] for weight in self.weights)]
            workspace = self._workspaces[rows] = [np.empty((2, rows, width), np.float32) for width in widths]
        return workspace

    def act(self, observations: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Actions, their log-probabilities and the values of ``(B, D)`` observations, drawn with ``noise``
        (``(B,)`` uniforms, or ``(B, A)`` standard normals). The arrays returned are new."""
        inputs, *outputs = self._workspace(len(observations))
        np.subtract(observations, self.obs_mean, out=inputs, casting="unsafe")
        inputs /= self.obs_std
        np.clip(inputs, -NORMALIZED_OBS_CLIP, NORMALIZED_OBS_CLIP, out=inputs)
        activate = np.tanh if self.tanh else _relu
        hidden = inputs
        for index, (weight, bias, output) in enumerate(zip(self.weights, self.biases, outputs)):
            np.matmul(hidden, weight, out=output)
            output += bias
            if index < len(outputs) - 1:
                activate(output, out=output)
            hidden = output
        head, values = hidden[0], hidden[1, :, 0].copy()
        if not self.discrete:
            log_std = self.log_std
            log_probs = (-0.5 * np.square(noise) - log_std).sum(1) - log_std.size * LOG_SQRT_2PI
            return head + np.exp(log_std) * noise, log_probs.astype(np.float32), values
        shifted = head - head.max(1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        actions = inverse_cdf(np.exp(log_p), noise)
        return actions, log_p[np.arange(len(actions)), actions], values


def inverse_cdf(probabilities: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The category of each row whose cumulative probability first exceeds the row's uniform (scaled by the row's
    total, which rounding may leave a hair off 1): a draw from ``probabilities``, ``(B, A)``."""
    cumulative = probabilities.cumsum(1)
    return (cumulative[:, :-1] <= uniforms[:, None] * cumulative[:, -1:]).sum(1)


def _relu(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.maximum(values, 0, out=out)
