"""Nothing lost, nothing executed: safe records, exact resume, signals, NaN, full disks, shared run dirs, typos."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import signal
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import DATASETS, newest_run_dir, run_cli, run_ok, spawn_cli

from mazerun.acting.rollout import rollout
from mazerun.algorithms.bc import BCConfig
from mazerun.algorithms.cql import CQLConfig
from mazerun.config.schemas import DatasetConfig, PolicyConfig, RunConfig, RunnerConfig
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.core.files import BackgroundFlusher, atomic_write_bytes
from mazerun.data.records import STATS_FILE, load_records, write_record
from mazerun.nn.checkpoint import load_checkpoint, space_to_dict
from mazerun.training.metrics import read_metrics_csv
from mazerun.training.train import train

QUICK = ["algorithm.eval_every=20", "runner.eval_repeats=1", "runner.max_episode_steps=50", "model.hidden_sizes=[16,16]"]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("expert")
    rollout("LunarLander-v3", PolicyConfig(epsilon=0.2), RunnerConfig(type="sequential", n_episodes=4, max_episode_steps=120),
            directory, print_fn=lambda _: None)
    return directory / "trajectory_data"


def one_line_error(result, message: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


# ------------------------------------------------------------------------------------ 1. records


class _CreatesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_record_that_would_run_code_is_refused_and_runs_nothing(workdir: Path) -> None:
    (workdir / "data").mkdir()
    planted = workdir / "planted"
    (workdir / "data" / "episode_00000000.pkl").write_bytes(pickle.dumps(_CreatesAFile(str(planted))))
    result = run_cli("-cn", "conf_train", f"runner.dataset.dir_or_file={workdir / 'data'}", cwd=workdir)
    line = one_line_error(result, "refusing to load")
    assert "episode_00000000.pkl" in line and "system" in line
    assert not planted.exists()


def test_records_written_by_earlier_versions_still_load(tmp_path: Path) -> None:
    """A uuid-named pickle of the record class as mazerun 0.1 wrote it (no expert_actions field)."""
    episode = {"observations": np.zeros((3, 8), np.float32), "actions": np.array([0, 1]), "rewards": np.array([1.0, 2.0]),
               "terminated": True, "truncated": False, "env_id": "LunarLander-v3", "seed": 4, "policy": "heuristic",
               "format_version": 1, "id": "1c0ffee0-0000-4000-8000-000000000000"}
    from mazerun.data.records import StateTrajectoryRecord

    old = StateTrajectoryRecord.__new__(StateTrajectoryRecord)
    old.__dict__.update(episode)
    (tmp_path / "1c0ffee0-0000-4000-8000-000000000000.pkl").write_bytes(pickle.dumps(old, protocol=4))
    (loaded,) = load_records(tmp_path)
    assert loaded.expert_actions is None and loaded.episode_return == 3.0 and len(loaded) == 2


def test_nan_in_records_is_refused_naming_the_record(workdir: Path, records: Path) -> None:
    episode = load_records(records)[0]
    episode.rewards = episode.rewards.copy()
    episode.rewards[3] = np.nan
    write_record(episode, workdir / "bad", 0)
    result = run_cli("-cn", "conf_train", f"runner.dataset.dir_or_file={workdir / 'bad'}", *QUICK, cwd=workdir)
    one_line_error(result, "rewards hold NaN or infinite values (first at step 3)")


# --------------------------------------------------------------------------- 2. exact resume, offline


def offline_config(algorithm, records: Path, input_dir: Path | None = None) -> RunConfig:
    return RunConfig(algorithm=algorithm, runner=RunnerConfig(dataset=DatasetConfig(dir_or_file=str(records)),
                                                              eval_repeats=1, max_episode_steps=40),
                     input_dir=None if input_dir is None else str(input_dir), model={"hidden_sizes": [16, 16]},
                     device="cpu")


def test_split_by_ctrl_c_and_continued_equals_uninterrupted(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offline loop's part of a continued run: its sampler, the validation split, the report window in
    progress. One algorithm suffices, with a target copy every 7 updates across the stop; every algorithm's own
    state is tests/test_algorithm_protocol.py's."""

    def make() -> CQLConfig:  # a fresh config for each run
        return CQLConfig(n_updates=60, eval_every=20, batch_size=32, target_update_interval=7, validation_percentage=25)

    train(offline_config(make(), records), tmp_path / "whole")
    check, calls = interrupts.check, {"n": 0}

    def stop_before_update_34() -> None:  # where Ctrl-C lands: the loop's check before an update
        calls["n"] += 1
        if calls["n"] == 34:  # mid-window: the window's sums travel in last.pt too
            raise KeyboardInterrupt
        check()

    monkeypatch.setattr(interrupts, "check", stop_before_update_34)
    with pytest.raises(KeyboardInterrupt, match="at update 33; .*last.pt holds update 33"):
        train(offline_config(make(), records), tmp_path / "stopped")
    monkeypatch.setattr(interrupts, "check", check)
    train(offline_config(make(), records, input_dir=tmp_path / "stopped"), tmp_path / "continued")

    whole, continued = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "continued" / "last.pt")
    assert continued.extra["step"] == 60
    for name, value in whole.model_state.items():
        assert torch.equal(value, continued.model_state[name]), name
    for name, state in whole.extra["training_state"]["algorithm"].items():
        if isinstance(state, dict) and "state" in state:  # the optimiser's moments
            for key, moments in state["state"].items():
                assert torch.equal(moments["exp_avg"], continued.extra["training_state"]["algorithm"][name]["state"][key]["exp_avg"])
    assert read_metrics_csv(tmp_path / "continued" / "metrics.csv") == read_metrics_csv(tmp_path / "whole" / "metrics.csv")


def test_budgets_are_totals_and_a_finished_run_says_how_to_go_on(records: Path, tmp_path: Path) -> None:
    algorithm = BCConfig(n_updates=20, eval_every=10, batch_size=32, validation_percentage=0)
    train(offline_config(algorithm, records), tmp_path / "first")
    more = BCConfig(n_updates=30, eval_every=10, batch_size=32, validation_percentage=0)
    train(offline_config(more, records, input_dir=tmp_path / "first"), tmp_path / "more")
    assert load_checkpoint(tmp_path / "more" / "last.pt").extra["training_state"]["algorithm"]["updates"] == 30
    with pytest.raises(MazerunError, match="already trained for 20 updates >= algorithm.n_updates=20; raise"):
        train(offline_config(algorithm, records, input_dir=tmp_path / "first"), tmp_path / "again")


# ------------------------------------------------------------------------------------ 3. signals


def test_sigterm_mid_training_keeps_a_checkpoint_that_continues_exactly(workdir: Path, records: Path) -> None:
    common = ["-cn", "conf_train", f"runner.dataset.dir_or_file={records}", "algorithm.validation_percentage=0",
              "algorithm.batch_size=32", *QUICK]
    with spawn_cli(*common, "algorithm.n_updates=1000000", "hydra.run.dir=stopped", cwd=workdir) as process:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (workdir / "stopped" / "metrics.csv").exists():
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM at update" in stderr and "continue with input_dir=" in stderr
    reached = load_checkpoint(workdir / "stopped" / "last.pt").extra["step"]
    assert 0 < reached < 1000000
    run_ok(*common, f"algorithm.n_updates={reached + 30}", "input_dir=stopped", "hydra.run.dir=continued", cwd=workdir)
    run_ok(*common, f"algorithm.n_updates={reached + 30}", "hydra.run.dir=whole", cwd=workdir)
    whole, continued = load_checkpoint(workdir / "whole" / "last.pt"), load_checkpoint(workdir / "continued" / "last.pt")
    assert all(torch.equal(value, continued.model_state[name]) for name, value in whole.model_state.items())
    assert read_metrics_csv(workdir / "continued" / "metrics.csv") == read_metrics_csv(workdir / "whole" / "metrics.csv")


def test_sighup_stops_a_ppo_run_like_ctrl_c(workdir: Path) -> None:
    with spawn_cli("algorithm=ppo", "algorithm.n_steps=32", "algorithm.batch_size=32", "runner.n_envs=2",
                   "model.hidden_sizes=[16,16]", "runner.eval_repeats=1", "runner.max_episode_steps=30",
                   "hydra.run.dir=ppo", cwd=workdir) as process:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (workdir / "ppo" / "last.pt").exists():
            time.sleep(0.05)
        process.send_signal(signal.SIGHUP)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGHUP, stderr
    assert "stopped by SIGHUP at step" in stderr and "last.pt holds step" in stderr and "Traceback" not in stderr


START_UP_DELAYS = (0.2, 0.5, 0.8, 1.2, 1.6, 2.0)
"""Seconds after the start of `run` at which a SIGTERM lands: imports, Hydra, records, the first updates."""


def test_sigterm_at_any_moment_of_start_up_exits_143_without_a_traceback(workdir: Path, records: Path) -> None:
    for delay in START_UP_DELAYS:
        with spawn_cli("-cn", "conf_train", f"runner.dataset.dir_or_file={records}", "algorithm.n_updates=1000000",
                       *QUICK, f"hydra.run.dir=run_{delay}", cwd=workdir) as process:
            time.sleep(delay)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
        assert process.returncode == 128 + signal.SIGTERM, f"SIGTERM after {delay} s:\n{stderr}"
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, f"SIGTERM after {delay} s:\n{stderr}"


def test_a_stop_raised_where_python_swallows_it_is_raised_at_the_next_check(capfd: pytest.CaptureFixture) -> None:
    """The signal handler runs wherever the interpreter is: here inside a __del__, which swallows what it raises."""
    handlers, hook = {number: signal.getsignal(number) for number in interrupts.HANDLED_SIGNALS}, sys.unraisablehook

    class Dropped:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGTERM)

    try:
        interrupts.install()
        Dropped()
        with pytest.raises(interrupts.Interrupted) as stop:
            interrupts.check()
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        sys.unraisablehook = hook
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_a_recording_with_their_own_exit_code(workdir: Path, stop: signal.Signals) -> None:
    with spawn_cli("runner.n_episodes=1000", "hydra.run.dir=recording", cwd=workdir) as process:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((workdir / "recording").glob("trajectory_data/*.pkl")):
            time.sleep(0.05)
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + stop, stderr
    assert f"stopped by {stop.name}; " in stderr and "finished episodes kept in" in stderr and "Traceback" not in stderr


def test_a_convert_stopped_while_torch_loads_exits_130_quietly_and_a_finished_one_exits_0(
    workdir: Path, records: Path
) -> None:
    with spawn_cli("convert", str(records), "early.store", cwd=workdir, program=DATASETS) as process:
        time.sleep(0.3)  # numpy and torch are still loading
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    with spawn_cli("convert", str(records), "late.store", cwd=workdir, program=DATASETS) as process:
        assert process.stdout.readline().startswith("wrote ")  # main is done; the interpreter tears down
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr


# ---------------------------------------------------------------------------------------- 4. NaN


@pytest.mark.parametrize(("override", "key"), [("algorithm.lr=nan", "algorithm.lr=nan"),
                                               ("algorithm.batch_size=inf", "algorithm.batch_size"),
                                               ("algorithm.gamma=-inf", "algorithm.gamma=-inf")])
def test_non_finite_config_values_are_refused(workdir: Path, override: str, key: str) -> None:
    one_line_error(run_cli("-cn", "conf_train", "algorithm=cql", override, cwd=workdir), key)


def test_an_exploding_offline_loss_stops_at_the_first_report_keeping_the_last_good_checkpoint(
    workdir: Path, records: Path
) -> None:
    result = run_cli("-cn", "conf_train", "algorithm=cql", "algorithm.lr=1e38", "algorithm.td_loss=mse",
                     "algorithm.n_updates=100", f"runner.dataset.dir_or_file={records}", *QUICK, cwd=workdir)
    line = one_line_error(result, "became nan at update 20: training diverged and stopped")
    assert "last.pt holds update 0" in line and "lower algorithm.lr" in line
    last = load_checkpoint(newest_run_dir(workdir) / "last.pt")
    assert last.extra["step"] == 0 and all(torch.isfinite(value).all() for value in last.model_state.values())


def test_a_diverging_ppo_run_stops_with_one_line_not_inside_sampling(workdir: Path) -> None:
    result = run_cli("algorithm=ppo", "algorithm.lr=1e30", "algorithm.total_steps=512", "algorithm.n_steps=32",
                     "algorithm.batch_size=32", "runner.n_envs=2", "runner.eval_repeats=1", "runner.max_episode_steps=30",
                     "model.hidden_sizes=[16,16]", cwd=workdir)
    one_line_error(result, "training diverged and stopped")
    assert "multinomial" not in result.stderr


# ------------------------------------------------------------------------------- 5. disks and dirs


def test_an_unwritable_run_dir_is_one_line(workdir: Path) -> None:
    (workdir / "a_file").write_text("not a directory")
    result = run_cli("runner.n_episodes=1", f"hydra.run.dir={workdir / 'a_file' / 'run'}", cwd=workdir)
    one_line_error(result, "a_file")


def fill_disk_at(limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's processes cannot write files past ``limit`` bytes: a disk that fills up (EFBIG, not SIGXFSZ)."""
    import conftest

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    original = conftest._default_signals
    monkeypatch.setattr(conftest, "_default_signals", lambda: (original(), limited()))


def test_a_full_disk_during_recording_is_one_line_and_leaves_no_partial_file(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_disk_at(8000, monkeypatch)  # a heuristic episode of ~250 steps needs more
    result = run_cli("runner.n_episodes=6", "runner.n_workers=2", cwd=workdir)
    line = one_line_error(result, "cannot write")
    assert "free disk space" in line
    data = newest_run_dir(workdir) / "trajectory_data"
    assert not [path for path in data.iterdir() if not path.name.endswith(".pkl")]
    for record in load_records(data) if any(data.iterdir()) else []:
        assert len(record) > 0


def test_a_full_disk_during_training_keeps_the_last_good_checkpoint(
    workdir: Path, records: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_disk_at(19_000, monkeypatch)  # last.pt at update 0 (~16 kB) fits; with Adam's moments (~24 kB) it does not
    result = run_cli("-cn", "conf_train", f"runner.dataset.dir_or_file={records}", "algorithm.n_updates=40",
                     "algorithm.validation_percentage=0", *QUICK, cwd=workdir)
    one_line_error(result, "cannot write")
    run_dir = newest_run_dir(workdir)
    assert not [path for path in run_dir.iterdir() if path.name.endswith(".tmp")]
    assert load_checkpoint(run_dir / "last.pt").extra["step"] == 0


def test_writes_are_flushed_to_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), replace(a, b))[1])
    atomic_write_bytes(tmp_path / "file.bin", b"data")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, the directory
    assert (tmp_path / "file.bin").read_bytes() == b"data"



def test_the_background_flusher_also_flushes_before_the_rename_and_reports_a_failure_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), replace(a, b))[1])
    flusher = BackgroundFlusher()
    flusher.write(tmp_path / "a.bin", b"a")
    flusher.wait()
    assert events == ["fsync", "replace", "fsync"] and (tmp_path / "a.bin").read_bytes() == b"a"

    def full_disk(a: str, b: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    flusher.write(tmp_path / "b.bin", b"b")
    with pytest.raises(MazerunError, match=r"cannot write .*b\.bin: No space left on device; free disk space"):
        flusher.wait()
    flusher.close()  # raised once, at the wait
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.bin"]  # no temporary file left behind


def file_hashes(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) and the hash of its bytes; a running run's temporary
    files (renamed a moment later) are not files of the run."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file() and not path.name.endswith(".tmp")}


def test_a_run_dir_that_holds_a_run_or_is_in_use_is_refused_and_left_byte_identical(workdir: Path) -> None:
    run_ok("runner.n_episodes=1", "runner.max_episode_steps=20", "hydra.run.dir=taken", cwd=workdir)
    before = file_hashes(workdir / "taken")
    assert ".hydra/config.yaml" in before and "run.log" in before
    result = run_cli("runner.n_episodes=2", "runner.max_episode_steps=20", "hydra.run.dir=taken", cwd=workdir)
    one_line_error(result, "already holds an earlier run's")
    assert file_hashes(workdir / "taken") == before  # not its .hydra/*.yaml, not its run.log

    with spawn_cli("runner.n_episodes=1000", "runner.type=sequential", "hydra.run.dir=busy", cwd=workdir) as process:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((workdir / "busy").glob("trajectory_data/*.pkl")):
            time.sleep(0.05)
        before = file_hashes(workdir / "busy")
        second = run_cli("runner.n_episodes=1", "hydra.run.dir=busy", cwd=workdir)
        after = file_hashes(workdir / "busy")  # the running run adds records; the files it had stay as they were
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    one_line_error(second, "is in use by another run")
    assert {name: after[name] for name in before} == before


def test_a_sweep_dir_that_holds_an_earlier_sweep_is_refused_and_left_byte_identical(workdir: Path) -> None:
    run_ok("-m", "runner.seed=0,1", "runner.n_episodes=1", "runner.max_episode_steps=20", "hydra.sweep.dir=sweep",
           cwd=workdir)
    before = file_hashes(workdir / "sweep")
    assert "0/.hydra/config.yaml" in before and "1/rollout_stats.json" in before
    result = run_cli("-m", "runner.seed=5,6", "runner.n_episodes=1", "hydra.sweep.dir=sweep", cwd=workdir)
    one_line_error(result, "already holds the jobs of an earlier sweep (0, 1)")
    assert file_hashes(workdir / "sweep") == before


@pytest.mark.parametrize("directory", ["", "."])
def test_a_run_dir_that_is_the_current_directory_is_refused(workdir: Path, directory: str) -> None:
    one_line_error(run_cli("runner.n_episodes=1", f"hydra.run.dir='{directory}'", cwd=workdir), "the current directory")
    assert not list(workdir.iterdir())


# ------------------------------------------------------------------------------ 6. damaged checkpoints


@pytest.fixture(scope="module")
def bc_run(records: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 20-update BC run (last.pt and best.pt)."""
    directory = tmp_path_factory.mktemp("bc")
    run_ok("-cn", "conf_train", f"runner.dataset.dir_or_file={records}", "algorithm.n_updates=20",
           "algorithm.validation_percentage=0", *QUICK, "hydra.run.dir=run", cwd=directory)
    return directory / "run"


def _nan_weights(payload: dict) -> None:
    for value in payload["model_state"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))


WATCH = ("policy=torch_policy", "runner.n_episodes=1", "runner.max_episode_steps=10")


@pytest.mark.parametrize(("damage", "command", "message"), [
    (lambda payload: payload["model_state"].update({next(iter(payload["model_state"])): torch.zeros(3)}), WATCH,
     "has shape (3,), but the actor_critic"),
    (lambda payload: payload.update(observation_space=space_to_dict(gym.spaces.Box(-1, 1, (9,)))), WATCH,
     "for its Box observations of shape (9,) needs"),
    (lambda payload: payload.pop("model_state"), WATCH, "it has no model_state"),
    (_nan_weights, WATCH, "holds NaN or infinite weights"),
    (lambda payload: payload["extra"].update(training_state={}), ("-cn", "conf_train", "algorithm.n_updates=40"),
     "its training_state lacks the algorithm's state or its step, so its run cannot be continued"),
    (lambda payload: payload.update(extra=[1]), ("-cn", "conf_train", "algorithm.n_updates=40"), "its extra is a list"),
], ids=["tensor-shape", "observation-space", "no-model-state", "nan-weights", "empty-training-state", "extra-not-dict"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(
    workdir: Path, bc_run: Path, records: Path, damage, command: tuple[str, ...], message: str
) -> None:
    payload = torch.load(bc_run / "last.pt", weights_only=True)
    damage(payload)
    torch.save(payload, workdir / "damaged.pt")
    training = (f"runner.dataset.dir_or_file={records}", *QUICK) if "-cn" in command else ()
    result = run_cli(*command, *training, f"input_dir={workdir / 'damaged.pt'}", cwd=workdir)
    line = one_line_error(result, message)
    assert f"{workdir / 'damaged.pt'} is damaged" in line and "or train again" in line


def test_a_continued_run_that_diverges_names_the_checkpoint_that_holds_its_start(workdir: Path, records: Path) -> None:
    common = ("-cn", "conf_train", "algorithm=cql", "algorithm.td_loss=mse", f"runner.dataset.dir_or_file={records}",
              *QUICK)
    run_ok(*common, "algorithm.n_updates=20", "hydra.run.dir=cql", cwd=workdir)
    payload = torch.load(workdir / "cql" / "last.pt", weights_only=True)
    state = payload["extra"]["training_state"]["algorithm"]
    state["lr_schedule"][:2] = [1e38, 1e38]  # a continued run keeps its schedule and optimiser: raise the lr there
    for optimizer in (value for value in state.values() if isinstance(value, dict) and "param_groups" in value):
        for group in optimizer["param_groups"]:
            group["lr"] = 1e38
    (workdir / "first").mkdir()
    torch.save(payload, workdir / "first" / "last.pt")
    result = run_cli(*common, "input_dir=first", "algorithm.n_updates=40", "hydra.run.dir=continued", cwd=workdir)
    line = one_line_error(result, "training diverged and stopped")
    assert "first/last.pt holds update 20" in line  # the continued run had not written its own last.pt yet
    assert not (workdir / "continued" / "last.pt").exists()


# ------------------------------------------------------------------- 7, 8. newest recording, order


def test_only_a_finished_expert_recording_is_taken_implicitly(workdir: Path) -> None:
    run_ok("runner.n_episodes=2", "runner.max_episode_steps=40", "hydra.run.dir=outputs/a/expert", cwd=workdir)
    run_ok("-cn", "conf_train", "algorithm.n_updates=2", "algorithm.eval_every=2", "runner.eval_repeats=1",
           "runner.max_episode_steps=10", "algorithm.validation_percentage=0", "hydra.run.dir=outputs/b/clone", cwd=workdir)
    run_ok("policy=torch_policy", "input_dir=outputs/b/clone", "runner.n_episodes=2", "runner.max_episode_steps=10",
           "hydra.run.dir=outputs/c/watch", cwd=workdir)
    run_ok("runner.n_episodes=2", "runner.max_episode_steps=40", "hydra.run.dir=outputs/d/unfinished", cwd=workdir)
    stats = json.loads((workdir / "outputs/d/unfinished" / STATS_FILE).read_text())
    (workdir / "outputs/d/unfinished" / STATS_FILE).write_text(json.dumps({**stats, "finished": False}))
    result = run_ok("-cn", "conf_train", "algorithm.n_updates=2", "algorithm.eval_every=2", "runner.eval_repeats=1",
                    "runner.max_episode_steps=10", "algorithm.validation_percentage=0", "hydra.run.dir=outputs/e/x",
                    cwd=workdir)
    assert "training on the newest finished recording: outputs/a/expert/trajectory_data" in result.stderr


def test_two_identical_recordings_train_identically(workdir: Path) -> None:
    for name in ("one", "two"):
        run_ok("runner.n_episodes=6", "runner.max_episode_steps=60", f"hydra.run.dir={name}", cwd=workdir)
        run_ok("-cn", "conf_train", f"runner.dataset.dir_or_file={name}/trajectory_data", "algorithm.n_updates=30",
               "algorithm.eval_every=30", "runner.eval_repeats=1", "runner.max_episode_steps=10",
               "model.hidden_sizes=[16,16]", f"hydra.run.dir={name}_bc", cwd=workdir)
    assert sorted(path.name for path in (workdir / "one" / "trajectory_data").iterdir())[0] == "episode_00000000.pkl"
    one, two = load_checkpoint(workdir / "one_bc" / "last.pt"), load_checkpoint(workdir / "two_bc" / "last.pt")
    assert all(torch.equal(value, two.model_state[name]) for name, value in one.model_state.items())


# -------------------------------------------------------------------------------------- 11. typos


@pytest.mark.parametrize(("overrides", "message"), [
    (["-cn", "conf_train", "algorithm.n_update=5"],
     "unknown key algorithm.n_update in section algorithm; did you mean n_updates"),
    (["runner.n_episode=3"], "unknown key runner.n_episode in section runner; did you mean n_episodes"),
    (["envs=CartPole-v1"], "unknown key envs at the top level; did you mean env?"),
    (["algorithm.n_updates=5"], "this run has no algorithm section to override; choose one first"),
    (["runner=fast"], "unknown runner 'fast'; choose one of: parallel, sequential"),
    (["runner.n_episodes=[1"], "runner.n_episodes=[1"),
])
def test_a_misspelt_key_or_unknown_group_is_one_line(workdir: Path, overrides: list[str], message: str) -> None:
    line = one_line_error(run_cli(*overrides, cwd=workdir), message)
    assert "HYDRA_FULL_ERROR" not in line


@pytest.mark.parametrize("algorithm", [
    ["algorithm=ppo", "algorithm.n_steps=16", "algorithm.batch_size=32", "algorithm.eval_every=64"],
    ["algorithm=dagger", "algorithm.n_steps=16", "algorithm.n_updates=4", "algorithm.eval_every=64"],
])
def test_a_continued_run_must_step_as_many_env_copies_as_it_saved(workdir: Path, algorithm: list[str]) -> None:
    """Each copy replays its own running episode from last.pt: another runner.n_envs is refused in one line."""
    tiny = [*algorithm, "runner.eval_repeats=1", "runner.max_episode_steps=30", "model.hidden_sizes=[16]"]
    run_ok(*tiny, "runner.n_envs=2", "algorithm.total_steps=64", "hydra.run.dir=first", cwd=workdir)
    result = run_cli(*tiny, "runner.n_envs=4", "algorithm.total_steps=128", "input_dir=first", "hydra.run.dir=second",
                     cwd=workdir)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "runner.n_envs=4 differs from the 2 env copies" in errors[0], result.stderr
    assert errors[0].endswith("continue with runner.n_envs=2") and "Traceback" not in result.stderr
    assert not (workdir / "second" / "last.pt").exists()
