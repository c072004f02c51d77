"""Adam without ``torch.optim``: the same update, the same ``state_dict``, none of its import cost.

``torch.optim``'s optimisers import ``torch._dynamo`` (the compiler's front end) the first time
one is built or stepped: 1.5 to 2 s on a 2-core machine, the largest single cost of a short run's
start-up, and mazerun never compiles. :class:`Adam` calls the kernel ``torch.optim.Adam(fused=True)``
calls (``torch._fused_adam_``), keeps the per-parameter state under the same names (``step``,
``exp_avg``, ``exp_avg_sq``) and reads and writes the same ``state_dict``, so checkpoints of either
load into the other and a continued run steps on exactly.

    m_t = beta1 * m_t-1 + (1 - beta1) * g_t          v_t = beta2 * v_t-1 + (1 - beta2) * g_t^2
    p_t = p_t-1 - lr / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

A parameter without a gradient in a step is left alone, its step count included (critic burn-in
relies on it). Only what mazerun uses is supported: one parameter group, no weight decay, no amsgrad.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import torch

GROUP_DEFAULTS = {"weight_decay": 0, "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                  "differentiable": False, "fused": True, "decoupled_weight_decay": False}
"""The keys torch.optim.Adam(fused=True) writes into each parameter group of its state_dict."""


def adam_step(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float, beta2: float,
    eps: float,
) -> None:
    """One Adam step of every tensor in ``params`` (one device and dtype), in place; ``steps`` count up by one."""
    torch._foreach_add_(steps, 1)
    adam_kernel(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps)


def adam_kernel(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float, beta2: float,
    eps: float,
) -> None:
    """:func:`adam_step` with ``steps`` already counted: torch's fused kernel, or the formula where it is missing."""
    if _FUSED:
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                           weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
    else:
        reference_adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps)


def reference_adam_step(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float, beta2: float,
    eps: float,
) -> None:
    """The formula in the module docstring with plain tensor ops (``steps`` already counted), for a
    torch without the fused kernel; the tests hold the fused kernel to it."""
    with torch.no_grad():
        for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            count = float(step)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**count)).add_(eps)
            param.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**count))


_FUSED = hasattr(torch, "_fused_adam_")


class Adam:
    """``torch.optim.Adam(params, lr, betas, eps, fused=True)`` for one parameter group, as described above.

    ``param_groups`` and ``state`` have torch's layout (``param_groups[0]["lr"]`` sets the
    learning rate; ``state[parameter]`` holds the moments), which is what schedules and the
    population's batched updates read and write.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param_groups: list[dict[str, Any]] = [
            {"lr": lr, "betas": tuple(betas), "eps": eps, **GROUP_DEFAULTS, "params": list(params)}
        ]
        self.state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.param_groups[0]["params"]:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        batches: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], ...]] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            batch = batches.setdefault((param.device, param.dtype), ([], [], [], [], []))
            for column, value in zip(batch, (param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                column.append(value)
        beta1, beta2 = group["betas"]
        for params, grads, exp_avgs, exp_avg_sqs, steps in batches.values():
            adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                      eps=group["eps"])

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: parameters as their index, the state of each parameter that has one."""
        params = self.param_groups[0]["params"]
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        return {
            "state": {index: self.state[param] for index, param in enumerate(params) if param in self.state},
            "param_groups": [{**group, "params": list(range(len(params)))}],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A state_dict of this class or of ``torch.optim.Adam`` over the same parameters, in the same order."""
        (saved,) = state_dict["param_groups"]
        params = self.param_groups[0]["params"]
        if len(saved["params"]) != len(params):
            raise ValueError(f"the saved optimiser state holds {len(saved['params'])} parameters, this one {len(params)}")
        if saved.get("weight_decay") or saved.get("amsgrad") or saved.get("maximize"):
            raise ValueError("the saved optimiser state uses weight decay, amsgrad or maximize, which this Adam lacks")
        group = self.param_groups[0]
        group.update(lr=saved["lr"], betas=tuple(saved["betas"]), eps=saved["eps"])
        by_index = dict(zip(saved["params"], params))
        self.state = defaultdict(dict)
        for index, values in state_dict["state"].items():
            param = by_index[index]
            self.state[param] = {
                "step": torch.as_tensor(values["step"], dtype=torch.float32).to(param.device).clone(),
                "exp_avg": values["exp_avg"].to(dtype=param.dtype, device=param.device).clone(),
                "exp_avg_sq": values["exp_avg_sq"].to(dtype=param.dtype, device=param.device).clone(),
            }
