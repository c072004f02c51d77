"""A trained network from a run's checkpoint, acting through the same runners as the experts."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch

from mazerun.checkpoint import load_checkpoint
from mazerun.errors import MazerunError
from mazerun.models import ModelConfig, ModelInput, Vocabulary, build_actor_critic, build_q_network, obs_to_tensor
from mazerun.policies.base import Policy


def build_network(
    network_type: str, values: dict, observation_space: gym.Space, action_space: gym.Space, vocabulary: Vocabulary | None
) -> torch.nn.Module:
    """The network a checkpoint describes, built from the package's own classes only."""
    builders = {"actor_critic": build_actor_critic, "q_network": build_q_network}
    if network_type not in builders:
        raise MazerunError(f"checkpoint network type {network_type!r} is unknown; retrain with this mazerun")
    return builders[network_type](ModelConfig(**values), observation_space, action_space, vocabulary)


def greedy_or_sampled(network: torch.nn.Module, observations: ModelInput, deterministic: bool) -> torch.Tensor:
    """Actions of an actor-critic (its own act) or a Q-network (argmax Q, or softmax-sampled)."""
    if hasattr(network, "act"):
        return network.act(observations, deterministic)
    q_values = network(observations)
    return q_values.argmax(dim=-1) if deterministic else torch.distributions.Categorical(logits=q_values).sample()


class TorchPolicy(Policy):
    """Greedy (or sampled) actions of the network saved in ``input_dir`` (best.pt, else last.pt)."""

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
        torch.set_num_threads(1)  # one small forward pass per step: threads only add overhead
        values = dict(checkpoint.model_config)
        self.vocabulary = Vocabulary.from_list(checkpoint.vocabulary) if checkpoint.vocabulary is not None else None
        self.network = build_network(
            values.pop("network"), values, checkpoint.observation_space, checkpoint.action_space, self.vocabulary
        )
        self.network.load_state_dict(checkpoint.model_state)
        self.network.eval()
        self.observation_space = checkpoint.observation_space
        self.deterministic = deterministic
        self.name = f"torch_policy:{checkpoint.algorithm}"

    def reset(self, env: gym.Env, seed: int | None) -> None:
        if seed is not None:
            torch.manual_seed(seed)

    @torch.no_grad()
    def act(self, observation: Any) -> Any:
        batch = obs_to_tensor(observation, self.observation_space, self.vocabulary, "cpu")
        action = greedy_or_sampled(self.network, batch, self.deterministic)[0].numpy()
        return int(action) if action.ndim == 0 else action
