"""StateTrajectoryRecord: columns, per-step views, atomic writes and a reader that names bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mazerun.core.errors import MazerunError
from mazerun.data.records import RECORD_FORMAT_VERSION, EpisodeBuilder, load_records, write_record


def _episode(steps: int = 3, *, truncated: bool = False):
    builder = EpisodeBuilder(np.zeros(2, dtype=np.float32))
    for t in range(1, steps + 1):
        builder.add(t % 2, float(t), np.full(2, t, dtype=np.float32))
    return builder.build(terminated=not truncated, truncated=truncated, env_id="Toy-v0", seed=5, policy="scripted")


def test_record_round_trips_and_iterates_as_steps(tmp_path: Path) -> None:
    record = _episode()
    path = write_record(record, tmp_path, 0)
    [loaded] = load_records(path)
    np.testing.assert_array_equal(loaded.observations, record.observations)
    assert loaded.episode_return == 6.0 and loaded.format_version == RECORD_FORMAT_VERSION
    steps = list(loaded)
    assert [step.reward for step in steps] == [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(steps[0].next_observation, steps[1].observation)
    assert [step.terminated for step in steps] == [False, False, True]
    assert not any(step.truncated for step in steps)
    assert [step.done for step in list(_episode(truncated=True))] == [False, False, True]


def test_dict_observations_are_columns() -> None:
    builder = EpisodeBuilder({"image": np.zeros((7, 7, 3), np.uint8), "direction": 0, "mission": "go to the ball"})
    builder.add(2, 0.0, {"image": np.ones((7, 7, 3), np.uint8), "direction": 1, "mission": "go to the ball"})
    record = builder.build(terminated=True, truncated=False, env_id="BabyAI-GoToLocal-v0", seed=0, policy="bot")
    assert record.observations["image"].shape == (2, 7, 7, 3)
    assert list(record.observations["mission"]) == ["go to the ball"] * 2
    assert list(record)[0].next_observation["direction"] == 1


def test_reader_names_unreadable_foreign_and_outdated_files(tmp_path: Path) -> None:
    (tmp_path / "corrupt.pkl").write_bytes(b"not a pickle")
    with pytest.raises(MazerunError, match="corrupt.pkl"):
        load_records(tmp_path / "corrupt.pkl")
    (tmp_path / "foreign.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(MazerunError, match="foreign.pkl holds a dict, not a StateTrajectoryRecord"):
        load_records(tmp_path / "foreign.pkl")
    old = _episode()
    old.format_version = 0
    path = write_record(old, tmp_path / "old", 0)
    with pytest.raises(MazerunError, match="record format version 0"):
        load_records(path)
    broken = _episode()
    broken.rewards = broken.rewards[:-1]
    with pytest.raises(MazerunError, match="2 rewards for 3 actions"):
        load_records(write_record(broken, tmp_path / "broken", 0))


def test_reader_rejects_empty_and_missing_directories(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MazerunError, match="no trajectory records"):
        load_records(tmp_path / "empty")
    with pytest.raises(MazerunError, match="does not exist"):
        load_records(tmp_path / "nowhere")


def test_reader_takes_a_list_of_sources(tmp_path: Path) -> None:
    write_record(_episode(), tmp_path / "a", 0)
    write_record(_episode(), tmp_path / "b", 0)
    assert len(load_records([tmp_path / "a", str(tmp_path / "b")])) == 2


def test_interrupted_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mazerun.data.records as records

    def explode(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(records.os, "replace", explode)
    with pytest.raises(KeyboardInterrupt):
        write_record(_episode(), tmp_path, 0)
    assert list(tmp_path.iterdir()) == []


def test_records_get_the_usual_file_permissions(tmp_path: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert (write_record(_episode(), tmp_path, 0).stat().st_mode & 0o777) == 0o666 & ~umask
