"""Values that change linearly over training: learning rates, PPO's clip range, teacher forcing.

A schedule is anchored: it goes from ``start_value`` at ``start_step`` to ``end_value`` at
``end_step`` and stays there. A run continued with a larger budget re-anchors at the step and
value it stopped at (:meth:`LinearSchedule.extended_to`), so the value never jumps; with the
same budget the re-anchored schedule is the original one.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "linear")


@dataclass(frozen=True)
class LinearSchedule:
    start_value: float
    end_value: float
    end_step: int
    start_step: int = 0

    @classmethod
    def of(cls, kind: str, value: float, end_step: int, end_value: float = 0.0) -> LinearSchedule:
        """``constant`` keeps ``value``; ``linear`` decays it to ``end_value`` at ``end_step``."""
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule {kind!r}; use {' or '.join(SCHEDULE_KINDS)}")
        return cls(value, value if kind == "constant" else end_value, end_step)

    def __call__(self, step: int) -> float:
        span = self.end_step - self.start_step
        if span <= 0 or step >= self.end_step:
            return self.end_value
        progress = max(0.0, (step - self.start_step) / span)
        return self.start_value + (self.end_value - self.start_value) * progress

    def extended_to(self, step: int, end_step: int) -> LinearSchedule:
        """The schedule that continues from ``step`` with this one's value there, ending at ``end_step``."""
        if end_step == self.end_step:
            return self
        return LinearSchedule(self(step), self.end_value, end_step, start_step=step)

    def to_list(self) -> list[float]:
        """Plain values for a ``weights_only`` checkpoint; :meth:`from_list` inverts it."""
        return [self.start_value, self.end_value, self.end_step, self.start_step]

    @classmethod
    def from_list(cls, values: list[float]) -> LinearSchedule:
        start_value, end_value, end_step, start_step = values
        return cls(float(start_value), float(end_value), int(end_step), int(start_step))
