"""A trained network from a run's checkpoint, acting through the same runners as the experts."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch

from mazerun.acting.policies.base import Policy
from mazerun.core.errors import MazerunError
from mazerun.nn.checkpoint import load_checkpoint, network_from_checkpoint
from mazerun.nn.models import Vocabulary, obs_to_tensor


class TorchPolicy(Policy):
    """Greedy (or sampled) actions of the network saved in ``input_dir`` (best.pt, else last.pt).

    A network with memory keeps its state through the episode and starts it afresh at each reset,
    so every runner (sequential or each parallel worker) carries one state per env copy.
    """

    name = "torch_policy"

    def __init__(self, input_dir: str, env_id: str, action_space: gym.Space, deterministic: bool = True) -> None:
        checkpoint = load_checkpoint(input_dir)
        if checkpoint.env_id != env_id:
            raise MazerunError(
                f"{checkpoint.path} was trained on {checkpoint.env_id}, not {env_id}; "
                f"drop the env override or use env.name={checkpoint.env_id}"
            )
        if checkpoint.action_space != action_space:
            raise MazerunError(
                f"{checkpoint.path} acts in {checkpoint.action_space} but {env_id} expects {action_space}"
            )
        self.vocabulary = Vocabulary.from_list(checkpoint.vocabulary) if checkpoint.vocabulary is not None else None
        self.network = network_from_checkpoint(checkpoint)
        self.observation_space = checkpoint.observation_space
        self.deterministic = deterministic
        self.generator = torch.Generator()
        self.name = f"torch_policy:{checkpoint.algorithm}"
        self.state = self.network.initial_state(1, "cpu")
        self.starts = torch.ones(1, dtype=torch.bool)

    def reset(self, env: gym.Env, seed: int | None) -> None:
        if seed is not None:
            self.generator.manual_seed(seed)
        self.state.zero_()
        self.starts.fill_(True)

    @torch.no_grad()
    def act(self, observation: Any) -> Any:
        batch = obs_to_tensor(observation, self.observation_space, self.vocabulary, "cpu")
        actions, self.state = self.network.act_step(batch, self.state, self.starts, self.deterministic, self.generator)
        self.starts.fill_(False)
        action = actions[0].numpy()
        return int(action) if action.ndim == 0 else action
