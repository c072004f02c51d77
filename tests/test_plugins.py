"""Plugins: an algorithm, a policy or an expert from another installed package, through the real `run`.

The worked example, ``examples/mazerun_awr``, is pip-installed into a scratch directory on
PYTHONPATH: its wheel, entry points and YAML as a user gets them. The other plugins here are
written as a ``.dist-info`` (its entry points) beside their modules, which importlib.metadata
finds on PYTHONPATH as it finds an installed package.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, install_example, run_cli, run_ok, spawn_cli

from mazerun.acting.rollout import rollout
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.core.errors import MazerunError
from mazerun.data.records import load_records
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.training.metrics import read_metrics_csv

QUICK = ["runner.eval_repeats=1", "runner.max_episode_steps=50", "model.hidden_sizes=[16,16]",
         "algorithm.batch_size=32", "algorithm.eval_every=20"]


@pytest.fixture(scope="module")
def awr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment in which `run` sees examples/mazerun_awr, pip-installed."""
    return install_example("mazerun_awr", tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("expert")
    rollout("LunarLander-v3", PolicyConfig(epsilon=0.2), RunnerConfig(type="sequential", n_episodes=4, max_episode_steps=120),
            directory, print_fn=lambda _: None)
    return directory / "trajectory_data"


def write_plugin(root: Path, entry_points: dict[str, dict[str, str]], files: dict[str, str]) -> dict[str, str]:
    """A package ``fake-plugins`` as pip would install it in ``root`` (its modules, and a ``.dist-info`` declaring
    ``entry_points``: group -> name -> value); returns the environment in which `run` sees it."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    info = root / "fake_plugins-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in names.items()) + "\n"
        for group, names in entry_points.items()))
    return {"PYTHONPATH": str(root)}


def one_line_error(result: subprocess.CompletedProcess, message: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return errors[0]


# ------------------------------------------------------------------------ the worked example: AWR


def _reported_update(metrics: Path, update: int) -> bool:
    """Whether ``metrics`` holds a row at ``update`` or later (a run still writing it may hold none yet)."""
    try:
        return any(row["step"] >= update for row in read_metrics_csv(metrics))
    except (OSError, ValueError, KeyError, MazerunError):
        return False



def test_awr_trains_stops_continues_exactly_and_rolls_out(workdir: Path, records: Path, awr: dict[str, str]) -> None:
    common = ["-cn", "conf_train", "algorithm=awr", f"runner.dataset.dir_or_file={records}", *QUICK]
    with spawn_cli(*common, "algorithm.n_updates=1000000", "hydra.run.dir=stopped", cwd=workdir, env=awr) as process:
        deadline = time.monotonic() + 120  # stopped once 20 updates are reported, however loaded the machine is
        while time.monotonic() < deadline and not _reported_update(workdir / "stopped" / "metrics.csv", 20):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM at update" in stderr and "continue with input_dir=" in stderr
    reached = load_checkpoint(workdir / "stopped" / "last.pt").extra["step"]
    assert 20 <= reached < 1000000
    run_ok(*common, f"algorithm.n_updates={reached + 30}", "input_dir=stopped", "hydra.run.dir=continued",
           cwd=workdir, env=awr)
    run_ok(*common, f"algorithm.n_updates={reached + 30}", "hydra.run.dir=whole", cwd=workdir, env=awr)

    whole, continued = load_checkpoint(workdir / "whole" / "last.pt"), load_checkpoint(workdir / "continued" / "last.pt")
    assert whole.algorithm == "awr" and continued.extra["step"] == reached + 30
    assert all(torch.equal(value, continued.model_state[name]) for name, value in whole.model_state.items())
    state, continued_state = whole.extra["training_state"]["algorithm"], continued.extra["training_state"]["algorithm"]
    for optimizer in ("value_optimizer", "policy_optimizer"):  # two phases, two optimisers, both resumed
        for key, moments in state[optimizer]["state"].items():
            assert torch.equal(moments["exp_avg"], continued_state[optimizer]["state"][key]["exp_avg"])
    assert all(torch.equal(value, continued_state["target_network"][name])
               for name, value in state["target_network"].items())
    rows = read_metrics_csv(workdir / "whole" / "metrics.csv")
    assert read_metrics_csv(workdir / "continued" / "metrics.csv") == rows
    logged = {f"{row['group']}/{row['metric']}" for row in rows}
    assert {"train/value_loss", "train/policy_loss", "train/mean_weight", "eval/mean_return"} <= logged

    run_ok("policy=torch_policy", "input_dir=continued", "runner=sequential", "runner.n_episodes=2",
           "runner.max_episode_steps=50", "hydra.run.dir=watch", cwd=workdir, env=awr)
    stats = json.loads((workdir / "watch" / "rollout_stats.json").read_text())
    assert stats["episode_count"] == 2 and stats["policy"].startswith("torch_policy:awr")


def test_awr_settings_are_checked_like_a_built_in_algorithm(workdir: Path, records: Path, awr: dict[str, str]) -> None:
    result = run_cli("-cn", "conf_train", "algorithm=awr", "algorithm.beta=0", f"runner.dataset.dir_or_file={records}",
                     cwd=workdir, env=awr)
    one_line_error(result, "algorithm.beta=0.0 must be > 0")
    result = run_cli("-cn", "conf_train", "algorithm=awr", "algorithm.n_update=5", f"runner.dataset.dir_or_file={records}",
                     cwd=workdir, env=awr)
    one_line_error(result, "algorithm.n_update")


def test_awr_learns_continuous_actions_too(workdir: Path, awr: dict[str, str]) -> None:
    rollout("LunarLanderContinuous-v3", PolicyConfig(), RunnerConfig(type="sequential", n_episodes=2, max_episode_steps=80),
            workdir / "expert", print_fn=lambda _: None)
    run_ok("-cn", "conf_train", "algorithm=awr", f"runner.dataset.dir_or_file={workdir / 'expert' / 'trajectory_data'}",
           *QUICK, "algorithm.n_updates=20", "hydra.run.dir=continuous", cwd=workdir, env=awr)
    rows = read_metrics_csv(workdir / "continuous" / "metrics.csv")
    assert {row["metric"] for row in rows if row["group"] == "train"} >= {"value_loss", "policy_loss"}
    assert load_checkpoint(workdir / "continuous" / "best.pt").action_space.shape == (2,)


COMPOSE = """
import sys
from hydra import compose, initialize_config_dir
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    print(compose(config_name=sys.argv[2], overrides=["algorithm=awr"]).algorithm.name)
"""


def test_the_search_path_plugin_serves_run_and_leaves_other_hydra_apps_alone(tmp_path: Path, awr: dict[str, str]) -> None:
    from mazerun.config.plugins import config_dir

    def compose_awr(directory: Path, config_name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", COMPOSE, str(directory), config_name], capture_output=True,
                              text=True, env={**os.environ, **awr}, timeout=120)

    assert compose_awr(config_dir(), "conf_rollout").stdout.strip() == "awr"
    (tmp_path / "algorithm").mkdir()
    (tmp_path / "algorithm" / "mine.yaml").write_text("name: mine\n")
    (tmp_path / "app.yaml").write_text("defaults:\n  - algorithm: mine\n")
    other = compose_awr(tmp_path, "app")
    assert other.returncode != 0 and "Could not find 'algorithm/awr'" in other.stderr, other.stderr


# ---------------------------------------------------------------------------------- a policy plugin

ALWAYS_LEFT = '''
from mazerun.acting.policies import Policy


class AlwaysLeft(Policy):
    """Pushes CartPole's cart left at every step."""

    name = "always_left"

    def __init__(self, env_id, action_space):
        self.env_id = env_id

    def act(self, observation):
        return 0
'''


def test_a_policy_plugin_records_and_teaches_dagger(workdir: Path) -> None:
    env = write_plugin(workdir / "site", {"mazerun.policies": {"always_left": "fake_plugins.policies:AlwaysLeft"}},
                       {"fake_plugins/__init__.py": "", "fake_plugins/policies.py": ALWAYS_LEFT})
    run_ok("env=CartPole-v1", "policy=always_left", "runner.n_workers=2", "runner.n_episodes=2", "hydra.run.dir=rec",
           cwd=workdir, env=env)
    episodes = load_records(workdir / "rec" / "trajectory_data")
    assert len(episodes) == 2 and all((episode.actions == 0).all() and episode.policy == "always_left"
                                      for episode in episodes)

    run_ok("algorithm=dagger", "env=CartPole-v1", "expert=always_left", "algorithm.total_steps=128",
           "algorithm.n_steps=8", "algorithm.n_updates=2", "algorithm.eval_every=128", "runner.eval_repeats=1",
           "runner.max_episode_steps=30", "runner.n_envs=2", "hydra.run.dir=dagger", cwd=workdir, env=env)
    labelled = load_records(workdir / "dagger" / "trajectory_data")
    assert labelled and all((episode.expert_actions == 0).all() for episode in labelled)


def test_a_config_package_may_tune_a_built_in_algorithm_for_an_env(workdir: Path) -> None:
    env = write_plugin(workdir / "site", {"mazerun.configs": {"cartpole": "fake_plugins"}},
                       {"fake_plugins/tuned/CartPole-v1_bc.yaml": "n_updates: 7\nlr: 0.005\n"})
    result = run_cli("-cn", "conf_train", "env=CartPole-v1", "algorithm.lr=0.01", "--cfg", "job", cwd=workdir, env=env)
    assert "n_updates: 7" in result.stdout and "lr: 0.01" in result.stdout, result.stderr
    result = run_cli("-cn", "conf_train", "env=CartPole-v1", "algorithm.lr=0.01", f"runner.dataset.dir_or_file={workdir}/none",
                     "hydra.run.dir=run", cwd=workdir, env=env)
    assert ("tuned defaults tuned/CartPole-v1_bc.yaml: algorithm.n_updates=7; the command line overrides algorithm.lr"
            in result.stderr), result.stderr


# ------------------------------------------------------------------------------------- bad plugins

HALF = '''
from dataclasses import dataclass


@dataclass
class Config:
    name: str = "half"
'''


@pytest.mark.parametrize("entry_points, overrides, message", [
    ({"mazerun.algorithms": {"broken": "fake_plugins.broken"}, "mazerun.configs": {"broken": "fake_plugins"}},
     ["-cn", "conf_train", "algorithm=broken"],
     "the algorithm plugin 'broken' (fake_plugins.broken, package fake-plugins) fails to import: ModuleNotFoundError: "
     "No module named 'a_dependency_not_installed'; fix that package or pip uninstall fake-plugins"),
    ({"mazerun.algorithms": {"half": "fake_plugins.half"}, "mazerun.configs": {"half": "fake_plugins"}},
     ["-cn", "conf_train", "algorithm=half"],
     "the algorithm plugin 'half' (fake_plugins.half, package fake-plugins) has no Algorithm class"),
    ({"mazerun.algorithms": {"bc": "fake_plugins.half"}}, ["-cn", "conf_train"],
     "the algorithm plugin 'bc' (fake_plugins.half, package fake-plugins) takes the name of mazerun's built-in "
     "algorithm bc; rename it"),
    ({"mazerun.policies": {"random": "fake_plugins.half:Config"}}, ["env=CartPole-v1", "policy=heuristic"],
     "the policy plugin 'random' (fake_plugins.half:Config, package fake-plugins) takes the name of mazerun's "
     "built-in policy random"),
    ({"mazerun.configs": {"gone": "fake_plugins_not_installed"}}, ["env=CartPole-v1", "policy=heuristic"],
     "the config plugin 'gone' (fake_plugins_not_installed, package fake-plugins) names no installed package"),
], ids=["fails-to-import", "lacks-algorithm", "clashes-with-an-algorithm", "clashes-with-a-policy", "no-config-package"])
def test_a_bad_plugin_is_one_line_naming_its_package(
    entry_points: dict[str, dict[str, str]], overrides: list[str], message: str, workdir: Path, records: Path
) -> None:
    env = write_plugin(workdir / "site", entry_points, {
        "fake_plugins/__init__.py": "",
        "fake_plugins/broken.py": "import a_dependency_not_installed\n",
        "fake_plugins/half.py": HALF,
        "fake_plugins/algorithm/broken.yaml": "name: broken\n",
        "fake_plugins/algorithm/half.yaml": "name: half\n",
    })
    result = run_cli(*overrides, f"runner.dataset.dir_or_file={records}", "runner.n_episodes=1", "hydra.run.dir=run",
                     cwd=workdir, env=env)
    one_line_error(result, message)


# ----------------------------------------------------------------------------------------- packaging


def test_the_wheel_ships_the_hydra_search_path_plugin(tmp_path: Path) -> None:
    """hydra_plugins/ must stay a namespace package: an __init__.py there would hide every other Hydra plugin."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                             "--wheel-dir", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("mazerun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hydra_plugins/mazerun_searchpath/__init__.py", "mazerun/config/plugins.py",
            "mazerun/conf/conf_rollout.yaml"} <= names
    assert "hydra_plugins/__init__.py" not in names
