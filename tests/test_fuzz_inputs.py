"""Fuzzed data files: records, store columns and index.json, HDF5 and Minari files with flipped bytes, cut
short, with fields of other values and types, or declaring huge shapes.

Every load either works or ends in one :class:`MazerunError` (one `error:` line in the CLI), and no input
file changes. Most examples call the loaders in-process (a CLI start costs seconds); a handful run the
real `run` and `python -m mazerun.datasets append`. Examples are few and derandomized, so the test is
deterministic and takes well under two minutes on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from conftest import REPO, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mazerun.acting.envs import env_spaces, make_env
from mazerun.core.errors import MazerunError
from mazerun.data.formats import read_hdf5, read_minari, write_hdf5, write_minari
from mazerun.data.records import StateTrajectoryRecord, load_records, write_record
from mazerun.data.store import INDEX_FILE, ColumnarStore, StoreDataset, StoreWriter
from mazerun.data.tensors import BatchSampler, check_records_match_spaces, records_to_dataset

FUZZ = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ENV = make_env("LunarLander-v3")
SPACES = (ENV.observation_space, ENV.action_space)
ENV.close()


def episode(steps: int, seed: int) -> StateTrajectoryRecord:
    rng = np.random.default_rng(seed)
    return StateTrajectoryRecord(
        observations=rng.uniform(-1, 1, (steps + 1, 8)).astype(np.float32), actions=rng.integers(0, 4, steps),
        rewards=rng.normal(size=steps), terminated=seed % 2 == 0, truncated=seed % 2 == 1,
        env_id="LunarLander-v3", seed=seed, policy="hand")


EPISODES = [episode(6, 0), episode(4, 1), episode(5, 2)]

# -- mutations -----------------------------------------------------------------------------------

flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8)
cuts = st.floats(0, 1, exclude_max=True)
mutations = st.one_of(st.tuples(st.just("flip"), flips), st.tuples(st.just("cut"), cuts))


def mutate(data: bytes, mutation: tuple[str, Any]) -> bytes:
    kind, how = mutation
    if kind == "cut":
        return data[:int(len(data) * how)]
    mutated = bytearray(data)
    for where, mask in how:
        mutated[int(where * len(mutated))] ^= mask
    return bytes(mutated)


values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=True), st.text(max_size=5),
    st.lists(st.integers(-5, 5), max_size=4), st.just(np.array(["a", "b"])), st.just(np.full(3, np.nan)),
    st.just(np.zeros((2, 2, 2))), st.just(np.array([1e30, -1e30])), st.just({"x": np.zeros(2)}),
)


def hashes(root: Path) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def loads_or_refuses(root: Path, load: Callable[[], Any]) -> None:
    """``load`` either returns records (that then train: tensors and a batch) or raises one MazerunError;
    nothing under ``root`` changes."""
    before = hashes(root)
    try:
        records = load()
        if records is not None:
            check_records_match_spaces(records, *SPACES)
            data = records_to_dataset(records)
            BatchSampler(data, min(4, len(data)), seed=0).sample()
    except MazerunError as error:
        assert "\n" not in str(error)
    assert hashes(root) == before


# -- records ---------------------------------------------------------------------------------------


@FUZZ
@given(mutation=mutations)
def test_mutated_record_bytes_load_or_are_refused(mutation: tuple[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        path = write_record(EPISODES[0], root, 0)
        path.write_bytes(mutate(path.read_bytes(), mutation))
        loads_or_refuses(root, lambda: load_records(root))


@FUZZ
@given(field=st.sampled_from(["observations", "actions", "rewards", "terminated", "truncated", "env_id",
                              "expert_actions", "format_version", "seed"]), value=values)
def test_records_with_fields_of_other_values_and_types_load_or_are_refused(field: str, value: Any) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        record = episode(4, 3)
        setattr(record, field, value)
        (root / "episode_00000000.pkl").write_bytes(pickle.dumps(record))
        loads_or_refuses(root, lambda: load_records(root))


class _Calls:
    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple:
        return self.function, self.args


@FUZZ
@given(rows=st.integers(10**6, 10**12), constructor=st.sampled_from(["ndarray", "bytearray", "setstate"]))
def test_records_declaring_huge_shapes_are_refused_before_allocating(rows: int, constructor: str) -> None:
    declared = {"ndarray": _Calls(np.ndarray, (rows, 8), "f8"), "bytearray": _Calls(bytearray, rows),
                "setstate": _Huge(rows)}[constructor]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        record = episode(2, 0)
        record.observations = declared
        (root / "episode_00000000.pkl").write_bytes(pickle.dumps(record, protocol=4))
        with pytest.raises(MazerunError, match="more than its own bytes can carry"):
            load_records(root)


class _Huge:
    """An array pickled by numpy's own protocol (``_reconstruct`` then ``__setstate__``) with a shape of ``rows`` rows."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __reduce__(self) -> tuple:
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (self.rows, 8), np.dtype("f8"), False, b"")


# -- stores ----------------------------------------------------------------------------------------


def build_store(path: Path) -> Path:
    with StoreWriter(path, env_spaces) as writer:
        for record in EPISODES:
            writer.add(record)
    return path


STORE_FILES = ["observations.bin", "actions.bin", "rewards.bin", "episode_length.bin", "episode_terminated.bin",
               "episode_policy.bin", INDEX_FILE]


def open_and_sample(path: Path) -> None:
    store = ColumnarStore.open(path)
    store.check_spaces(*SPACES)
    data = StoreDataset(store, range(store.n_episodes))
    BatchSampler(data, min(4, len(data)), seed=0).sample()
    data.observation_stats()


@FUZZ
@given(file=st.sampled_from(STORE_FILES), mutation=mutations)
def test_mutated_store_files_open_or_are_refused(file: str, mutation: tuple[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        store = build_store(Path(scratch) / "data.store")
        (store / file).write_bytes(mutate((store / file).read_bytes(), mutation))
        loads_or_refuses(store, lambda: open_and_sample(store))


@FUZZ
@given(key=st.sampled_from(["episodes", "transitions", "env_id", "policies", "columns", "version", "action_range"]),
       value=st.one_of(st.none(), st.integers(-10, 10**12), st.text(max_size=4), st.lists(st.integers(-3, 3), max_size=3),
                       st.just({"observations": {"dtype": "<f4", "shape": [10**9]}})))
def test_store_index_fields_of_other_values_open_or_are_refused(key: str, value: Any) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        store = build_store(Path(scratch) / "data.store")
        index = json.loads((store / INDEX_FILE).read_text())
        (store / INDEX_FILE).write_text(json.dumps({**index, key: value}))
        loads_or_refuses(store, lambda: open_and_sample(store))


# -- HDF5 and Minari -------------------------------------------------------------------------------


@FUZZ
@given(mutation=mutations)
def test_mutated_hdf5_files_read_or_are_refused(mutation: tuple[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "data.h5"
        write_hdf5(EPISODES, path)
        path.write_bytes(mutate(path.read_bytes(), mutation))
        loads_or_refuses(Path(scratch), lambda: read_hdf5(path))


@settings(FUZZ, max_examples=6)
@given(mutation=mutations)
def test_mutated_minari_datasets_read_or_are_refused(mutation: tuple[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MINARI_DATASETS_PATH"] = scratch
        try:
            write_minari(EPISODES, "fuzz/lunar-v0", make_env(EPISODES[0].env_id))
            data = Path(scratch) / "fuzz" / "lunar-v0" / "data" / "main_data.hdf5"
            data.write_bytes(mutate(data.read_bytes(), mutation))
            loads_or_refuses(Path(scratch), lambda: read_minari("fuzz/lunar-v0"))
        finally:
            del os.environ["MINARI_DATASETS_PATH"]


# -- a handful through the real CLI -------------------------------------------------------------


def exits_cleanly(result: subprocess.CompletedProcess) -> None:
    """Exit 0, or exactly one `error:` line with exit 2 and no traceback."""
    if result.returncode == 0:
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


CLI_CASES = [("record", ("flip", [(0.5, 0xFF), (0.7, 0x10)])), ("record", ("cut", 0.6)),
             ("store", ("flip", [(0.0, 0x07)])), ("hdf5", ("cut", 0.8))]


@pytest.mark.parametrize("kind, mutation", CLI_CASES)
def test_mutated_files_through_run_and_append_exit_cleanly(workdir: Path, kind: str, mutation: tuple[str, Any]) -> None:
    inputs = workdir / "inputs"
    if kind == "record":
        for index, record in enumerate(EPISODES):
            write_record(record, inputs, index)
        target, source = inputs / "episode_00000001.pkl", inputs
    elif kind == "store":
        source = build_store(inputs / "data.store")
        target = source / "episode_length.bin"
    else:
        source = target = inputs / "data.h5"
        inputs.mkdir()
        write_hdf5(EPISODES, target)
    target.write_bytes(mutate(target.read_bytes(), mutation))
    good = build_store(workdir / "good.store")
    before = hashes(inputs)
    good_before = hashes(good)
    exits_cleanly(run_cli("-cn", "conf_train", "algorithm=bc", "algorithm.n_updates=2", "algorithm.eval_every=2",
                          "algorithm.batch_size=4", "runner.eval_repeats=1", "runner.max_episode_steps=10",
                          "model.hidden_sizes=[8]", "device=cpu", f"runner.dataset.dir_or_file={source}", cwd=workdir))
    appended = subprocess.run([sys.executable, "-m", "mazerun.datasets", "append", str(source), str(good)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    exits_cleanly(appended)
    assert hashes(inputs) == before
    if appended.returncode != 0:
        assert hashes(good) == good_before
