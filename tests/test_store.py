"""The columnar store: round trips to the records' tensors, the same batches as in memory, the runner
writing one, appending recordings, training on one through `run`, and every bad input in one line."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, newest_run_dir, run_cli, run_ok

from mazerun.acting.envs import env_spaces
from mazerun.core.errors import MazerunError
from mazerun.data.formats import write_hdf5
from mazerun.data.records import StateTrajectoryRecord
from mazerun.data.store import INDEX_FILE, ColumnarStore, StoreDataset, StoreWriter, store_split
from mazerun.data.tensors import BatchSampler, SequenceSampler, observation_stats, records_to_dataset, split_by_episode
from mazerun.datasets import write_store
from mazerun.training.metrics import read_metrics_csv

QUICK = ["algorithm.n_updates=20", "algorithm.eval_every=10", "runner.eval_repeats=1", "runner.max_episode_steps=40",
         "model.hidden_sizes=[16]", "algorithm.batch_size=32", "device=cpu"]
FIELDS = ("observations", "actions", "rewards", "next_observations", "dones")


def episode(steps: int, *, seed: int, terminated: bool = True, continuous: bool = False,
            labels: bool = False) -> StateTrajectoryRecord:
    rng = np.random.default_rng(seed)
    actions = rng.normal(size=(steps, 2)).astype(np.float32) if continuous else rng.integers(0, 4, steps)
    return StateTrajectoryRecord(
        observations=rng.normal(size=(steps + 1, 8)).astype(np.float32), actions=actions,
        rewards=rng.normal(size=steps), terminated=terminated, truncated=not terminated,
        env_id="LunarLanderContinuous-v3" if continuous else "LunarLander-v3", seed=seed, policy=f"hand{seed % 2}",
        expert_actions=rng.integers(0, 4, steps) if labels else None,
    )


def stored(records: list[StateTrajectoryRecord], path: Path) -> ColumnarStore:
    with StoreWriter(path, env_spaces) as writer:
        for record in records:
            writer.add(record)
    return ColumnarStore.open(path)


RECORDS = [episode(length, seed=seed, terminated=seed % 3 != 1) for seed, length in enumerate([5, 3, 1, 7, 2, 9, 4])]


def same(first, second) -> bool:
    if first is None or second is None:
        return first is None and second is None
    return first.dtype == second.dtype and torch.equal(first, second)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["discrete", "continuous", "labelled"])
def test_records_to_store_give_the_same_tensors_and_come_back_as_the_same_records(tmp_path: Path, kind: str) -> None:
    records = [episode(length, seed=seed, terminated=seed % 2 == 0, continuous=kind == "continuous",
                       labels=kind == "labelled") for seed, length in enumerate([4, 1, 6, 3])]
    store = stored(records, tmp_path / "data.store")
    data, reference = StoreDataset(store, range(store.n_episodes)), records_to_dataset(records)
    every = torch.arange(len(reference))
    assert len(data) == len(reference) == 14
    for name in (*FIELDS, "expert_actions"):
        column = getattr(data, name)
        assert same(None if column is None else column.index_select(0, every), getattr(reference, name)), name
    assert same(data.episode_starts.index_select(0, every), reference.episode_starts)
    for back, original in zip(store.records(), records):
        assert back.env_id == original.env_id and back.seed == original.seed and back.policy == original.policy
        assert (back.terminated, back.truncated) == (original.terminated, original.truncated)
        for name in ("observations", "actions", "rewards", "expert_actions"):
            ours, theirs = getattr(back, name), getattr(original, name)
            assert (ours is None and theirs is None) or (ours.dtype == theirs.dtype and np.array_equal(ours, theirs))


def test_store_batches_equal_in_memory_batches_for_the_same_seed_with_a_validation_split(tmp_path: Path) -> None:
    store = stored(RECORDS, tmp_path / "data.store")
    train_records, validation_records = split_by_episode(RECORDS, 30, seed=5)
    train, validation = store_split(store, 30, seed=5, device="cpu")
    assert len(validation.episodes) == len(validation_records) == 2
    for ours, theirs in ((train, records_to_dataset(train_records)), (validation, records_to_dataset(validation_records))):
        transitions, reference = BatchSampler(ours, 6, seed=11), BatchSampler(theirs, 6, seed=11)
        for _ in range(4):
            for mine, expected in zip(transitions.sample(), reference.sample()):
                assert same(mine, expected)
        for mine, expected in zip(transitions.epoch(shuffle=False), reference.epoch(shuffle=False)):
            assert all(same(a, b) for a, b in zip(mine, expected))
        sequences = SequenceSampler(ours, 3, 4, burn_in=2, seed=3)
        reference_sequences = SequenceSampler(theirs, 3, 4, burn_in=2, seed=3)
        for _ in range(4):
            for mine, expected in zip(sequences.sample(), reference_sequences.sample()):
                assert same(mine, expected)
        mean, std = ours.observation_stats()
        expected_mean, expected_std = observation_stats(theirs.observations)
        assert torch.allclose(mean, expected_mean, atol=1e-7) and torch.allclose(std, expected_std, atol=1e-7)


def test_convert_appends_and_reads_every_format_into_one_store(tmp_path: Path) -> None:
    pickles = tmp_path / "trajectory_data"
    from mazerun.data.records import write_record

    for index, record in enumerate(RECORDS[:4]):
        write_record(record, pickles, index)
    write_hdf5(RECORDS[4:], tmp_path / "rest.h5")
    command = [sys.executable, "-m", "mazerun.datasets"]
    first = subprocess.run([*command, "convert", str(pickles), str(tmp_path / "a.store")], capture_output=True,
                           text=True, cwd=REPO, check=True)
    assert "wrote 4 episodes" in first.stdout
    subprocess.run([*command, "append", str(tmp_path / "rest.h5"), str(tmp_path / "a.store")], capture_output=True,
                   text=True, cwd=REPO, check=True)
    whole = write_store([str(tmp_path / "a.store")], tmp_path / "copy.store")  # a store is a source too
    assert "7 episodes" in whole
    store = ColumnarStore.open(tmp_path / "copy.store")
    assert [len(record) for record in store.records()] == [len(record) for record in RECORDS]
    reference = records_to_dataset(RECORDS)
    data = StoreDataset(store, range(7))
    for name in FIELDS:
        assert same(getattr(data, name).index_select(0, torch.arange(len(reference))), getattr(reference, name))
    info = subprocess.run([*command, "info", str(tmp_path / "copy.store")], capture_output=True, text=True, cwd=REPO)
    assert "version 1" in info.stdout and "7 episodes" in info.stdout and info.returncode == 0


# -- the runner writes one; a sweep's recordings become one; training reads one ---------------


def test_the_parallel_runner_writes_the_store_its_pickles_convert_to_and_a_sweep_appends_into_one(workdir: Path) -> None:
    run_ok("-m", "runner.seed=0,100", "runner.n_episodes=3", "runner.n_workers=2", "runner.max_episode_steps=40",
           "runner.store=columnar", "hydra.sweep.dir=sweep", cwd=workdir)
    for job in ("0", "1"):
        write_store([str(workdir / "sweep" / job / "trajectory_data")], workdir / f"converted{job}")
        ours, converted = ColumnarStore.open(workdir / "sweep" / job / "trajectory_store"), ColumnarStore.open(
            workdir / f"converted{job}")
        assert ours.index == converted.index
        for name in ours.columns:
            assert np.array_equal(ours.columns[name], converted.columns[name]), name
    write_store([str(workdir / "sweep" / "0" / "trajectory_store")], workdir / "sweep.store")
    write_store([str(workdir / "sweep" / "1" / "trajectory_store")], workdir / "sweep.store", append=True)
    together = ColumnarStore.open(workdir / "sweep.store")
    assert together.n_episodes == 6
    assert [int(seed) for seed in together.columns["episode_seed"]] == [0, 1, 2, 100, 101, 102]


def test_training_on_a_store_logs_what_training_on_its_pickles_logs(workdir: Path) -> None:
    run_ok("runner.n_episodes=4", "runner.max_episode_steps=40", "runner=sequential", "runner.store=columnar",
           "hydra.run.dir=recorded", cwd=workdir)
    recorded = workdir / "recorded"
    for name, source in (("store", "trajectory_store"), ("pickles", "trajectory_data")):
        run_ok("-cn", "conf_train", f"runner.dataset.dir_or_file={recorded / source}", "algorithm.validation_percentage=25",
               *QUICK, f"hydra.run.dir={name}", cwd=workdir)
    assert "memory-mapped from" in (workdir / "store" / "run.log").read_text()
    assert read_metrics_csv(workdir / "store" / "metrics.csv") == read_metrics_csv(workdir / "pickles" / "metrics.csv")


def test_a_recording_with_only_a_store_is_the_newest_recording_cql_trains_on(workdir: Path) -> None:
    run_ok("runner.n_episodes=2", "runner.max_episode_steps=40", "runner=sequential", "runner.store=columnar",
           "runner.record_trajectory=false", cwd=workdir)
    recording = newest_run_dir(workdir)
    assert not (recording / "trajectory_data").exists() and (recording / "trajectory_store" / INDEX_FILE).is_file()
    result = run_ok("algorithm=cql", *QUICK, cwd=workdir)
    assert "trajectory_store" in result.stderr and "memory-mapped" in result.stderr


# -- bad input: one line, nothing half-written ------------------------------------------------


def one_line(result: subprocess.CompletedProcess, message: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def test_a_store_whose_columns_disagree_in_length_is_refused_in_one_line(workdir: Path) -> None:
    stored(RECORDS, workdir / "data.store")
    with open(workdir / "data.store" / "rewards.bin", "r+b") as handle:
        handle.truncate(8 * 20)
    result = run_cli("-cn", "conf_train", f"runner.dataset.dir_or_file={workdir / 'data.store'}", *QUICK, cwd=workdir)
    line = one_line(result, "rewards.bin holds 20 rows and the index says 31")
    assert "disagree in length" in line
    assert not (newest_run_dir(workdir) / "last.pt").exists()


def test_a_store_of_an_unknown_format_version_is_refused_in_one_line(workdir: Path) -> None:
    stored(RECORDS, workdir / "data.store")
    index = json.loads((workdir / "data.store" / INDEX_FILE).read_text())
    (workdir / "data.store" / INDEX_FILE).write_text(json.dumps({**index, "version": 7}))
    result = run_cli("-cn", "conf_train", f"runner.dataset.dir_or_file={workdir / 'data.store'}", *QUICK, cwd=workdir)
    one_line(result, "has format version 7 and this mazerun reads version 1")


def _limited_file_size(limit: int):
    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_files


def test_a_full_disk_leaves_no_store_and_an_append_that_fills_it_is_cut_back(tmp_path: Path) -> None:
    from mazerun.data.records import write_record

    big = [episode(400, seed=seed) for seed in range(3)]  # 401 x 32 bytes of observations each
    for index, record in enumerate(big):
        write_record(record, tmp_path / "big", index)
    command = [sys.executable, "-m", "mazerun.datasets"]
    full = subprocess.run([*command, "convert", str(tmp_path / "big"), str(tmp_path / "new.store")], cwd=REPO,
                          capture_output=True, text=True, preexec_fn=_limited_file_size(30_000))
    one_line(full, "cannot write")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["big"]  # no store, no scratch directory

    stored(RECORDS, tmp_path / "small.store")
    before = {path.name: path.read_bytes() for path in (tmp_path / "small.store").iterdir()}
    appended = subprocess.run([*command, "append", str(tmp_path / "big"), str(tmp_path / "small.store")], cwd=REPO,
                              capture_output=True, text=True, preexec_fn=_limited_file_size(30_000))
    one_line(appended, "cannot write")
    assert {path.name: path.read_bytes() for path in (tmp_path / "small.store").iterdir()} == before
    assert ColumnarStore.open(tmp_path / "small.store").n_episodes == len(RECORDS)


def test_dict_observations_mixed_envs_and_a_store_among_other_sources_are_refused(workdir: Path) -> None:
    minigrid = StateTrajectoryRecord(
        observations={"image": np.zeros((3, 7, 7, 3), np.uint8), "direction": np.zeros(3, np.int64),
                      "mission": np.array(["go"] * 3)},
        actions=np.zeros(2, np.int64), rewards=np.zeros(2), terminated=True, truncated=False,
        env_id="BabyAI-GoToLocal-v0", seed=0, policy="bot")
    with pytest.raises(MazerunError, match="vector observations only; train MiniGrid and BabyAI from trajectory_data"):
        stored([minigrid], workdir / "grid.store")
    with pytest.raises(MazerunError, match="a store holds the episodes of one environment"):
        stored([RECORDS[0], episode(3, seed=9, continuous=True)], workdir / "mixed.store")
    assert not any(workdir.iterdir())
    stored(RECORDS, workdir / "data.store")
    result = run_cli("-cn", "conf_train", f"runner.dataset.dir_or_file=[{workdir / 'data.store'},{workdir}]",
                     *QUICK, cwd=workdir)
    one_line(result, "trains alone (memory-mapped)")


def test_a_store_of_another_env_and_an_unknown_runner_store_are_one_line(workdir: Path) -> None:
    stored(RECORDS, workdir / "data.store")
    result = run_cli("-cn", "conf_train", "env=CartPole-v1", f"runner.dataset.dir_or_file={workdir / 'data.store'}",
                     *QUICK, cwd=workdir)
    one_line(result, "differs from LunarLander-v3 of the store")
    one_line(run_cli("runner.store=parquet", cwd=workdir), "runner.store='parquet' is unknown")
    assert os.listdir(workdir / "outputs")  # the runs' logs, and nothing else written by them
    assert not list((workdir / "outputs").glob("*/*/trajectory_*"))
