"""Networks shared by BC, PPO, CQL, IQL, SAC and TD3+BC, and the conversion of env observations to their input.

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
from typing import Any, Iterable, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from mazerun.core.errors import MazerunError

ModelInput = Union[torch.Tensor, dict[str, torch.Tensor]]
"""Observations as networks read them: ``(B, ...)`` per step, ``(T, B, ...)`` for sequences."""

MODEL_KINDS = ("vector_obs", "minigrid")
MEMORY_KINDS = ("none", "gru", "lstm")
NETWORK_TYPES = ("actor_critic", "q_network", "squashed_gaussian", "tanh_deterministic", "tanh_mean_gaussian")
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
    film: bool = True
    """minigrid: the mission scales and shifts every conv channel (FiLM, as the BabyAI baselines
    do) instead of only joining the pooled image features; finding *the red ball* is then a
    product of mission and cell, which concatenation alone learns slowly."""
    memory: str = "none"
    """``"none"``, ``"gru"`` or ``"lstm"``: a recurrent core between encoder and trunk, whose
    state carries what the agent saw earlier in the episode (reset where an episode starts)."""
    memory_size: int = 128
    """Width of the recurrent core's state (an LSTM keeps two of them)."""

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
        if self.memory not in MEMORY_KINDS:
            raise MazerunError(f"unknown model.memory {self.memory!r}; use one of {', '.join(MEMORY_KINDS)}")
        if self.memory_size <= 0:
            raise MazerunError(f"model.memory_size={self.memory_size} must be > 0")

    @property
    def recurrent(self) -> bool:
        return self.memory != "none"

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """A stored model config (a checkpoint's, without its ``network`` key).

        Checkpoints written before FiLM existed carry no ``film`` key and hold weights without it.
        """
        values = {key: value for key, value in values.items() if key != "network"}
        values.setdefault("film", False)
        return cls(**values)


KIND_ACTIVATIONS = {"vector_obs": "tanh", "minigrid": "relu"}
"""Each kind's trunk activation where the config leaves it unset (``model=auto``), as in ``conf/model/<kind>.yaml``:
tanh as SB3's and rl-zoo's PPO MLPs, ReLU as the BabyAI baselines."""

KIND_MEMORY = {"vector_obs": "none", "minigrid": "gru"}
"""Each kind's memory where the config leaves it unset (``model=auto``), as in ``conf/model/<kind>.yaml``. A
MiniGrid agent sees a 7x7 patch ahead of it, so what it saw a few steps ago (the ball behind it, the room it
searched) is gone unless a recurrent core keeps it: cloning the planner or the bot, a GRU scores 0.99 where a
feed-forward network scores 0.94 (10k demos on GoToRedBallGrey and GoToLocal, README). Vector tasks (LunarLander,
MuJoCo) observe their whole state."""


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


def layer_init(layer: nn.Module, gain: float = math.sqrt(2), orthogonal: bool = True) -> nn.Module:
    """Orthogonal weights and zero bias, as in CleanRL/SB3's PPO; ``orthogonal=False`` keeps torch's default.

    Policies and critics trained by PPO and BC start orthogonal. Q- and V-networks keep torch's
    default (uniform within 1/sqrt(fan_in)), as SB3's DQN and d3rlpy do: orthogonal layers with
    a unit-gain head start with Q-values several times larger, and on LunarLander's logged data
    CQL's return after 2,000 updates fell from 183 to 135 with them (bench/offline.py).
    """
    if orthogonal:
        nn.init.orthogonal_(layer.weight, gain)
        nn.init.zeros_(layer.bias)
    return layer


def mlp(input_dim: int, hidden_sizes: Sequence[int], activation: str, orthogonal: bool = True) -> tuple[nn.Sequential, int]:
    """Linear + activation layers, and their output size (``input_dim`` when there are none)."""
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        layers += [layer_init(nn.Linear(input_dim, size), orthogonal=orthogonal), ACTIVATIONS[activation]()]
        input_dim = size
    return nn.Sequential(*layers), input_dim


class ObservationEncoder(nn.Module):
    """Turns a batch of observations into a flat feature vector of size :attr:`output_dim`.

    vector_obs: standardise (buffers ``obs_mean``/``obs_std``, identity by default) and clip.
    minigrid: read the mission tokens with a GRU; embed the image indices, two-layer conv (each
    layer's channels modulated by the mission with ``film``), max-pool to a 3x3 grid; embed the
    direction; concatenate the three. The MLP trunk lives in the networks that use the encoder.
    """

    def __init__(
        self, config: ModelConfig, observation_space: gym.Space, vocabulary: Vocabulary | None = None,
        orthogonal: bool = True,
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
            convs.append(layer_init(nn.Conv2d(in_channels, out_channels, 3, padding=1), orthogonal=orthogonal))
            in_channels = out_channels
        pooled = min(IMAGE_POOLED_GRID, height), min(IMAGE_POOLED_GRID, width)
        self.film = config.film
        if config.film:
            self.image_convs = nn.ModuleList(convs)
            # Zero-initialised: every channel starts unmodulated (scale 1, shift 0).
            self.film_layers = nn.ModuleList(
                layer_init(nn.Linear(config.mission_dim, 2 * conv.out_channels), gain=0.0) for conv in convs
            )
            self.image_pool = nn.Sequential(nn.AdaptiveMaxPool2d(pooled), nn.Flatten())
        else:
            layers: list[nn.Module] = []
            for conv in convs:
                layers += [conv, nn.ReLU()]
            self.image_net = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(pooled), nn.Flatten())
        self.direction_embedding = nn.Embedding(int(observation_space["direction"].n), config.direction_dim)
        self.mission_embedding = nn.Embedding(len(vocabulary), config.mission_dim, padding_idx=Vocabulary.PAD)
        self.mission_gru = nn.GRU(config.mission_dim, config.mission_dim, batch_first=True)
        self.output_dim = in_channels * pooled[0] * pooled[1] + config.direction_dim + config.mission_dim

    def set_normalization(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        """Standardise inputs with these statistics (e.g. :func:`mazerun.data.tensors.observation_stats`)."""
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
        tokens = obs["mission"]
        outputs, _ = self.mission_gru(self.mission_embedding(tokens))
        # The GRU state after the last real word; padding only ever follows the words.
        last = (tokens != Vocabulary.PAD).sum(dim=1).clamp(min=1) - 1
        # A gather rather than indexing by ``arange(len(tokens))``: an exported graph keeps the batch size free.
        mission = outputs.gather(1, last[:, None, None].expand(-1, 1, outputs.shape[2])).squeeze(1)
        # (B, H, W, C) indices -> one embedding per channel, summed -> (B, E, H, W)
        cells = self.image_embedding(obs["image"].long() + self.image_offsets).sum(dim=3).permute(0, 3, 1, 2)
        if self.film:
            for conv, film in zip(self.image_convs, self.film_layers):
                scale, shift = film(mission)[:, :, None, None].chunk(2, dim=1)
                cells = torch.relu(conv(cells) * (1.0 + scale) + shift)
            image = self.image_pool(cells)
        else:
            image = self.image_net(cells)
        direction = self.direction_embedding(obs["direction"])
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


class Memory(nn.Module):
    """A GRU or LSTM over per-step features whose state restarts at zero where an episode starts.

    The state of a batch is one tensor ``(B, state_size)`` (an LSTM's ``h`` and ``c`` side by
    side), so it can be stored, indexed and reset like any other column. Sequences are stepped
    one time step at a time with the cell, which gives the state after every step: recurrent
    value learning needs it to score each transition's next observation from the right state.
    """

    def __init__(self, kind: str, input_dim: int, size: int) -> None:
        super().__init__()
        self.kind, self.size = kind, size
        self.cell = nn.GRUCell(input_dim, size) if kind == "gru" else nn.LSTMCell(input_dim, size)
        self.state_size = size if kind == "gru" else 2 * size

    def step(self, features: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of ``(N, F)`` features from ``(N, S)`` states; the output and the new state."""
        if self.kind == "gru":
            hidden = self.cell(features, state)
            return hidden, hidden
        hidden, cell = self.cell(features, (state[:, : self.size], state[:, self.size :]))
        return hidden, torch.cat([hidden, cell], dim=1)

    def forward(
        self, features: torch.Tensor, starts: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs ``(T, B, H)`` and the state after every step ``(T, B, S)`` of ``(T, B, F)`` features.

        ``starts[t]`` marks sequences whose step ``t`` is the first of an episode: their state is
        zeroed before that step, so nothing crosses an episode boundary.
        """
        keep = (~starts).unsqueeze(-1).to(features.dtype)
        outputs, states = [], []
        for t in range(features.shape[0]):
            output, state = self.step(features[t], state * keep[t])
            outputs.append(output)
            states.append(state)
        return torch.stack(outputs), torch.stack(states)


def _flatten(obs: ModelInput, dims: int) -> tuple[ModelInput, tuple[int, ...]]:
    """Observations with their ``dims`` leading dimensions merged into one, and those dimensions."""
    if isinstance(obs, dict):
        lead = next(iter(obs.values())).shape[:dims]
        return {key: value.reshape(-1, *value.shape[dims:]) for key, value in obs.items()}, tuple(lead)
    return obs.reshape(-1, *obs.shape[dims:]), tuple(obs.shape[:dims])


class Torso(nn.Module):
    """Encoder, optional memory and MLP trunk: the part every network (actor, critic, Q, V) shares.

    ``forward`` reads single steps without memory; :meth:`sequence` reads ``(T, B, ...)``
    sequences with or without it, and :meth:`next_step` reads one more observation from the
    states a sequence left (the next observation of each transition).
    """

    def __init__(self, config: ModelConfig, observation_space: gym.Space, vocabulary: Vocabulary | None,
                 orthogonal: bool = True) -> None:
        super().__init__()
        self.encoder = ObservationEncoder(config, observation_space, vocabulary, orthogonal)
        width = self.encoder.output_dim
        self.memory = Memory(config.memory, width, config.memory_size) if config.recurrent else None
        if self.memory is not None:
            width = config.memory_size
        self.trunk, self.output_dim = mlp(width, config.hidden_sizes, config.activation, orthogonal)
        self.state_size = 0 if self.memory is None else self.memory.state_size

    def forward(self, obs: ModelInput) -> torch.Tensor:
        return self.trunk(self.encoder(obs))

    def sequence(
        self, obs: ModelInput, starts: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(T, B, D)`` and states after each step ``(T, B, S)`` (``S = 0`` without memory)."""
        flat, (steps, batch) = _flatten(obs, 2)
        features = self.encoder(flat).view(steps, batch, -1)
        if self.memory is None:
            return self.trunk(features), state.new_zeros(steps, batch, 0)
        outputs, states = self.memory(features, starts, state)
        return self.trunk(outputs), states

    def next_step(self, obs: ModelInput, states: torch.Tensor) -> torch.Tensor:
        """Features ``(T, B, D)`` of ``(T, B, ...)`` observations, each read from the state beside it."""
        flat, (steps, batch) = _flatten(obs, 2)
        features = self.encoder(flat)
        if self.memory is not None:
            features, _ = self.memory.step(features, states.reshape(steps * batch, -1))
        return self.trunk(features).view(steps, batch, -1)

    def set_normalization(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        self.encoder.set_normalization(mean, std)


class Recurrent:
    """What networks with a :class:`Torso` share about state: its size, its zeros, acting step by step."""

    state_size: int

    def initial_state(self, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(batch, self.state_size, device=device)

    @property
    def recurrent(self) -> bool:
        return self.state_size > 0


class ActorCritic(Recurrent, nn.Module):
    """A policy and a state-value function with separate encoders, memories and trunks.

    Sharing nothing keeps the value loss from disturbing the policy features (it matters for
    PPO on LunarLander) and lets BC train the actor alone; the critic stays at its
    initialisation until PPO trains it. With memory, the state is the actor's and the
    critic's side by side, ``(B, actor + critic state)``.
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
        # Flat names (actor_encoder, actor_trunk, ...) keep checkpoints of earlier releases loadable.
        actor = Torso(config, observation_space, vocabulary)
        self.actor_encoder, self.actor_memory, self.actor_trunk = actor.encoder, actor.memory, actor.trunk
        self.policy_head = layer_init(nn.Linear(actor.output_dim, action_dim), gain=0.01)
        critic = Torso(config, observation_space, vocabulary)
        self.critic_encoder, self.critic_memory, self.critic_trunk = critic.encoder, critic.memory, critic.trunk
        self.value_head = layer_init(nn.Linear(critic.output_dim, 1), gain=1.0)
        self._torsos = (actor, critic)  # views of the modules above, kept out of the state dict
        self.actor_state_size = actor.state_size
        self.state_size = actor.state_size + critic.state_size

        if not self.discrete:
            # State-independent exploration noise, as in CleanRL/SB3's continuous PPO.
            self.log_std = nn.Parameter(torch.zeros(action_dim))
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def __setattr__(self, name: str, value: object) -> None:
        if name == "_torsos":  # plain attribute: registering the torsos would duplicate every weight name
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def set_normalization(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        """Standardise the observations of both actor and critic with the same statistics."""
        self.actor_encoder.set_normalization(mean, std)
        self.critic_encoder.set_normalization(mean, std)

    def actor_parameters(self) -> list[nn.Parameter]:
        """The parameters that act (encoder, memory, trunk, head, log-std): what imitation trains."""
        return [parameter for name, parameter in self.named_parameters() if not name.startswith(CRITIC_PREFIXES)]

    def head_distribution(self, out: torch.Tensor) -> Distribution:
        """The policy whose parameters the policy head output: logits, or the means of a Gaussian with ``log_std``."""
        # Argument validation would read a GPU flag back to the host on every call (a sync per
        # training step); actions are checked once against the action space when data is loaded.
        if self.discrete:
            return Categorical(logits=out, validate_args=False)
        normal = Normal(out, self.log_std.exp().expand_as(out), validate_args=False)
        return Independent(normal, 1, validate_args=False)

    def distribution(self, obs: ModelInput) -> Distribution:
        """``Categorical`` over discrete actions, or a diagonal ``Normal`` (``Independent``) for Box."""
        return self.head_distribution(self.policy_head(self.actor_trunk(self.actor_encoder(obs))))

    def value(self, obs: ModelInput) -> torch.Tensor:
        """State values ``(B,)``."""
        return self.value_head(self.critic_trunk(self.critic_encoder(obs))).squeeze(-1)

    def forward(self, obs: ModelInput) -> tuple[Distribution, torch.Tensor]:
        return self.distribution(obs), self.value(obs)

    def split_state(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return state[..., : self.actor_state_size], state[..., self.actor_state_size :]

    def distribution_sequence(
        self, obs: ModelInput, starts: torch.Tensor, state: torch.Tensor
    ) -> tuple[Distribution, torch.Tensor]:
        """The policy at every step of ``(T, B, ...)`` sequences, and the actor's states after each step."""
        features, states = self._torsos[0].sequence(obs, starts, self.split_state(state)[0])
        return self.head_distribution(self.policy_head(features)), states

    def value_sequence(
        self, obs: ModelInput, starts: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values ``(T, B)`` of ``(T, B, ...)`` sequences, and the critic's states after each step."""
        features, states = self._torsos[1].sequence(obs, starts, self.split_state(state)[1])
        return self.value_head(features).squeeze(-1), states

    def next_value(self, obs: ModelInput, critic_states: torch.Tensor) -> torch.Tensor:
        """Values of ``(T, B, ...)`` observations read one step on from the critic's ``states``."""
        return self.value_head(self._torsos[1].next_step(obs, critic_states)).squeeze(-1)

    def step(
        self, obs: ModelInput, starts: torch.Tensor, state: torch.Tensor
    ) -> tuple[Distribution, torch.Tensor, torch.Tensor]:
        """Policy, value and new state of one step of ``(B, ...)`` observations (PPO's rollouts)."""
        single = _unsqueeze(obs)
        distribution, actor = self.distribution_sequence(single, starts[None], state)
        values, critic = self.value_sequence(single, starts[None], state)
        return _squeeze(distribution), values[0], torch.cat([actor[0], critic[0]], dim=-1)

    @torch.no_grad()
    def act(self, obs: ModelInput, deterministic: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Actions to send to the environment: the mode (argmax / mean) or a sample (networks without memory)."""
        return self._action(self.distribution(obs), deterministic, generator)

    @torch.no_grad()
    def act_step(
        self, obs: ModelInput, state: torch.Tensor, starts: torch.Tensor, deterministic: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions for one step of ``(B, ...)`` observations from ``state``, and the new state.

        Only the actor's part of the state moves: acting needs no value.
        """
        if not self.recurrent:
            return self.act(obs, deterministic, generator), state
        distribution, actor = self.distribution_sequence(_unsqueeze(obs), starts[None], state)
        actions = self._action(_squeeze(distribution), deterministic, generator)
        return actions, torch.cat([actor[0], self.split_state(state)[1]], dim=-1)

    def _action(self, dist: Distribution, deterministic: bool, generator: torch.Generator | None) -> torch.Tensor:
        """The mode or a sample; continuous actions are clipped to the action space so that the env accepts them."""
        if deterministic:
            action = dist.logits.argmax(dim=-1) if self.discrete else dist.mean
        else:
            action = sample(dist, generator)
        return action if self.discrete else torch.clamp(action, self.action_low, self.action_high)


def _unsqueeze(obs: ModelInput) -> ModelInput:
    """One step as a sequence of length 1."""
    if isinstance(obs, dict):
        return {key: value[None] for key, value in obs.items()}
    return obs[None]


def _squeeze(distribution: Distribution) -> Distribution:
    """The distribution of the only step of a length-1 sequence."""
    if isinstance(distribution, Categorical):
        return Categorical(logits=distribution.logits[0], validate_args=False)
    normal = distribution.base_dist
    return Independent(Normal(normal.loc[0], normal.scale[0], validate_args=False), 1, validate_args=False)


def log_probs_and_entropies(distribution: Distribution, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``actions`` and the entropy of every row.

    A ``Categorical`` holds normalised log-probabilities already; reading them directly skips the
    broadcasting and clamping of the generic methods, a fifth of a small network's minibatch step.
    """
    if isinstance(distribution, Categorical):
        log_p = distribution.logits
        return log_p.gather(-1, actions.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
    return distribution.log_prob(actions), distribution.entropy()


def flatten_distribution(distribution: Distribution) -> Distribution:
    """A policy over ``(T, B)`` steps as one over ``T * B`` rows."""
    if isinstance(distribution, Categorical):
        return Categorical(logits=distribution.logits.flatten(0, 1), validate_args=False)
    normal = distribution.base_dist
    return Independent(Normal(normal.loc.flatten(0, 1), normal.scale.flatten(0, 1), validate_args=False), 1,
                       validate_args=False)


def sample(distribution: Distribution, generator: torch.Generator | None) -> torch.Tensor:
    """A sample of a ``Categorical`` or diagonal ``Normal`` drawn from ``generator``.

    ``Distribution.sample`` draws from torch's global generator; a loop that owns its generator
    can save and restore it, so a continued run samples exactly what the uninterrupted one would,
    and two learners in one process never disturb each other's streams.
    """
    if isinstance(distribution, Categorical):
        probs = distribution.probs
        return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
    normal = distribution.base_dist if isinstance(distribution, Independent) else distribution
    noise = torch.randn(normal.loc.shape, generator=generator, device=normal.loc.device, dtype=normal.loc.dtype)
    return normal.loc + normal.scale * noise


def sample_with_noise(distribution: Distribution, noise: torch.Tensor) -> torch.Tensor:
    """A sample of a ``Categorical`` or diagonal ``Normal`` made from ``noise`` drawn beforehand: one uniform in
    ``[0, 1)`` per row (the inverse of the cumulative distribution), or one standard normal per action dimension.

    A rollout draws all of its noise in one call, and a loop acting in numpy
    (:class:`mazerun.fast.array_actor.ArrayActor`) turns the same noise into the same actions.
    """
    if isinstance(distribution, Categorical):
        cumulative = distribution.probs.cumsum(-1)
        return (cumulative[..., :-1] <= noise.unsqueeze(-1) * cumulative[..., -1:]).sum(-1)
    normal = distribution.base_dist if isinstance(distribution, Independent) else distribution
    return normal.loc + normal.scale * noise


class QNetwork(Recurrent, Torso):
    """Q-values of every discrete action: encoder, optional memory, MLP trunk, one output per action."""

    def __init__(
        self,
        config: ModelConfig,
        observation_space: gym.Space,
        action_space: gym.Space,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        if not isinstance(action_space, gym.spaces.Discrete):
            raise MazerunError(
                f"CQL and IQL learn Q-values of discrete actions and the action space is {action_space}; "
                "use algorithm=bc or algorithm=ppo for continuous actions"
            )
        _check_action_space(action_space)
        super().__init__(config, observation_space, vocabulary, orthogonal=False)  # see layer_init
        self.head = nn.Linear(self.output_dim, int(action_space.n))

    def forward(self, obs: ModelInput) -> torch.Tensor:
        """Q-values ``(B, n_actions)`` (networks without memory)."""
        return self.head(super().forward(obs))

    def q_sequence(self, obs: ModelInput, starts: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-values ``(T, B, A)`` of sequences, and the states after each step."""
        features, states = self.sequence(obs, starts, state)
        return self.head(features), states

    def next_q(self, obs: ModelInput, states: torch.Tensor) -> torch.Tensor:
        """Q-values ``(T, B, A)`` of next observations, each read one step on from its transition's state."""
        return self.head(self.next_step(obs, states))

    @torch.no_grad()
    def act(self, obs: ModelInput, deterministic: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy in Q, or sampled from the softmax of the Q-values (networks without memory)."""
        return self._action(self(obs), deterministic, generator)

    @torch.no_grad()
    def act_step(
        self, obs: ModelInput, state: torch.Tensor, starts: torch.Tensor, deterministic: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.recurrent:
            return self.act(obs, deterministic, generator), state
        q_values, states = self.q_sequence(_unsqueeze(obs), starts[None], state)
        return self._action(q_values[0], deterministic, generator), states[0]

    @staticmethod
    def _action(q_values: torch.Tensor, deterministic: bool, generator: torch.Generator | None) -> torch.Tensor:
        if deterministic:
            return q_values.argmax(dim=-1)
        return sample(Categorical(logits=q_values, validate_args=False), generator)


class ValueNetwork(Recurrent, Torso):
    """State values V(s): encoder, optional memory, MLP trunk and one output."""

    def __init__(self, config: ModelConfig, observation_space: gym.Space, vocabulary: Vocabulary | None = None) -> None:
        super().__init__(config, observation_space, vocabulary, orthogonal=False)  # see layer_init
        self.head = nn.Linear(self.output_dim, 1)

    def forward(self, obs: ModelInput) -> torch.Tensor:
        """Values ``(B,)`` (networks without memory)."""
        return self.head(super().forward(obs)).squeeze(-1)

    def v_sequence(self, obs: ModelInput, starts: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, states = self.sequence(obs, starts, state)
        return self.head(features).squeeze(-1), states

    def next_v(self, obs: ModelInput, states: torch.Tensor) -> torch.Tensor:
        return self.head(self.next_step(obs, states)).squeeze(-1)


LOG_STD_BOUNDS = (-20.0, 2.0)
"""The squashed Gaussian's log-std is clamped to this range, as in SB3's and CleanRL's SAC."""


def squashed_log_prob(mean: torch.Tensor, log_std: torch.Tensor, pre_squash: torch.Tensor,
                      epsilon: float = 0.0) -> torch.Tensor:
    """``log pi(tanh(u))`` of ``u ~ N(mean, exp(log_std))``, summed over the action dimensions: the Gaussian's
    log-density of ``u`` minus ``sum log(1 - tanh(u)^2 + epsilon)``, the change of variables through tanh.

    ``epsilon`` 0 (d3rlpy's form): ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))``, exact and finite where
    ``tanh(u)`` rounds to +-1. SB3's SAC adds ``epsilon`` = 1e-6 inside the log instead: about
    ``epsilon / (1 - tanh(u)^2)`` more, which caps the correction at ``log(epsilon)`` per dimension past ``|u|`` of
    about 7, where a wider Gaussian then counts as more entropy.
    """
    gaussian = Normal(mean, log_std.exp(), validate_args=False).log_prob(pre_squash)
    if epsilon > 0.0:
        correction = torch.log(1.0 - torch.tanh(pre_squash).square() + epsilon)
    else:
        correction = 2.0 * (math.log(2.0) - pre_squash - nn.functional.softplus(-2.0 * pre_squash))
    return (gaussian - correction).sum(-1)


class TanhPolicy(Recurrent, nn.Module):
    """A deterministic policy for a 1-D Box (TD3+BC's): a head's output ``u`` squashed by tanh into the box,
    ``a = centre + half_width * tanh(u)``.

    The encoder, trunk and head carry :class:`ActorCritic`'s names (``actor_encoder``, ``actor_trunk``,
    ``policy_head``), so a clone's weights load into it. Layers keep torch's default initialisation, as
    SB3's and d3rlpy's actors do. No memory: it acts on each observation alone.
    """

    def __init__(
        self, config: ModelConfig, observation_space: gym.Space, action_space: gym.Space,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1):
            raise MazerunError(f"a tanh-squashed policy acts in 1-D Box action spaces, not {action_space}; "
                               "use algorithm=ppo for discrete actions")
        if config.recurrent:
            raise MazerunError(f"model.memory={config.memory}: the tanh-squashed policies (SAC, TD3+BC) have no "
                               "memory; use model.memory=none")
        action_dim = int(action_space.shape[0])
        actor = Torso(config, observation_space, vocabulary, orthogonal=False)
        self.actor_encoder, self.actor_trunk = actor.encoder, actor.trunk
        self.policy_head = nn.Linear(actor.output_dim, action_dim)
        self.features_dim = actor.output_dim
        self.state_size = 0
        self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def set_normalization(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        self.actor_encoder.set_normalization(mean, std)

    def features(self, obs: ModelInput) -> torch.Tensor:
        return self.actor_trunk(self.actor_encoder(obs))

    def forward(self, obs: ModelInput) -> torch.Tensor:
        """Actions in [-1, 1], ``(B, A)``, before they are mapped onto the box."""
        return torch.tanh(self.policy_head(self.features(obs)))

    def to_env(self, squashed: torch.Tensor) -> torch.Tensor:
        """Actions in [-1, 1] mapped onto the env's box."""
        half_width = (self.action_high - self.action_low) / 2
        return self.action_low + half_width * (squashed + 1.0)

    @torch.no_grad()
    def act(self, obs: ModelInput, deterministic: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The policy's action (it has no other to sample)."""
        return self.to_env(self(obs))

    @torch.no_grad()
    def act_step(
        self, obs: ModelInput, state: torch.Tensor, starts: torch.Tensor, deterministic: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.act(obs, deterministic, generator), state


class SquashedGaussianPolicy(TanhPolicy):
    """SAC's policy: a Gaussian over ``u`` with a state-dependent std, squashed by tanh into the box; its mean is
    the :class:`TanhPolicy` it acts as at test time.

    Log-probabilities are those of ``tanh(u)`` in [-1, 1] (as SB3's), so the entropy target ``-dim(A)`` means
    the same for every box.
    """

    def __init__(
        self, config: ModelConfig, observation_space: gym.Space, action_space: gym.Space,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        super().__init__(config, observation_space, action_space, vocabulary)
        self.log_std_head = nn.Linear(self.features_dim, int(action_space.shape[0]))

    def gaussian(self, obs: ModelInput) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian's mean and clamped log-std over ``u``, ``(B, A)`` each."""
        features = self.features(obs)
        return self.policy_head(features), self.log_std_head(features).clamp(*LOG_STD_BOUNDS)

    def sample(self, obs: ModelInput, generator: torch.Generator | None = None,
               epsilon: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised actions in the env's box (gradients flow through the noise) and their log-probabilities
        ``(B,)`` (:func:`squashed_log_prob` with ``epsilon``); the noise is drawn from ``generator``."""
        mean, log_std = self.gaussian(obs)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.squash(mean, log_std, noise, epsilon)

    def squash(self, mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor,
               epsilon: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``u = mean + std * noise`` squashed into the env's box, and its log-probabilities: :meth:`sample` from
        standard normal ``noise`` drawn beforehand (of any leading shape that broadcasts against ``mean``, e.g.
        ``(N, B, A)`` for N actions per state)."""
        pre_squash = mean + log_std.exp() * noise
        return self.to_env(torch.tanh(pre_squash)), squashed_log_prob(mean, log_std, pre_squash, epsilon)

    @torch.no_grad()
    def act(self, obs: ModelInput, deterministic: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The squashed mean, or a sample: :meth:`sample`'s action from the same draw, without its log-probability
        (SAC acts once per env step)."""
        if deterministic:
            return super().act(obs, deterministic)
        mean, log_std = self.gaussian(obs)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.to_env(torch.tanh(mean + log_std.exp() * noise))


IQL_LOG_STD_RANGE = (-5.0, 2.0)
"""IQL's policy keeps its log-std inside this range through a sigmoid, as d3rlpy's ``NormalPolicy`` does."""


def bounded_log_std(logit: torch.Tensor) -> torch.Tensor:
    """``low + (high - low) * sigmoid(logit)`` over :data:`IQL_LOG_STD_RANGE`: every logit a log-std in range."""
    low, high = IQL_LOG_STD_RANGE
    return low + (high - low) * torch.sigmoid(logit)


def log_std_logit(log_std: torch.Tensor) -> torch.Tensor:
    """The logit :func:`bounded_log_std` maps to ``log_std`` (which must lie strictly inside the range)."""
    low, high = IQL_LOG_STD_RANGE
    return torch.logit((log_std - low) / (high - low))


class TanhMeanGaussianPolicy(TanhPolicy):
    """IQL's policy for a 1-D Box (CORL's ``GaussianPolicy``): a Gaussian over the env's actions whose mean is the
    :class:`TanhPolicy`'s squashed output and whose log-std is the same in every state: one logit per action
    dimension, mapped into [-5, 2] by a sigmoid (:func:`bounded_log_std`) as d3rlpy's IQL does. Unlike a clamp,
    the sigmoid never stops the log-std's gradient, and its steps are up to 7/4 of the logit's (on our Hopper
    datasets at 10k updates, 3 seeds: 973 against the clamp's 946 on medium, 365 against 353 on medium-replay;
    d3rlpy 862 and 470).

    Unlike :class:`SquashedGaussianPolicy` the noise comes after the squash, so ``log pi(a | s)`` of a recorded
    action is a plain Gaussian density, finite at the box's edges, which is what advantage-weighted regression
    maximises. It acts as its mean (greedy) or a sample clipped into the box.
    """

    def __init__(
        self, config: ModelConfig, observation_space: gym.Space, action_space: gym.Space,
        vocabulary: Vocabulary | None = None, log_std_init: float = -1.5,
    ) -> None:
        super().__init__(config, observation_space, action_space, vocabulary)
        self.log_std_logit = nn.Parameter(log_std_logit(torch.full((int(action_space.shape[0]),),
                                                                   float(log_std_init))))

    @property
    def log_std(self) -> torch.Tensor:
        """The Gaussian's log-std, ``(A,)``."""
        return bounded_log_std(self.log_std_logit)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A checkpoint written before the sigmoid holds the log-std itself (``log_std``, clamped to [-20, 2]): it
        loads as the logit of that log-std, brought inside the sigmoid's range."""
        legacy = state_dict.pop(prefix + "log_std", None)
        if legacy is not None and prefix + "log_std_logit" not in state_dict:
            low, high = IQL_LOG_STD_RANGE
            margin = 1e-3 * (high - low)
            state_dict[prefix + "log_std_logit"] = log_std_logit(legacy.clamp(low + margin, high - margin))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def distribution(self, obs: ModelInput) -> Distribution:
        """A diagonal ``Normal`` (``Independent``) over the env's actions."""
        mean = self.to_env(self(obs))
        std = self.log_std.exp().expand_as(mean)
        return Independent(Normal(mean, std, validate_args=False), 1, validate_args=False)

    @torch.no_grad()
    def act(self, obs: ModelInput, deterministic: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The mean, or a sample clipped into the box."""
        if deterministic:
            return super().act(obs, deterministic)
        return torch.clamp(sample(self.distribution(obs), generator), self.action_low, self.action_high)


class TwinQNetwork(nn.Module):
    """Two independent ``Q(s, a)`` for 1-D Box actions (clipped double Q): each an encoder, then an MLP over the
    encoded observation and the action, then one output. Torch's default initialisation, as SB3's critics."""

    def __init__(
        self, config: ModelConfig, observation_space: gym.Space, action_space: gym.Space,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        super().__init__()
        action_dim = int(action_space.shape[0])
        self.encoders = nn.ModuleList()
        self.trunks = nn.ModuleList()
        self.heads = nn.ModuleList()
        for _ in range(2):
            encoder = ObservationEncoder(config, observation_space, vocabulary, orthogonal=False)
            trunk, width = mlp(encoder.output_dim + action_dim, config.hidden_sizes, config.activation,
                               orthogonal=False)
            self.encoders.append(encoder)
            self.trunks.append(trunk)
            self.heads.append(nn.Linear(width, 1))

    def set_normalization(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        for encoder in self.encoders:
            encoder.set_normalization(mean, std)

    def forward(self, obs: ModelInput, actions: torch.Tensor) -> torch.Tensor:
        """Both Q-values of each row, ``(2, B)``."""
        return torch.stack([head(trunk(torch.cat([encoder(obs), actions], dim=-1))).squeeze(-1)
                            for encoder, trunk, head in zip(self.encoders, self.trunks, self.heads)])


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
    if network_type == "squashed_gaussian":
        return SquashedGaussianPolicy(config, observation_space, action_space, vocabulary)
    if network_type == "tanh_deterministic":
        return TanhPolicy(config, observation_space, action_space, vocabulary)
    if network_type == "tanh_mean_gaussian":
        return TanhMeanGaussianPolicy(config, observation_space, action_space, vocabulary)
    raise MazerunError(
        f"network type {network_type!r} is unknown (this mazerun builds {', '.join(NETWORK_TYPES)}); "
        "retrain with this mazerun"
    )
