"""Progress lines: a phase of minutes says how far it is, in run.log too, where tqdm draws no bar."""

from __future__ import annotations

import logging

import pytest

from mazerun.core import progress
from mazerun.core.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_comes_after_the_first_interval_then_every_interval(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="mazerun")
    with Progress(3000, initial=1000, unit="update", desc="dagger updates", first_after=20,
                  every=60) as bar:
        clock.now += 19
        bar.update(100)
        assert not caplog.records  # not yet: 19 s
        clock.now += 1
        bar.update(100)  # 20 s, 200 updates done here: 10 updates/s, 1,800 left: 3 minutes
        clock.now += 59
        bar.update(1)  # 59 s after the first line: no second one yet
    assert [record.getMessage() for record in caplog.records] == [
        "dagger updates: 1,200/3,000 updates, 10 updates/s, 20 s so far, about 3 min 00 s left"]


def test_a_follower_rank_stays_quiet(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="mazerun")
    with Progress(10, unit="step", desc="ppo", disable=True, first_after=0) as bar:
        clock.now += 5
        bar.update()
    assert not caplog.records


@pytest.mark.parametrize(("seconds", "text"), [(7.4, "7 s"), (61, "1 min 01 s"), (3725, "1 h 02 min")])
def test_durations_read_as_a_person_says_them(seconds: float, text: str) -> None:
    assert progress._duration(seconds) == text
