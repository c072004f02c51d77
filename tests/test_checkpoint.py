from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from mazerun.acting.envs import make_env
from mazerun.core.errors import MazerunError
from mazerun.nn.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    load_checkpoint,
    save_checkpoint,
    space_from_dict,
    space_to_dict,
)
from mazerun.nn.models import ModelConfig, Vocabulary, build_actor_critic, default_model_kind
from mazerun.training.runsetup import model_config_dict


def _trained_linear() -> tuple[nn.Linear, torch.optim.Adam]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _network_fields(observation_space: gym.Space, action_space: gym.Space, vocabulary: list[str] | None = None) -> dict:
    """model_state and model_config of a small actor-critic for these spaces, as training writes them."""
    config = ModelConfig(kind=default_model_kind(observation_space), hidden_sizes=(8, 8))
    network = build_actor_critic(config, observation_space, action_space,
                                 None if vocabulary is None else Vocabulary.from_list(vocabulary))
    return {"model_state": network.state_dict(), "model_config": model_config_dict(config, "actor_critic")}


def _save(path: Path, **overrides) -> None:
    arguments = dict(
        observation_space=gym.spaces.Box(-1.0, 1.0, (4,), np.float32),
        action_space=gym.spaces.Discrete(2),
        env_id="CartPole-v1",
        algorithm="bc",
    )
    arguments.update(overrides)
    arguments = {**_network_fields(arguments["observation_space"], arguments["action_space"],
                                   arguments.get("vocabulary")), **arguments}
    save_checkpoint(path, **arguments)


def test_round_trip_box_discrete_with_optimizer_state(tmp_path: Path):
    model, optimizer = _trained_linear()
    observation_space = gym.spaces.Box(
        low=np.array([-np.inf, -2.5, 0.0], dtype=np.float32),
        high=np.array([np.inf, 2.5, 1.0], dtype=np.float32),
        dtype=np.float32,
    )
    action_space = gym.spaces.Discrete(5)
    path = tmp_path / "run" / "best.pt"
    fields = _network_fields(observation_space, action_space)
    save_checkpoint(
        path,
        **fields,
        observation_space=observation_space,
        action_space=action_space,
        env_id="LunarLander-v3",
        algorithm="ppo",
        extra={"optimizer": optimizer.state_dict(), "global_step": 1234},
    )
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind

    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == CHECKPOINT_FORMAT_VERSION

    checkpoint = load_checkpoint(path)
    assert checkpoint.path == path
    assert checkpoint.format_version == CHECKPOINT_FORMAT_VERSION
    assert checkpoint.env_id == "LunarLander-v3"
    assert checkpoint.algorithm == "ppo"
    assert checkpoint.vocabulary is None
    assert checkpoint.model_config == fields["model_config"]
    assert checkpoint.observation_space == observation_space
    assert checkpoint.observation_space.dtype == np.float32
    assert np.isneginf(checkpoint.observation_space.low[0])
    assert checkpoint.action_space == action_space
    assert checkpoint.extra["global_step"] == 1234

    for name, tensor in fields["model_state"].items():
        assert torch.equal(checkpoint.model_state[name], tensor)
    restored = nn.Linear(4, 2)

    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=1e-3)
    restored_optimizer.load_state_dict(checkpoint.extra["optimizer"])
    original_state = optimizer.state_dict()["state"]
    loaded_state = restored_optimizer.state_dict()["state"]
    assert original_state.keys() == loaded_state.keys()
    for index in original_state:
        assert torch.equal(loaded_state[index]["exp_avg"], original_state[index]["exp_avg"])
        assert torch.equal(loaded_state[index]["exp_avg_sq"], original_state[index]["exp_avg_sq"])


def test_round_trip_continuous_action_box(tmp_path: Path):
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    _save(tmp_path / "last.pt", action_space=action_space)
    loaded = load_checkpoint(tmp_path / "last.pt").action_space
    assert loaded == action_space and loaded.shape == (2,)


def test_round_trip_babyai_dict_space(tmp_path: Path):
    env = make_env("BabyAI-GoToLocal-v0")
    observation, _ = env.reset(seed=0)
    vocabulary = ["<pad>", "go", "to", "the", "red", "ball"]
    _save(
        tmp_path / "best.pt",
        observation_space=env.observation_space,
        action_space=env.action_space,
        env_id="BabyAI-GoToLocal-v0",
        vocabulary=vocabulary,
    )
    checkpoint = load_checkpoint(tmp_path)
    space = checkpoint.observation_space
    assert isinstance(space, gym.spaces.Dict)
    assert list(space.spaces) == list(env.observation_space.spaces)
    assert space["image"] == env.observation_space["image"]
    assert space["image"].dtype == np.uint8 and space["image"].shape == (7, 7, 3)
    assert space["direction"] == env.observation_space["direction"]
    assert isinstance(space["mission"], gym.spaces.Text)
    assert space.contains(observation), observation["mission"]
    assert checkpoint.action_space == env.action_space
    assert checkpoint.vocabulary == vocabulary
    env.close()


def test_space_dicts_are_plain_python():
    description = space_to_dict(gym.spaces.Dict({"a": gym.spaces.Discrete(3), "b": gym.spaces.Box(0, 1, (2,))}))
    assert description == {
        "type": "dict",
        "spaces": {
            "a": {"type": "discrete", "n": 3, "start": 0},
            "b": {"type": "box", "low": [0.0, 0.0], "high": [1.0, 1.0], "shape": [2], "dtype": "float32"},
        },
    }
    assert type(description["spaces"]["a"]["n"]) is int
    assert space_from_dict(description)["a"] == gym.spaces.Discrete(3)
    assert space_from_dict(space_to_dict(gym.spaces.Discrete(5, start=1))).start == 1


def test_unsupported_space_is_rejected(tmp_path: Path):
    with pytest.raises(MazerunError, match="MultiBinary"):
        _save(tmp_path / "x.pt", action_space=gym.spaces.MultiBinary(3))
    assert not (tmp_path / "x.pt").exists()


def test_non_plain_extra_fails_at_save(tmp_path: Path):
    with pytest.raises(TypeError, match="weights_only"):
        _save(tmp_path / "x.pt", extra={"rng": np.random.default_rng(0)})
    assert not (tmp_path / "x.pt").exists()


def test_run_dir_prefers_best_then_last(tmp_path: Path):
    _save(tmp_path / "last.pt", algorithm="last")
    assert load_checkpoint(tmp_path).path == tmp_path / "last.pt"
    _save(tmp_path / "best.pt", algorithm="best")
    checkpoint = load_checkpoint(str(tmp_path))
    assert checkpoint.path == tmp_path / "best.pt"
    assert checkpoint.algorithm == "best"


def test_missing_path(tmp_path: Path):
    missing = tmp_path / "nope" / "best.pt"
    with pytest.raises(MazerunError) as error:
        load_checkpoint(missing)
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message and "\n" not in message


def test_directory_without_checkpoint_lists_contents(tmp_path: Path):
    (tmp_path / "metrics.csv").write_text("step,group,metric,value\n")
    (tmp_path / ".hydra").mkdir()
    with pytest.raises(MazerunError) as error:
        load_checkpoint(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert ".hydra, metrics.csv" in message
    assert "training run's output directory" in message
    assert "\n" not in message


def test_empty_directory(tmp_path: Path):
    with pytest.raises(MazerunError, match="holds: nothing"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda path: path.write_bytes(b"definitely not a torch file"), id="garbage"),
        pytest.param(lambda path: path.write_bytes(b""), id="empty"),
        pytest.param(lambda path: torch.save(nn.Linear(2, 2), path), id="pickled-module"),
    ],
)
def test_corrupt_file_names_the_file(tmp_path: Path, write):
    path = tmp_path / "best.pt"
    write(path)
    with pytest.raises(MazerunError) as error:
        load_checkpoint(tmp_path)
    message = str(error.value)
    assert str(path) in message and "corrupt" in message and "\n" not in message


def test_truncated_checkpoint_names_the_file(tmp_path: Path):
    path = tmp_path / "best.pt"
    _save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MazerunError, match="corrupt") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_other_torch_file_is_not_a_mazerun_checkpoint(tmp_path: Path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(MazerunError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "not a mazerun checkpoint" in message


def test_format_version_mismatch_names_both_versions(tmp_path: Path):
    path = tmp_path / "best.pt"
    _save(path)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = CHECKPOINT_FORMAT_VERSION + 98
    torch.save(payload, path)
    with pytest.raises(MazerunError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message
    assert f"version {CHECKPOINT_FORMAT_VERSION + 98}" in message
    assert f"version {CHECKPOINT_FORMAT_VERSION};" in message
