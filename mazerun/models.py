"""Networks shared by BC, PPO, CQL and IQL, and the conversion of env observations to their input.

Two observation kinds are supported:

- ``vector_obs``: a 1-D ``Box`` (LunarLander, CartPole). The encoder standardises the vector
  with a mean/std kept as buffers, so the statistics of the demonstrations travel with the
  weights in every checkpoint.
- ``minigrid``: MiniGrid/BabyAI's dict of a symbolic ``image`` (object, colour, state indices
  per cell), the agent's ``direction`` and a ``mission`` string. Missions become token ids
  through a :class:`Vocabulary` that is stored next to the weights.

Model input is a float tensor ``(B, obs_dim)`` for vector observations, or a dict
``{"image": (B, H, W, C) uint8, "direction": (B,) long, "mission": (B, L) long}``;
:func:`obs_to_tensor` builds it from what gymnasium environments return.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from mazerun.errors import MazerunError

ModelInput = Union[torch.Tensor, dict[str, torch.Tensor]]

MODEL_KINDS = ("vector_obs", "minigrid")
NETWORK_TYPES = ("actor_critic", "q_network")
CRITIC_PREFIXES = ("critic_", "value_head")
"""Parameter names of an :class:`ActorCritic`'s value function; everything else acts."""
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}

NORMALIZED_OBS_CLIP = 10.0
"""Standardised observations are clipped to +-this (as SB3's VecNormalize does): a feature that
was constant in the demonstrations has std ~1e-6 and would otherwise explode at test time."""

IMAGE_INDEX_RANGE = 256
"""Rows of the image index embedding per channel: every uint8 value has its own row, so no
MiniGrid object/colour/state index (11/6/3 today) can ever fall outside the table."""

IMAGE_POOLED_GRID = 3
"""The conv features are max-pooled to this grid, which keeps the feature size fixed for any
``agent_view_size`` while still telling left/ahead/right and near/far apart."""


@dataclass
class ModelConfig:
    """Architecture of every network; plain values so it can be stored in a checkpoint."""

    kind: str
    """``"vector_obs"`` or ``"minigrid"``; :func:`default_model_kind` picks it from the env."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Widths of the MLP trunk of each network (actor, critic, Q)."""
    activation: str = "tanh"
    """``"tanh"`` or ``"relu"``, used in the MLP trunks."""
    embedding_dim: int = 32
    """minigrid: size of the embedding of each image cell's object/colour/state indices."""
    image_channels: tuple[int, ...] = (32, 64)
    """minigrid: output channels of the 3x3 convolutions over the embedded image."""
    direction_dim: int = 8
    """minigrid: size of the agent-direction embedding."""
    mission_dim: int = 64
    """minigrid: size of the mission word embeddings and of the GRU that reads them."""

    def __post_init__(self) -> None:
        # Hydra and checkpoints hand over lists; keep tuples so configs compare equal.
        self.hidden_sizes = tuple(int(size) for size in self.hidden_sizes)
        self.image_channels = tuple(int(size) for size in self.image_channels)
        if self.kind not in MODEL_KINDS:
            raise MazerunError(f"unknown model kind {self.kind!r}; use one of {', '.join(MODEL_KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise MazerunError(
                f"unknown activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}"
            )
        if not self.image_channels:
            raise MazerunError("model image_channels is empty; give at least one conv layer, e.g. [32, 64]")


def default_model_kind(observation_space: gym.Space) -> str:
    """The model kind that reads ``observation_space``."""
    if isinstance(observation_space, gym.spaces.Dict) and "image" in observation_space.spaces:
        return "minigrid"
    if isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1:
        return "vector_obs"
    raise MazerunError(
        f"no model reads observations from {observation_space}; model kinds available: "
        "vector_obs (1-D Box, e.g. LunarLander-v3), minigrid (Dict with image/direction/mission, "
        "e.g. BabyAI-GoToLocal-v0)"
    )


def _check_kind(kind: str, observation_space: gym.Space) -> None:
    expected = default_model_kind(observation_space)
    if kind != expected:
        raise MazerunError(
            f"model kind {kind!r} cannot read observations from {observation_space}; "
            f"set model.kind={expected} (or leave it unset to pick it from the environment)"
        )
    if kind == "minigrid":
        missing = {"image", "direction", "mission"} - set(observation_space.spaces)
        if missing:
            raise MazerunError(
                f"the minigrid model needs observation keys image, direction and mission; "
                f"{observation_space} lacks {', '.join(sorted(missing))}"
            )


class Vocabulary:
    """Word -> id for mission strings; id 0 pads, id 1 stands for words never seen in training.

    Missions repeat a lot (a BabyAI level has a few hundred distinct ones), so the token ids of
    each distinct string are computed once and cached.
    """

    PAD = 0
    UNKNOWN = 1
    _RESERVED = 2
    _WORD = re.compile(r"[a-z0-9]+")

    def __init__(self, words: Sequence[str] = ()) -> None:
        self._ids: dict[str, int] = {}
        for word in words:
            if word in self._ids:
                raise ValueError(f"word {word!r} appears twice in the vocabulary")
            self._ids[word] = len(self._ids) + self._RESERVED
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def tokenize(cls, mission: str) -> list[str]:
        """Lower-case words and numbers; punctuation (BabyAI's "open the door, then ...") is dropped."""
        return cls._WORD.findall(mission.lower())

    @classmethod
    def build(cls, missions: Iterable[str]) -> Vocabulary:
        """The vocabulary of every word in ``missions``, sorted so the ids do not depend on order."""
        words = {word for mission in set(missions) for word in cls.tokenize(str(mission))}
        return cls(sorted(words))

    def __len__(self) -> int:
        """Number of ids, padding and unknown included (the size of the embedding table)."""
        return len(self._ids) + self._RESERVED

    def to_list(self) -> list[str]:
        """The words in id order, for a ``weights_only`` checkpoint; :meth:`from_list` inverts it."""
        return list(self._ids)

    @classmethod
    def from_list(cls, words: Sequence[str]) -> Vocabulary:
        return cls(list(words))

    def _token_ids(self, mission: str) -> np.ndarray:
        ids = self._cache.get(mission)
        if ids is None:
            words = self.tokenize(mission)
            ids = np.array([self._ids.get(word, self.UNKNOWN) for word in words], dtype=np.int64)
            self._cache[mission] = ids
        return ids

    def encode(self, missions: Sequence[str] | np.ndarray) -> torch.Tensor:
        """Token ids ``(N, max_len)`` (int64), right-padded with 0; unknown words become 1.

        Each distinct mission is tokenised once, so encoding a whole dataset costs one
        ``np.unique`` plus a gather.
        """
        if isinstance(missions, str):
            missions = [missions]
        unique, inverse = np.unique(np.asarray(missions, dtype=str), return_inverse=True)
        rows = [self._token_ids(str(mission)) for mission in unique]
        width = max([1, *(len(row) for row in rows)])
        table = np.full((len(rows), width), self.PAD, dtype=np.int64)
        for index, row in enumerate(rows):
            table[index, : len(row)] = row
        return torch.from_numpy(table[inverse.reshape(-1)])


def obs_to_tensor(
    observations: np.ndarray | dict,
    observation_space: gym.Space,
    vocabulary: Vocabulary | None,
    device: torch.device | str,
) -> ModelInput:
    """One env observation or a batch of them (gymnasium vector envs) in the model's input format.

    A single observation gets a batch dimension of 1. Dict observations may carry their
    missions as one string, or a tuple/list/array of strings for a batch.
    """
    kind = default_model_kind(observation_space)
    if kind == "vector_obs":
        array = np.asarray(observations, dtype=np.float32)
        if array.ndim == len(observation_space.shape):
            array = array[None]
        return torch.as_tensor(array, device=device)
    if vocabulary is None:
        raise ValueError("minigrid observations need the mission vocabulary the model was built with")
    image = np.asarray(observations["image"], dtype=np.uint8)
    if image.ndim == len(observation_space["image"].shape):
        image = image[None]
    direction = np.asarray(observations["direction"], dtype=np.int64).reshape(-1)
    return {
        "image": torch.as_tensor(image, device=device),
        "direction": torch.as_tensor(direction, device=device),
        "mission": vocabulary.encode(observations["mission"]).to(device),
    }


def layer_init(layer: nn.Module, gain: float = math.sqrt(2)) -> nn.Module:
    """Orthogonal weights and zero bias, as in CleanRL/SB3's PPO."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(input_dim: int, hidden_sizes: Sequence[int], activation: str) -> tuple[nn.Sequential, int]:
    """Linear + activation layers, and their output size (``input_dim`` when there are none)."""
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        layers += [layer_init(nn.Linear(input_dim, size)), ACTIVATIONS[activation]()]
        input_dim = size
    return nn.Sequential(*layers), input_dim


class ObservationEncoder(nn.Module):
    """Turns a batch of observations into a flat feature vector of size :attr:`output_dim`.

    vector_obs: standardise (buffers ``obs_mean``/``obs_std``, identity by default) and clip.
    minigrid: embed the image indices, two-layer conv, max-pool to a 3x3 grid; embed the
    direction; read the mission tokens with a GRU; concatenate the three.
    The MLP trunk lives in the networks that use the encoder.
    """

    def __init__(
        self, config: ModelConfig, observation_space: gym.Space, vocabulary: Vocabulary | None = None
    ) -> None:
        super().__init__()
        _check_kind(config.kind, observation_space)
        self.kind = config.kind
        if self.kind == "vector_obs":
            (obs_dim,) = observation_space.shape
            self.register_buffer("obs_mean", torch.zeros(obs_dim))
            self.register_buffer("obs_std", torch.ones(obs_dim))
            self.output_dim = obs_dim
            return
        if vocabulary is None:
            raise ValueError("the minigrid model needs the mission vocabulary (see Vocabulary.build)")
        height, width, channels = observation_space["image"].shape
        self.register_buffer(
            "image_offsets", torch.arange(channels, dtype=torch.long) * IMAGE_INDEX_RANGE, persistent=False
        )
        self.image_embedding = nn.Embedding(channels * IMAGE_INDEX_RANGE, config.embedding_dim)
        convs: list[nn.Module] = []
        in_channels = config.embedding_dim
        for out_channels in config.image_channels:
            convs += [layer_init(nn.Conv2d(in_channels, out_channels, 3, padding=1)), nn.ReLU()]
            in_channels = out_channels
        pooled = min(IMAGE_POOLED_GRID, height), min(IMAGE_POOLED_GRID, width)
        self.image_net = nn.Sequential(*convs, nn.AdaptiveMaxPool2d(pooled), nn.Flatten())
        self.direction_embedding = nn.Embedding(int(observation_space["direction"].n), config.direction_dim)
        self.mission_embedding = nn.Embedding(len(vocabulary), config.mission_dim, padding_idx=Vocabulary.PAD)
        self.mission_gru = nn.GRU(config.mission_dim, config.mission_dim, batch_first=True)
        self.output_dim = in_channels * pooled[0] * pooled[1] + config.direction_dim + config.mission_dim

    def set_normalization(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        """Standardise inputs with these statistics (e.g. :func:`mazerun.data.observation_stats`)."""
        if self.kind != "vector_obs":
            raise ValueError("only vector observations are normalised")
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.obs_mean.shape or std.shape != self.obs_std.shape:
            raise ValueError(
                f"normalisation statistics of shape {tuple(mean.shape)}/{tuple(std.shape)} "
                f"for observations of shape {tuple(self.obs_mean.shape)}"
            )
        self.obs_mean.copy_(mean)
        self.obs_std.copy_(std.clamp(min=1e-6))

    def forward(self, obs: ModelInput) -> torch.Tensor:
        if self.kind == "vector_obs":
            normalized = (obs - self.obs_mean) / self.obs_std
            return normalized.clamp(-NORMALIZED_OBS_CLIP, NORMALIZED_OBS_CLIP)
        # (B, H, W, C) indices -> one embedding per channel, summed -> (B, E, H, W)
        cells = self.image_embedding(obs["image"].long() + self.image_offsets).sum(dim=3)
        image = self.image_net(cells.permute(0, 3, 1, 2))
        direction = self.direction_embedding(obs["direction"])
        tokens = obs["mission"]
        outputs, _ = self.mission_gru(self.mission_embedding(tokens))
        # The GRU state after the last real word; padding only ever follows the words.
        last = (tokens != Vocabulary.PAD).sum(dim=1).clamp(min=1) - 1
        mission = outputs[torch.arange(len(tokens), device=tokens.device), last]
        return torch.cat([image, direction, mission], dim=1)


def _check_action_space(action_space: gym.Space) -> None:
    if isinstance(action_space, gym.spaces.Discrete):
        if int(action_space.start) != 0:
            raise MazerunError(
                f"action space {action_space} starts at {action_space.start}; mazerun models "
                "support Discrete spaces starting at 0 (wrap the env to shift its actions)"
            )
        return
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return
    raise MazerunError(
        f"no model produces actions for {action_space}; mazerun supports Discrete and 1-D Box action spaces"
    )


class ActorCritic(nn.Module):
    """A policy and a state-value function with separate encoders and trunks.

    Sharing nothing keeps the value loss from disturbing the policy features (it matters for
    PPO on LunarLander) and lets BC train the actor alone; the critic stays at its
    initialisation until PPO trains it.
    """

    def __init__(
        self,
        config: ModelConfig,
        observation_space: gym.Space,
        action_space: gym.Space,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        super().__init__()
        _check_action_space(action_space)
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        action_dim = int(action_space.n) if self.discrete else int(action_space.shape[0])
        activation = config.activation

        self.actor_encoder = ObservationEncoder(config, observation_space, vocabulary)
        self.actor_trunk, actor_dim = mlp(self.actor_encoder.output_dim, config.hidden_sizes, activation)
        self.policy_head = layer_init(nn.Linear(actor_dim, action_dim), gain=0.01)

        self.critic_encoder = ObservationEncoder(config, observation_space, vocabulary)
        self.critic_trunk, critic_dim = mlp(self.critic_encoder.output_dim, config.hidden_sizes, activation)
        self.value_head = layer_init(nn.Linear(critic_dim, 1), gain=1.0)

        if not self.discrete:
            # State-independent exploration noise, as in CleanRL/SB3's continuous PPO.
            self.log_std = nn.Parameter(torch.zeros(action_dim))
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def set_normalization(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        """Standardise the observations of both actor and critic with the same statistics."""
        self.actor_encoder.set_normalization(mean, std)
        self.critic_encoder.set_normalization(mean, std)

    def actor_parameters(self) -> list[nn.Parameter]:
        """The parameters that act (encoder, trunk, head, log-std): what imitation trains."""
        return [parameter for name, parameter in self.named_parameters() if not name.startswith(CRITIC_PREFIXES)]

    def distribution(self, obs: ModelInput) -> Distribution:
        """``Categorical`` over discrete actions, or a diagonal ``Normal`` (``Independent``) for Box."""
        out = self.policy_head(self.actor_trunk(self.actor_encoder(obs)))
        # Argument validation would read a GPU flag back to the host on every call (a sync per
        # training step); actions are checked once against the action space when data is loaded.
        if self.discrete:
            return Categorical(logits=out, validate_args=False)
        normal = Normal(out, self.log_std.exp().expand_as(out), validate_args=False)
        return Independent(normal, 1, validate_args=False)

    def value(self, obs: ModelInput) -> torch.Tensor:
        """State values ``(B,)``."""
        return self.value_head(self.critic_trunk(self.critic_encoder(obs))).squeeze(-1)

    def forward(self, obs: ModelInput) -> tuple[Distribution, torch.Tensor]:
        return self.distribution(obs), self.value(obs)

    @torch.no_grad()
    def act(self, obs: ModelInput, deterministic: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Actions to send to the environment: the mode (argmax / mean) or a sample.

        Continuous actions are clipped to the action space's bounds so that the env accepts them.
        """
        dist = self.distribution(obs)
        if deterministic:
            action = dist.logits.argmax(dim=-1) if self.discrete else dist.mean
        else:
            action = sample(dist, generator)
        return action if self.discrete else torch.clamp(action, self.action_low, self.action_high)


def sample(distribution: Distribution, generator: torch.Generator | None) -> torch.Tensor:
    """A sample of a ``Categorical`` or diagonal ``Normal`` drawn from ``generator``.

    ``Distribution.sample`` draws from torch's global generator; a loop that owns its generator
    can save and restore it, so a continued run samples exactly what the uninterrupted one would,
    and two learners in one process never disturb each other's streams.
    """
    if isinstance(distribution, Categorical):
        return torch.multinomial(distribution.probs, 1, generator=generator).squeeze(-1)
    normal = distribution.base_dist if isinstance(distribution, Independent) else distribution
    noise = torch.randn(normal.loc.shape, generator=generator, device=normal.loc.device, dtype=normal.loc.dtype)
    return normal.loc + normal.scale * noise


class QNetwork(nn.Module):
    """Q-values of every discrete action: encoder, MLP trunk, one output per action."""

    def __init__(
        self,
        config: ModelConfig,
        observation_space: gym.Space,
        action_space: gym.Space,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(action_space, gym.spaces.Discrete):
            raise MazerunError(
                f"CQL and IQL learn Q-values of discrete actions and the action space is {action_space}; "
                "use algorithm=bc or algorithm=ppo for continuous actions"
            )
        _check_action_space(action_space)
        self.encoder = ObservationEncoder(config, observation_space, vocabulary)
        self.trunk, trunk_dim = mlp(self.encoder.output_dim, config.hidden_sizes, config.activation)
        self.head = layer_init(nn.Linear(trunk_dim, int(action_space.n)), gain=1.0)

    def set_normalization(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        self.encoder.set_normalization(mean, std)

    def forward(self, obs: ModelInput) -> torch.Tensor:
        """Q-values ``(B, n_actions)``."""
        return self.head(self.trunk(self.encoder(obs)))

    @torch.no_grad()
    def act(self, obs: ModelInput, deterministic: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy in Q, or sampled from the softmax of the Q-values."""
        q_values = self(obs)
        if deterministic:
            return q_values.argmax(dim=-1)
        return sample(Categorical(logits=q_values, validate_args=False), generator)


def build_actor_critic(
    config: ModelConfig,
    observation_space: gym.Space,
    action_space: gym.Space,
    vocabulary: Vocabulary | None = None,
) -> ActorCritic:
    return ActorCritic(config, observation_space, action_space, vocabulary)


def build_q_network(
    config: ModelConfig,
    observation_space: gym.Space,
    action_space: gym.Space,
    vocabulary: Vocabulary | None = None,
) -> QNetwork:
    return QNetwork(config, observation_space, action_space, vocabulary)


def build_network(
    network_type: str,
    config: ModelConfig,
    observation_space: gym.Space,
    action_space: gym.Space,
    vocabulary: Vocabulary | None = None,
) -> nn.Module:
    """The network a checkpoint describes, built from the package's own classes only."""
    if network_type == "actor_critic":
        return build_actor_critic(config, observation_space, action_space, vocabulary)
    if network_type == "q_network":
        return build_q_network(config, observation_space, action_space, vocabulary)
    raise MazerunError(
        f"network type {network_type!r} is unknown (this mazerun builds {', '.join(NETWORK_TYPES)}); "
        "retrain with this mazerun"
    )
