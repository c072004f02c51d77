"""Hostile data files, through the real CLI: each is refused in one `error:` line (exit 2, no traceback),
bounded in memory and time, and leaves every input file as it was."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, run_cli

from mazerun.acting.envs import env_spaces, make_env
from mazerun.core.errors import MazerunError
from mazerun.data.formats import write_hdf5, write_minari
from mazerun.data.records import StateTrajectoryRecord, write_record
from mazerun.data.store import INDEX_FILE, StoreWriter

TINY = ["algorithm=bc", "algorithm.n_updates=2", "algorithm.eval_every=2", "algorithm.batch_size=8",
        "algorithm.validation_percentage=0", "runner.eval_repeats=1", "runner.max_episode_steps=20",
        "model.hidden_sizes=[8]", "device=cpu"]


def episode(steps: int, seed: int, **fields) -> StateTrajectoryRecord:
    """A short LunarLander-v3 episode of random (in-range) values; ``fields`` replace any of them."""
    rng = np.random.default_rng(seed)
    values = dict(observations=rng.uniform(-1, 1, (steps + 1, 8)).astype(np.float32),
                  actions=rng.integers(0, 4, steps), rewards=rng.normal(size=steps), terminated=True,
                  truncated=False, env_id="LunarLander-v3", seed=seed, policy="hand")
    return StateTrajectoryRecord(**{**values, **fields})


def recorded(directory: Path, *records: StateTrajectoryRecord) -> Path:
    for index, record in enumerate(records or [episode(6, 0), episode(4, 1), episode(5, 2)]):
        write_record(record, directory, index)
    return directory


def store_of(path: Path, *records: StateTrajectoryRecord) -> Path:
    with StoreWriter(path, env_spaces) as writer:
        for record in records or [episode(6, 0), episode(4, 1), episode(5, 2)]:
            writer.add(record)
    return path


def one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def train_on(source: Path | str, workdir: Path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("-cn", "conf_train", *TINY, f"runner.dataset.dir_or_file={source}", *overrides, cwd=workdir,
                   timeout=timeout)


def datasets_cli(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mazerun.datasets", *arguments], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for root in roots for path in sorted(root.rglob("*")) if path.is_file()}


# -- 1. a tiny record cannot allocate gigabytes; only regular files are read ------------------


class _Declares:
    """Pickles as a call of an allowed global (numpy's own array constructor) with huge arguments."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def huge_record(path: Path) -> Path:
    record = episode(2, 0)
    record.observations = _Declares(np.ndarray, (20_000_000, 8), "f8")  # 1.28 GB of zeros that pass every check
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(record, protocol=4))
    return path


MAXRSS = """
import resource, sys
from mazerun.core.errors import MazerunError
from mazerun.data.records import load_records
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # after the imports (torch among them)
try:
    load_records(sys.argv[1])
    print("loaded")
except MazerunError as error:
    print("error:", error)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_a_small_record_declaring_a_huge_array_is_refused_with_memory_bounded_by_its_size(workdir: Path) -> None:
    path = huge_record(workdir / "data" / "episode_00000000.pkl")
    assert path.stat().st_size < 1000
    measured = subprocess.run([sys.executable, "-c", MAXRSS, str(path)], capture_output=True, text=True, timeout=120)
    imported, verdict, maxrss = measured.stdout.strip().splitlines()
    assert verdict.startswith("error: refusing to load") and "(20000000, 8)" in verdict, measured.stdout
    grown = int(maxrss) - int(imported)
    assert grown < 32 * 2**20, f"loading a {path.stat().st_size}-byte record took {grown >> 20} MiB"
    one_line(train_on(workdir / "data", workdir), "episode_00000000.pkl", "more than its own bytes can carry",
             "record the episodes again")


def test_a_fifo_and_a_symlink_to_dev_zero_are_refused_promptly(workdir: Path) -> None:
    os.mkfifo(workdir / "episode_00000000.pkl")
    (workdir / "zero").mkdir()
    (workdir / "zero" / "episode_00000000.pkl").symlink_to("/dev/zero")
    one_line(train_on(workdir / "episode_00000000.pkl", workdir, timeout=60), "is not a regular file (a FIFO)")
    one_line(train_on(workdir / "zero", workdir, timeout=60), "is not a regular file (a character device)")


# -- 4. stores cannot be poisoned, and a damaged store is named by column and row ------------


def test_append_refuses_an_out_of_range_action_before_writing_anything(workdir: Path) -> None:
    store = store_of(workdir / "data.store")
    bad = recorded(workdir / "bad", episode(3, 5), episode(3, 6, actions=np.array([0, 9, 1])))
    before = snapshot(store, bad)
    result = datasets_cli("append", str(bad), str(store))
    one_line(result, "episode_00000001.pkl", "actions contain 9, outside Discrete(4), at step 1", "leave that episode out")
    assert snapshot(store, bad) == before


def test_a_store_with_an_out_of_range_action_or_a_nan_is_named_by_column_and_row(workdir: Path) -> None:
    for name, damage, message in (("actions", 9, "actions contain 9, outside Discrete(4), at row 7"),
                                  ("observations", np.nan, "observations hold NaN or infinite values (first at row 3)")):
        store = store_of(workdir / f"{name}.store")
        spec = json.loads((store / INDEX_FILE).read_text())["columns"][name]
        column = np.memmap(store / f"{name}.bin", dtype=spec["dtype"], mode="r+")
        column[7 if name == "actions" else 3 * 8 + 2] = damage
        column.flush()
        del column
        one_line(train_on(store, workdir), f"store {store}", f"column {name}.bin", message, "convert the records again")


# -- 5. a damaged HDF5 or Minari file ------------------------------------------------------


def test_an_empty_hdf5_file_and_a_truncated_minari_dataset_say_how_to_export_again(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (workdir / "empty.h5").write_bytes(b"")
    one_line(train_on(workdir / "empty.h5", workdir), "empty.h5 is not readable HDF5", "python -m mazerun.datasets export")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(workdir / "minari"))  # the runs below inherit it
    write_minari([episode(6, 0), episode(4, 1)], "mazerun/hostile-v0", make_env("LunarLander-v3"))
    data = workdir / "minari" / "mazerun" / "hostile-v0" / "data" / "main_data.hdf5"
    data.write_bytes(data.read_bytes()[:2000])
    line = one_line(train_on("minari:mazerun/hostile-v0", workdir), "main_data.hdf5 is not readable HDF5",
                    "export it again")
    assert "hydra.run.dir" not in line


# -- 7. sizes that cannot fit -------------------------------------------------------------------


@pytest.mark.parametrize("overrides, fragments", [
    (["algorithm.batch_size=10000000000"], ["algorithm.batch_size=10000000000 needs about", "GiB of memory available"]),
    (["model.hidden_sizes=[100000,100000]"], ["model.hidden_sizes=[100000, 100000] has about", "GiB of memory available"]),
    (["algorithm=ppo", "runner.n_envs=100000", "algorithm.total_steps=2048"],
     ["1024 * 100000 = 102,400,000 steps is more than 64 times algorithm.total_steps=2048", "runner.n_envs=128"]),
])
def test_sizes_that_cannot_fit_are_refused_before_allocating(workdir: Path, overrides: list[str],
                                                             fragments: list[str]) -> None:
    ppo = "algorithm=ppo" in overrides  # learns in the env: no dataset, and its own keys
    result = run_cli(*overrides, cwd=workdir) if ppo else train_on(recorded(workdir / "data"), workdir, *overrides)
    one_line(result, *fragments)
    assert not list((workdir / "outputs").glob("*/*/*.pt"))


def test_a_batch_larger_than_the_dataset_is_clamped_with_one_line_saying_so(workdir: Path) -> None:
    result = train_on(recorded(workdir / "data"), workdir, "algorithm.batch_size=100000")
    assert result.returncode == 0, result.stderr
    said = [line for line in (result.stdout + result.stderr).splitlines()
            if "batch_size=100000 is more than the 15 transitions of the dataset; drawing batches of 15" in line]
    assert len(said) == 1, result.stdout + result.stderr


# -- 8. wrong types ------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, fragments", [
    ({"terminated": "yes"}, ["terminated is str 'yes', expected True or False"]),
    ({"truncated": np.zeros(3, bool)}, ["truncated is an array of shape (3,) and dtype bool, expected True or False"]),
    ({"rewards": np.array(["1.0", "2.0", "0.5"])}, ["rewards have dtype <U3, expected numbers"]),
])
def test_records_of_wrong_types_are_refused_naming_file_and_field(workdir: Path, fields: dict,
                                                                  fragments: list[str]) -> None:
    data = recorded(workdir / "data", episode(4, 0), episode(3, 1, **fields))
    one_line(train_on(data, workdir, "algorithm=cql"), "episode_00000001.pkl", *fragments)


def test_hdf5_observations_far_outside_the_box_and_swapped_store_lengths_are_refused(workdir: Path) -> None:
    far = episode(5, 0)
    far.observations[2, 3] = 1e6
    write_hdf5([episode(4, 1), far], workdir / "far.h5")
    one_line(train_on(workdir / "far.h5", workdir), "observations hold 1e+06 at step 2, far outside Box(shape (8,)",
             "record them again")
    store = store_of(workdir / "swapped.store")
    lengths = np.fromfile(store / "episode_length.bin", dtype=np.int64)
    lengths[[0, 1]] = lengths[[1, 0]]
    lengths.tofile(store / "episode_length.bin")
    one_line(train_on(store, workdir), f"store {store}", "episode lengths reordered or edited", "convert the records again")


def test_hdf5_flags_that_are_not_zero_or_one_are_refused(tmp_path: Path) -> None:
    from mazerun.data.formats import read_hdf5

    path = tmp_path / "flags.h5"
    with h5py.File(path, "w") as file:
        file["observations"], file["actions"] = np.zeros((3, 8)), np.zeros(3, np.int64)
        file["rewards"], file["terminals"] = np.zeros(3), np.array([0, 7, 1])
    with pytest.raises(MazerunError, match=r"dataset terminals holds 7 at row 1, expected 0 or 1"):
        read_hdf5(path, "LunarLander-v3")


# -- 9. every error is one line ------------------------------------------------------------------


def test_errors_that_name_a_box_or_an_array_stay_on_one_line(workdir: Path) -> None:
    narrow = episode(3, 0, observations=np.zeros((4, 4), np.float32))
    line = one_line(train_on(recorded(workdir / "data", narrow), workdir), "shape (4,) per step, expected (8,)",
                    "Box(shape (8,), float32")
    assert "\n" not in line
    assert str(MazerunError(f"bad {np.arange(40.0)}")).count("\n") == 0
