"""MuJoCo tasks through `run`: SAC trains on Hopper-v5, its policy records, and TD3+BC, IQL, CQL and BC learn from
the records; without the mujoco extra, a MuJoCo env is one line that names the extra."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
from conftest import newest_run_dir, run_ok

from mazerun.acting.envs import make_env
from mazerun.core.errors import MazerunError
from mazerun.data.records import load_records

TINY = ("runner.eval_repeats=1", "runner.max_episode_steps=10", "model.hidden_sizes=[16,16]", "device=cpu")


def test_a_mujoco_env_without_mujoco_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object, **kwargs: object) -> gym.Env:
        raise gym.error.DependencyNotInstalled('MuJoCo is not installed, run `pip install "gymnasium[mujoco]"`')

    monkeypatch.setattr(gym, "make", missing)
    with pytest.raises(MazerunError) as error:
        make_env("Hopper-v5")
    message = str(error.value)
    assert message.startswith("Hopper-v5 needs a package that is not installed: MuJoCo is not installed")
    assert message.endswith('(mazerun\'s mujoco extra: pip install ".[mujoco]")') and "\n" not in message


@pytest.mark.parametrize("env_id", ["Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"])
def test_each_mujoco_env_option_names_a_task_with_box_actions(env_id: str) -> None:
    pytest.importorskip("mujoco", reason="MuJoCo tasks need mazerun's mujoco extra")
    config = Path(__file__).resolve().parents[1] / "conf" / "env" / f"{env_id}.yaml"
    assert f"name: {env_id}" in config.read_text()
    env = make_env(env_id)
    try:
        assert isinstance(env.action_space, gym.spaces.Box) and len(env.action_space.shape) == 1
    finally:
        env.close()


def test_sac_on_hopper_records_and_offline_learners_train_on_the_records(workdir: Path) -> None:
    pytest.importorskip("mujoco", reason="MuJoCo tasks need mazerun's mujoco extra")
    run_ok("env=Hopper-v5", "algorithm=sac", "algorithm.total_steps=16", "algorithm.learning_starts=8",
           "algorithm.eval_every=16", "algorithm.buffer_size=100", "algorithm.batch_size=8", "runner.n_envs=2", *TINY,
           cwd=workdir)
    sac = newest_run_dir(workdir)
    run_ok("policy=torch_policy", f"input_dir={sac}", "runner=sequential", "runner.n_episodes=2",
           "runner.max_episode_steps=10", cwd=workdir)
    records = newest_run_dir(workdir) / "trajectory_data"
    loaded = load_records(records)
    assert len(loaded) == 2 and all(record.actions.shape[1:] == (3,) for record in loaded)
    for algorithm in ("td3_bc", "iql", "cql", "bc"):
        run_ok("-cn", "conf_train", f"algorithm={algorithm}", f"runner.dataset.dir_or_file={records}",
               "algorithm.n_updates=2", "algorithm.eval_every=2", "algorithm.batch_size=8", *TINY, cwd=workdir)
        assert (newest_run_dir(workdir) / "best.pt").is_file(), algorithm
