"""Progress of a long phase: a tqdm bar on a terminal, and a log line now and then wherever the log goes.

A bar alone says nothing in ``run.log`` or in a batch job's output (tqdm draws no bar where
stderr is not a terminal), so a phase of minutes with no report in it looked hung. Every
:class:`Progress` also logs ``desc: done/total units, rate, elapsed, time left`` once its phase
has run ``first_after`` seconds, then every ``every`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("mazerun")

FIRST_LOG_AFTER = 20.0
"""Seconds before a phase's first progress line: well inside the 30 s a user waits for a first sign of life."""
LOG_EVERY = 60.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """``total`` units of work (None: not known up front), ``initial`` of them done before this process began."""

    def __init__(self, total: int | None, *, unit: str, desc: str, initial: int = 0, leave: bool = True,
                 disable: bool | None = None, first_after: float = FIRST_LOG_AFTER, every: float = LOG_EVERY) -> None:
        self.total, self.unit, self.desc, self.every = total, unit, desc, every
        self.done = self.initial = initial
        self.quiet = disable is True  # a follower rank of a data-parallel job: rank 0 speaks
        self.started = time.monotonic()
        self.next_line = self.started + first_after
        self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, leave=leave, disable=disable)
        self._redirect = contextlib.ExitStack()
        if not self.bar.disable:  # log lines go above the bar instead of through it
            # imported here: it loads asyncio (tqdm.auto), and a run whose stderr is no terminal draws no bar
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect.enter_context(logging_redirect_tqdm())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, count: int = 1) -> None:
        self.done += count
        self.bar.update(count)
        now = time.monotonic()
        if now >= self.next_line and not self.quiet:
            self.next_line = now + self.every
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``dagger updates: 1,200/3,000 updates, 45.1 updates/s, 27 s so far, about 40 s left``."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            return f"{self.desc}: {self.done:,} {self.unit}s, {rate:.3g} {self.unit}s/s, {_duration(elapsed)} so far"
        left = f", about {_duration((self.total - self.done) / rate)} left" if rate > 0 else ""
        return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s, {rate:.3g} {self.unit}s/s, "
                f"{_duration(elapsed)} so far{left}")

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()
        self._redirect.close()
