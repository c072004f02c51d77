"""Networks on the spaces of the real environments, observation conversion, vocabulary."""

from __future__ import annotations

import io
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.distributions import Categorical, Independent

from mazerun.acting.envs import make_env
from mazerun.algorithms import algorithm_config
from mazerun.core.errors import MazerunError
from mazerun.nn.models import (
    ActorCritic,
    ModelConfig,
    Vocabulary,
    build_actor_critic,
    build_q_network,
    default_model_kind,
    obs_to_tensor,
)
from mazerun.training.runsetup import algorithm_activation, resolve_model_config

CONF = Path(__file__).resolve().parents[1] / "conf"

VECTOR = ModelConfig(kind="vector_obs", hidden_sizes=(32, 32))


def lunar_batch(env_id: str, count: int) -> tuple[gym.Env, np.ndarray]:
    env = make_env(env_id)
    observation, _ = env.reset(seed=0)
    env.action_space.seed(0)
    observations = [observation]
    for _ in range(count - 1):
        observation, *_ = env.step(env.action_space.sample())
        observations.append(observation)
    return env, np.stack(observations)


def babyai_missions(env: gym.Env, count: int) -> list[str]:
    return [env.reset(seed=seed)[0]["mission"] for seed in range(count)]


# --- vocabulary ---------------------------------------------------------------------------


def test_vocabulary_pads_and_marks_unknown_words() -> None:
    vocabulary = Vocabulary.build(["go to the red ball", "open the door, then go to a box"])
    assert vocabulary.to_list() == ["a", "ball", "box", "door", "go", "open", "red", "the", "then", "to"]
    assert len(vocabulary) == 12  # ten words + padding + unknown

    tokens = vocabulary.encode(["go to the red ball", "go to the GREEN key", "open"])
    assert tokens.dtype == torch.int64
    assert tokens.shape == (3, 5)
    assert tokens[0].tolist() == [6, 11, 9, 8, 3]
    assert tokens[1].tolist() == [6, 11, 9, Vocabulary.UNKNOWN, Vocabulary.UNKNOWN]
    assert tokens[2].tolist() == [7, Vocabulary.PAD, Vocabulary.PAD, Vocabulary.PAD, Vocabulary.PAD]
    # Punctuation and case are not words.
    assert vocabulary.encode(["Open the door, then"])[0].tolist() == [7, 9, 5, 10]


def test_vocabulary_encodes_tuples_arrays_and_single_strings_alike() -> None:
    vocabulary = Vocabulary.build(["pick up the key"])
    expected = vocabulary.encode(["pick up the key", "the key"])
    assert torch.equal(vocabulary.encode(("pick up the key", "the key")), expected)
    assert torch.equal(vocabulary.encode(np.array(["pick up the key", "the key"])), expected)
    assert torch.equal(vocabulary.encode("the key"), vocabulary.encode(["the key"]))
    assert vocabulary.encode([]).shape == (0, 1)


def test_vocabulary_tokenises_each_distinct_mission_once(monkeypatch: pytest.MonkeyPatch) -> None:
    vocabulary = Vocabulary.build(["go to the red ball", "pick up the key"])
    calls: list[str] = []
    tokenize = Vocabulary.tokenize
    counting = staticmethod(lambda mission: calls.append(mission) or tokenize(mission))
    monkeypatch.setattr(Vocabulary, "tokenize", counting)
    missions = ["go to the red ball", "pick up the key"] * 500
    first = vocabulary.encode(missions)
    again = vocabulary.encode(missions[:3])
    assert sorted(calls) == ["go to the red ball", "pick up the key"]
    assert torch.equal(again, first[:3])


def test_vocabulary_round_trips_through_a_weights_only_checkpoint() -> None:
    vocabulary = Vocabulary.build(["put the ball next to the purple box"])
    buffer = io.BytesIO()
    torch.save({"vocabulary": vocabulary.to_list()}, buffer)
    buffer.seek(0)
    restored = Vocabulary.from_list(torch.load(buffer, weights_only=True)["vocabulary"])
    missions = ["put the box next to the ball", "go to the purple door"]
    assert torch.equal(restored.encode(missions), vocabulary.encode(missions))


# --- model kinds and configs ----------------------------------------------------------------


def test_default_model_kind_follows_the_observation_space() -> None:
    assert default_model_kind(make_env("LunarLander-v3").observation_space) == "vector_obs"
    assert default_model_kind(make_env("BabyAI-GoToLocal-v0").observation_space) == "minigrid"
    with pytest.raises(MazerunError, match="Discrete.*vector_obs.*minigrid"):
        default_model_kind(gym.spaces.Discrete(5))
    with pytest.raises(MazerunError, match="vector_obs.*minigrid"):
        default_model_kind(gym.spaces.Box(0, 255, (84, 84, 3), np.uint8))


def test_model_auto_builds_what_the_kind_s_own_group_would() -> None:
    """model=auto leaves kind, activation and memory unset: BabyAI gets model=minigrid's ReLU trunk and GRU,
    LunarLander tanh and no memory."""
    auto = OmegaConf.load(CONF / "model" / "auto.yaml")
    for env_id, kind in (("BabyAI-GoToLocal-v0", "minigrid"), ("LunarLander-v3", "vector_obs")):
        own = OmegaConf.load(CONF / "model" / f"{kind}.yaml")
        resolved = resolve_model_config(OmegaConf.to_container(auto), make_env(env_id).observation_space)
        assert resolved == resolve_model_config(OmegaConf.to_container(own), make_env(env_id).observation_space)
    assert (resolved.activation, resolved.memory) == ("tanh", "none")
    grid = make_env("BabyAI-GoToLocal-v0").observation_space
    assert resolve_model_config(OmegaConf.to_container(auto), grid).memory == "gru"
    assert resolve_model_config({"memory": "none"}, grid).memory == "none"  # an explicit model.memory wins
    assert resolve_model_config({"memory": None}, grid, memory_allowed=False).memory == "none"  # hpo=evolution's
    chosen = resolve_model_config({"kind": None, "activation": "tanh"}, make_env("BabyAI-GoToLocal-v0").observation_space)
    assert chosen.activation == "tanh"  # an explicit model.activation wins
    lunar = make_env("LunarLanderContinuous-v3").observation_space
    assert resolve_model_config(OmegaConf.to_container(auto), lunar, "relu").activation == "relu"  # SAC's own
    assert resolve_model_config({"kind": None, "activation": "tanh"}, lunar, "relu").activation == "tanh"


def test_each_algorithm_names_its_reference_activation_for_its_actions() -> None:
    """SAC, TD3+BC and the Box variants of CQL and IQL take ReLU where model=auto leaves it unset (SB3's, d3rlpy's and
    CORL's networks); PPO, BC and the discrete CQL and IQL keep the model kind's own (tanh for vectors)."""
    box, discrete = make_env("Pendulum-v1").action_space, make_env("CartPole-v1").action_space
    for name in ("sac", "td3_bc", "cql", "iql"):
        assert algorithm_activation(algorithm_config({"name": name}), box) == "relu", name
    for name, actions in (("cql", discrete), ("iql", discrete), ("ppo", box), ("bc", box), ("dagger", box)):
        assert algorithm_activation(algorithm_config({"name": name}), actions) is None, name


def test_config_errors_name_the_choices() -> None:
    with pytest.raises(MazerunError, match="tanh, relu"):
        ModelConfig(kind="vector_obs", activation="gelu")
    with pytest.raises(MazerunError, match="vector_obs, minigrid"):
        ModelConfig(kind="atari")
    assert ModelConfig(kind="vector_obs", hidden_sizes=[64, 64]).hidden_sizes == (64, 64)
    env = make_env("LunarLander-v3")
    with pytest.raises(MazerunError, match="model.kind=vector_obs"):
        build_actor_critic(ModelConfig(kind="minigrid"), env.observation_space, env.action_space)


# --- LunarLander: vector observations -------------------------------------------------------


def test_discrete_actor_critic_and_q_network_on_lunar_lander() -> None:
    torch.manual_seed(0)
    env, observations = lunar_batch("LunarLander-v3", 6)
    config = VECTOR
    model = build_actor_critic(config, env.observation_space, env.action_space)

    single = obs_to_tensor(observations[0], env.observation_space, None, "cpu")
    assert single.shape == (1, 8) and single.dtype == torch.float32
    batch = obs_to_tensor(observations, env.observation_space, None, "cpu")
    assert batch.shape == (6, 8)

    dist, value = model(batch)
    assert isinstance(dist, Categorical)
    assert dist.logits.shape == (6, 4)
    assert value.shape == (6,)
    greedy = model.act(batch, deterministic=True)
    assert torch.equal(greedy, dist.logits.argmax(dim=1))
    sampled = model.act(batch, deterministic=False)
    assert sampled.shape == (6,) and env.action_space.contains(int(sampled[0]))

    q_network = build_q_network(config, env.observation_space, env.action_space)
    assert q_network(batch).shape == (6, 4)


def test_heads_use_cleanrl_orthogonal_gains() -> None:
    torch.manual_seed(0)
    env = make_env("LunarLander-v3")
    model = build_actor_critic(VECTOR, env.observation_space, env.action_space)
    policy = model.policy_head.weight
    assert torch.allclose(policy @ policy.T, 0.01**2 * torch.eye(4), atol=1e-7)
    value = model.value_head.weight
    assert torch.allclose(value @ value.T, torch.ones(1, 1), atol=1e-5)
    hidden = model.actor_trunk[0].weight  # (32, 8): orthonormal columns scaled by sqrt(2)
    assert torch.allclose(hidden.T @ hidden, 2 * torch.eye(8), atol=1e-5)
    assert torch.count_nonzero(model.policy_head.bias) == 0


def test_actor_loss_trains_the_actor_and_leaves_the_critic_alone() -> None:
    torch.manual_seed(0)
    env = make_env("LunarLander-v3")
    model = build_actor_critic(VECTOR, env.observation_space, env.action_space)
    obs = torch.randn(32, 8)
    actions = torch.randint(4, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = -model.distribution(obs).log_prob(actions).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert all(parameter.grad is None for parameter in model.critic_trunk.parameters())


def test_normalisation_buffers_are_applied_and_travel_in_the_state_dict() -> None:
    torch.manual_seed(0)
    env, observations = lunar_batch("LunarLander-v3", 4)
    config = VECTOR
    model = build_actor_critic(config, env.observation_space, env.action_space)
    obs = obs_to_tensor(observations, env.observation_space, None, "cpu")
    mean = torch.linspace(-1, 1, 8)
    std = torch.full((8,), 2.0)
    std[7] = 0.0  # a feature that never varied in the data
    model.set_normalization(mean, std)

    state = model.state_dict()
    for prefix in ("actor_encoder", "critic_encoder"):
        assert torch.equal(state[f"{prefix}.obs_mean"], mean)
        assert state[f"{prefix}.obs_std"][7].item() == pytest.approx(1e-6)
    features = model.actor_encoder(obs)
    assert torch.allclose(features[:, :7], (obs[:, :7] - mean[:7]) / 2.0)
    assert features.abs().max() <= 10.0

    restored = build_actor_critic(config, env.observation_space, env.action_space)
    assert not torch.equal(restored.actor_encoder.obs_mean, mean)
    restored.load_state_dict(state)
    assert torch.equal(restored.distribution(obs).logits, model.distribution(obs).logits)
    assert torch.equal(restored.value(obs), model.value(obs))

    q_network = build_q_network(config, env.observation_space, env.action_space)
    q_network.set_normalization(mean.numpy(), std.numpy())
    assert torch.equal(q_network.state_dict()["encoder.obs_mean"], mean)


# --- LunarLanderContinuous: Box actions -----------------------------------------------------


def test_gaussian_policy_on_lunar_lander_continuous() -> None:
    torch.manual_seed(0)
    env, observations = lunar_batch("LunarLanderContinuous-v3", 5)
    model = build_actor_critic(VECTOR, env.observation_space, env.action_space)
    obs = obs_to_tensor(observations, env.observation_space, None, "cpu")

    dist = model.distribution(obs)
    assert isinstance(dist, Independent)
    assert dist.batch_shape == (5,) and dist.event_shape == (2,)
    assert dist.log_prob(torch.zeros(5, 2)).shape == (5,)
    assert torch.allclose(dist.stddev, torch.ones(5, 2))  # log_std starts at 0
    assert model.log_std.requires_grad

    with torch.no_grad():
        model.policy_head.bias.fill_(3.0)  # means far outside the [-1, 1] action bounds
    greedy = model.act(obs, deterministic=True)
    assert torch.equal(greedy, torch.ones(5, 2))
    sampled = model.act(obs, deterministic=False)
    assert sampled.shape == (5, 2) and all(env.action_space.contains(action) for action in sampled.numpy())
    assert model.value(obs).shape == (5,)


def test_q_network_refuses_continuous_actions_and_names_the_alternatives() -> None:
    env = make_env("LunarLanderContinuous-v3")
    with pytest.raises(MazerunError, match="algorithm=bc or algorithm=ppo"):
        build_q_network(ModelConfig(kind="vector_obs"), env.observation_space, env.action_space)


def test_unsupported_action_spaces_are_refused() -> None:
    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    with pytest.raises(MazerunError, match="Discrete and 1-D Box"):
        build_actor_critic(ModelConfig(kind="vector_obs"), observation_space, gym.spaces.MultiBinary(3))
    with pytest.raises(MazerunError, match="starts at 1"):
        build_actor_critic(ModelConfig(kind="vector_obs"), observation_space, gym.spaces.Discrete(3, start=1))


# --- BabyAI: dict observations --------------------------------------------------------------


def babyai_config() -> ModelConfig:
    return ModelConfig(
        kind="minigrid", hidden_sizes=(32,), embedding_dim=8, image_channels=(8, 16), mission_dim=16
    )


def test_babyai_models_read_single_and_vectorised_observations() -> None:
    torch.manual_seed(0)
    env = make_env("BabyAI-GoToLocal-v0")
    vocabulary = Vocabulary.build(babyai_missions(env, 20))
    model = build_actor_critic(babyai_config(), env.observation_space, env.action_space, vocabulary)
    q_network = build_q_network(babyai_config(), env.observation_space, env.action_space, vocabulary)

    observation, _ = env.reset(seed=0)
    single = obs_to_tensor(observation, env.observation_space, vocabulary, "cpu")
    assert single["image"].shape == (1, 7, 7, 3) and single["image"].dtype == torch.uint8
    assert single["direction"].shape == (1,) and single["direction"].dtype == torch.int64
    assert single["mission"].shape == (1, len(Vocabulary.tokenize(observation["mission"])))
    assert Vocabulary.UNKNOWN not in single["mission"].tolist()[0]

    vector_env = gym.vector.SyncVectorEnv([lambda: make_env("BabyAI-GoToLocal-v0") for _ in range(3)])
    batch_observation, _ = vector_env.reset(seed=0)
    assert isinstance(batch_observation["mission"], tuple)
    batch = obs_to_tensor(batch_observation, vector_env.single_observation_space, vocabulary, "cpu")
    vector_env.close()
    assert batch["image"].shape == (3, 7, 7, 3)
    assert batch["direction"].shape == (3,)
    assert batch["mission"].shape[0] == 3

    dist, value = model(batch)
    assert dist.logits.shape == (3, env.action_space.n)
    assert value.shape == (3,)
    assert model.act(single, deterministic=True).shape == (1,)
    assert q_network(batch).shape == (3, env.action_space.n)
    # A record-style dict (mission array of str) converts the same way.
    as_arrays = {key: np.asarray(value) for key, value in batch_observation.items()}
    converted = obs_to_tensor(as_arrays, env.observation_space, vocabulary, "cpu")
    assert all(torch.equal(converted[key], batch[key]) for key in batch)


def test_babyai_features_depend_on_mission_but_not_on_padding() -> None:
    torch.manual_seed(0)
    env = make_env("BabyAI-GoToLocal-v0")
    vocabulary = Vocabulary.build(["go to the red ball", "go to the green box next to a very long word list"])
    model = build_actor_critic(babyai_config(), env.observation_space, env.action_space, vocabulary)
    observation, _ = env.reset(seed=0)

    def features(missions: list[str]) -> torch.Tensor:
        batch = {
            "image": np.repeat(observation["image"][None], len(missions), axis=0),
            "direction": np.full(len(missions), observation["direction"]),
            "mission": missions,
        }
        return model.actor_encoder(obs_to_tensor(batch, env.observation_space, vocabulary, "cpu"))

    alone = features(["go to the red ball"])
    padded = features(["go to the red ball", "go to the green box next to a very long word list"])
    assert torch.allclose(alone[0], padded[0], atol=1e-6)
    assert not torch.allclose(padded[0], padded[1])
    assert model.actor_encoder.output_dim == alone.shape[1]


def test_minigrid_model_needs_a_vocabulary() -> None:
    env = make_env("BabyAI-GoToLocal-v0")
    with pytest.raises(ValueError, match="vocabulary"):
        ActorCritic(babyai_config(), env.observation_space, env.action_space)
