"""Tuned defaults per env: composed by Hydra, overridden by the command line, named in run.log."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import newest_run_dir, run_ok
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mazerun.algorithms.dagger import DAggerConfig
from mazerun.algorithms.ppo import PPOConfig
from mazerun.cli import _config_dir
from mazerun.compose.validation import validate
from mazerun.config.schemas import RunnerConfig
from mazerun.config.tuned import applied_tuned_defaults, dotted_items, with_kind_defaults
from mazerun.nn.checkpoint import load_checkpoint

TUNED_FILES = sorted(path for group in ("tuned", "tuned_model", "tuned_runner")
                     for path in (Path(_config_dir()) / group).glob("*.yaml"))


def test_the_report_lists_each_files_keys_and_what_the_command_line_overrode(tmp_path: Path) -> None:
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "Env-v0_ppo.yaml").write_text("lr: 0.001\nn_steps: 32\n")
    (tmp_path / "tuned" / "Env-v0_dagger_ppo.yaml").write_text("defaults:\n  - /tuned@stages.dagger: Env-v0_ppo\n")
    (tmp_path / "tuned_model").mkdir()
    (tmp_path / "tuned_model" / "Env-v0_ppo.yaml").write_text("memory: gru\n")
    choices = {"tuned@algorithm": "Env-v0_ppo", "tuned@pipeline": "Env-v0_None", "tuned_model@model": "Env-v0_ppo",
               "env": "Env-v0", "algorithm": "ppo"}
    assert applied_tuned_defaults(choices, [tmp_path], ["env=Env-v0", "algorithm.lr=0.01"]) == [
        "tuned defaults tuned/Env-v0_ppo.yaml: algorithm.n_steps=32; the command line overrides algorithm.lr",
        "tuned defaults tuned_model/Env-v0_ppo.yaml: model.memory=gru"]
    # a pipeline's file only includes the stage's, which is listed under the stage's own package
    choices = {"tuned@pipeline": "Env-v0_dagger_ppo", "tuned@pipeline.stages.dagger": "Env-v0_ppo"}
    assert applied_tuned_defaults(choices, [tmp_path], []) == [
        "tuned defaults tuned/Env-v0_ppo.yaml: pipeline.stages.dagger.lr=0.001, pipeline.stages.dagger.n_steps=32"]


@pytest.mark.parametrize("path", TUNED_FILES, ids=[f"{path.parent.name}/{path.stem}" for path in TUNED_FILES])
def test_every_tuned_file_composes_into_a_valid_run(path: Path) -> None:
    """Each file names an env option and an algorithm or pipeline that exist, and only keys they have."""
    env, _, name = path.stem.partition("_")
    assert (Path(_config_dir()) / "env" / f"{env}.yaml").is_file()
    group = "pipeline" if (Path(_config_dir()) / "pipeline" / f"{name}.yaml").is_file() else "algorithm"
    assert (Path(_config_dir()) / group / f"{name}.yaml").is_file()
    with initialize_config_dir(config_dir=_config_dir(), version_base="1.3"):
        cfg = compose("conf_rollout", overrides=[f"env={env}", f"{group}={name}"], return_hydra_config=False)
    tuned = yaml.safe_load(path.read_text())
    section = {"tuned_model": cfg.model, "tuned_runner": cfg.runner}.get(path.parent.name, cfg[group])
    for key, value in dotted_items(tuned, "").items():
        if not key.startswith("defaults"):
            assert OmegaConf.select(section, key) == value, key
    validate(cfg)


def test_tuned_defaults_apply_an_explicit_override_wins_and_run_log_names_them(workdir: Path) -> None:
    run_ok("env=CartPole-v1", "algorithm=ppo", "algorithm.lr=0.002", "algorithm.total_steps=512",
           "algorithm.eval_every=512", "runner.eval_repeats=1", cwd=workdir)
    run_dir = newest_run_dir(workdir)
    assert load_checkpoint(run_dir / "last.pt").extra["step"] == 512
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["algorithm"]
    assert (config["n_steps"], config["batch_size"], config["gamma"]) == (32, 256, 0.98)  # conf/tuned/CartPole-v1_ppo
    assert config["lr"] == 0.002 and config["total_steps"] == 512  # the command line
    log = (run_dir / "run.log").read_text()
    assert "tuned defaults tuned/CartPole-v1_ppo.yaml: algorithm.n_steps=32, algorithm.batch_size=256" in log
    assert "the command line overrides algorithm.eval_every, algorithm.lr, algorithm.total_steps" in log


def test_cfg_job_shows_the_tuned_values_of_an_algorithm_and_of_a_pipelines_stage(workdir: Path, tmp_path: Path) -> None:
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "CartPole-v1_dagger.yaml").write_text("total_steps: 100000\nlr: 0.001\n")
    (tmp_path / "tuned" / "CartPole-v1_dagger_ppo.yaml").write_text(
        "defaults:\n  - /tuned@stages.dagger: CartPole-v1_dagger\n")
    (tmp_path / "tuned_runner").mkdir()
    (tmp_path / "tuned_runner" / "CartPole-v1_dagger.yaml").write_text("eval_repeats: 100\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    shown = yaml.safe_load(run_ok("env=CartPole-v1", "algorithm=dagger", searchpath, "--cfg", "job",
                                  cwd=workdir).stdout)
    assert shown["algorithm"]["total_steps"] == 100_000 and shown["algorithm"]["lr"] == 0.001
    assert shown["runner"]["eval_repeats"] == 100
    shown = yaml.safe_load(run_ok("pipeline=dagger_ppo", "env=CartPole-v1", "pipeline.stages.dagger.lr=0.01",
                                  searchpath, "--cfg", "job", cwd=workdir).stdout)
    assert shown["pipeline"]["stages"]["dagger"]["total_steps"] == 100_000
    assert shown["pipeline"]["stages"]["dagger"]["lr"] == 0.01
    shown = yaml.safe_load(run_ok("env=LunarLander-v3", "algorithm=dagger", searchpath, "--cfg", "job",
                                  cwd=workdir).stdout)
    assert shown["algorithm"]["total_steps"] == 20_000  # no tuned file: the algorithm's own default


def test_an_env_of_ones_own_is_tuned_from_a_search_path_directory(workdir: Path) -> None:
    conf = workdir / "myconf"
    (conf / "env").mkdir(parents=True)
    (conf / "tuned").mkdir()
    (conf / "env" / "Acrobot-v1.yaml").write_text("name: Acrobot-v1\n")
    (conf / "tuned" / "Acrobot-v1_ppo.yaml").write_text("n_epochs: 3\n")
    shown = yaml.safe_load(run_ok(f"hydra.searchpath=[file://{conf}]", "env=Acrobot-v1", "algorithm=ppo", "--cfg",
                                  "job", cwd=workdir).stdout)
    assert shown["env"]["name"] == "Acrobot-v1" and shown["algorithm"]["n_epochs"] == 3


def test_dotted_items_names_nested_keys_as_a_command_line_does() -> None:
    nested = {"teacher_forcing": {"steps": 100_000}, "lr": 0.001}
    assert dotted_items(nested, "algorithm") == {"algorithm.teacher_forcing.steps": 100_000, "algorithm.lr": 0.001}
    assert dotted_items(nested, "") == {"teacher_forcing.steps": 100_000, "lr": 0.001}


def test_sac_steps_one_env_copy_under_any_env_unless_told_otherwise(workdir: Path) -> None:
    """conf/algorithm_runner/sac_runner.yaml: SB3's one copy, whatever the env; the command line still wins, and other
    algorithms keep the runner's own 16."""
    shown = yaml.safe_load(run_ok("env=LunarLanderContinuous-v3", "algorithm=sac", "--cfg", "job", cwd=workdir).stdout)
    assert (shown["runner"]["n_envs"], shown["runner"]["vector"]) == (1, "sync")
    shown = yaml.safe_load(run_ok("env=LunarLanderContinuous-v3", "algorithm=sac", "runner.n_envs=4", "--cfg", "job",
                                  cwd=workdir).stdout)
    assert shown["runner"]["n_envs"] == 4
    shown = yaml.safe_load(run_ok("env=LunarLanderContinuous-v3", "algorithm=ppo", "--cfg", "job", cwd=workdir).stdout)
    assert (shown["runner"]["n_envs"], shown["runner"]["vector"]) == (16, "auto")


def test_kind_defaults_fill_only_keys_still_at_their_plain_default() -> None:
    """DAggerConfig.kind_defaults["minigrid"]: a key named on the command line, or changed by a tuned file or a
    pipeline (its value is no longer the plain default), keeps its value; the runner's keys are the runner's."""
    plain = DAggerConfig()
    tuned = replace(plain, n_updates=500)  # as a tuned file or a pipeline would set it
    algorithm, runner, taken = with_kind_defaults(tuned, RunnerConfig(), "minigrid", "algorithm",
                                                  ["env.name=BabyAI-GoToRedBallGrey-v0", "algorithm.lr=0.0003"])
    assert (algorithm.n_updates, algorithm.lr) == (500, 3e-4)  # kept: changed, and named on the command line
    assert (algorithm.total_steps, algorithm.refit_updates, algorithm.refit_eval_every) == (100_000, 10_000, 2000)
    assert (algorithm.teacher_forcing.start, algorithm.teacher_forcing.steps) == (1.0, 100_000)  # a nested key
    assert runner.eval_repeats == 100
    assert "algorithm.teacher_forcing.steps=100000" in taken and "runner.eval_repeats=100" in taken
    assert not any(item.startswith(("algorithm.lr=", "algorithm.n_updates=")) for item in taken)
    assert algorithm.expert_takes_over and "algorithm.expert_takes_over=true" in taken  # written as one types it
    algorithm, _, _ = with_kind_defaults(plain, RunnerConfig(), "minigrid", "algorithm",
                                         ["algorithm.expert_takes_over=false"])
    assert not algorithm.expert_takes_over  # named on the command line: kept, though it is the plain default
    # a pipeline's stage: its keys are named under its prefix
    algorithm, runner, _ = with_kind_defaults(plain, RunnerConfig(), "minigrid", "pipeline.stages.dagger",
                                              ["pipeline.stages.dagger.total_steps=2000", "runner.eval_repeats=5"])
    assert (algorithm.total_steps, runner.eval_repeats) == (20_000, 10)  # eval_repeats=5 lands in the runner itself
    # vector observations, and an algorithm without kind defaults, keep everything
    assert with_kind_defaults(plain, RunnerConfig(), "vector_obs", "algorithm", []) == (plain, RunnerConfig(), [])
    assert with_kind_defaults(PPOConfig(), RunnerConfig(), "minigrid", "algorithm", [])[2] == []


def test_a_grid_task_takes_its_kind_defaults_through_run_and_says_so(workdir: Path) -> None:
    """DAgger on a BabyAI id named with env.name (no env option, so no tuned file): a GRU learner and the minigrid
    defaults, except what the command line sets; run.log names what it took."""
    run_ok("algorithm=dagger", "env.name=BabyAI-GoToRedBallGrey-v0", "algorithm.total_steps=128", "runner.n_envs=4",
           "algorithm.n_steps=8", "algorithm.n_updates=4", "algorithm.refit_updates=2", "algorithm.eval_every=128",
           "runner.eval_repeats=2", cwd=workdir)
    run_dir = newest_run_dir(workdir)
    log = (run_dir / "run.log").read_text()
    assert ("dagger defaults for minigrid observations: algorithm.lr=0.001, algorithm.rollout_len=16, "
            "algorithm.nrollouts=16, algorithm.burn_in=32, algorithm.teacher_forcing.steps=100000, "
            "algorithm.refit_eval_every=2000, algorithm.expert_takes_over=true\n" in log)
    assert load_checkpoint(run_dir / "last.pt").model_config["memory"] == "gru"
