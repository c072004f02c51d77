"""An exported ONNX policy (``python -m mazerun.export``), run by onnxruntime through the same runners as the experts.

Rolling the file out where it will be used tests the artifact itself: its graph, and its
interface JSON as the only description of how to feed it (the mission vocabulary, the state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from mazerun.acting.policies.base import Policy
from mazerun.core.errors import MazerunError
from mazerun.nn.export import EPISODE_START_INPUT, STATE_INPUT, STATE_OUTPUT, read_interface, space_signature
from mazerun.nn.models import Vocabulary


def read_exported(path: str | Path) -> dict[str, Any]:
    """The interface JSON of an exported ONNX file, refused in one line when the file, or its JSON, is not one."""
    path = Path(path)
    if not path.is_file():
        raise MazerunError(f"policy.path={path} does not exist; pass an .onnx file written by "
                           "python -m mazerun.export <run dir> --format onnx")
    interface = read_interface(path)
    if interface["graph"] != "onnx":
        raise MazerunError(f"{path} is a {interface['graph']} export; policy=onnx runs the files of "
                           "python -m mazerun.export <run dir> --format onnx")
    return interface


class OnnxGraph:
    """An exported ONNX file and its interface JSON, run by onnxruntime on one thread.

    One small graph per step gains nothing from more threads, and the parallel runner already
    plays one worker per CPU.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.interface = read_exported(path)
        try:
            import onnxruntime
        except ImportError:
            raise MazerunError("policy=onnx needs onnxruntime: pip install 'mazerun[onnx]'") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: a run's stderr carries the run's own lines
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf for a damaged or foreign file
            reason = str(error).splitlines()[0][:200]
            raise MazerunError(f"{self.path} is not an ONNX model onnxruntime can load ({reason}); export the policy "
                               "again with python -m mazerun.export <run dir> --format onnx") from None
        self.input_names = [spec["name"] for spec in self.interface["inputs"]]
        self.output_names = [spec["name"] for spec in self.interface["outputs"]]
        graph_inputs = [node.name for node in self.session.get_inputs()]
        if graph_inputs != self.input_names:
            raise MazerunError(f"{self.path} takes inputs {', '.join(graph_inputs)}, but its "
                               f"{self.path.name}.json lists {', '.join(self.input_names)}; export the policy again")
        mission = self.interface["mission"]
        self.vocabulary = Vocabulary.from_list(mission["vocabulary"]) if mission is not None else None
        state = self.interface["state"]
        self.state_size = 0 if state is None else int(state["size"])

    def check_spaces(self, observation_space: gym.Space, action_space: gym.Space, env_id: str) -> None:
        """Refuse an env whose observations or actions are not the ones the graph was exported for."""
        for what, space in (("observation", observation_space), ("action", action_space)):
            expected = self.interface[f"{what}_space"]
            if space_signature(space) != expected:
                raise MazerunError(
                    f"{self.path} was exported for {what}s {expected} ({self.interface['env_id']}), but {env_id} has "
                    f"{space_signature(space)}; run it with env.name={self.interface['env_id']}")

    def feed(self, observations: Any, state: np.ndarray | None = None,
             episode_start: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The graph's inputs for a batch of env observations (an array, or a dict of arrays and mission strings)."""
        if self.vocabulary is None:
            inputs = {self.input_names[0]: np.asarray(observations, dtype=np.float32)}
        else:
            inputs = {"image": np.asarray(observations["image"], dtype=np.uint8),
                      "direction": np.asarray(observations["direction"], dtype=np.int64),
                      "mission": self.vocabulary.encode(observations["mission"]).numpy()}
        if self.state_size:
            inputs[STATE_INPUT] = np.asarray(state, dtype=np.float32)
            inputs[EPISODE_START_INPUT] = np.asarray(episode_start, dtype=bool)
        return inputs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's outputs by name."""
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))


def _batch_of_one(observation: Any) -> Any:
    if isinstance(observation, dict):
        return {key: [value] if isinstance(value, str) else np.asarray(value)[None]
                for key, value in observation.items()}
    return np.asarray(observation)[None]


class OnnxPolicy(Policy):
    """Greedy (or sampled) actions of an exported ONNX policy; a network with memory keeps its state per episode."""

    def __init__(self, path: str, env_id: str, observation_space: gym.Space, action_space: gym.Space,
                 deterministic: bool = True) -> None:
        self.graph = OnnxGraph(path)
        self.graph.check_spaces(observation_space, action_space, env_id)
        self.action_space = action_space
        self.deterministic = deterministic
        self.sampling = self.graph.interface["sampling"]
        self.name = f"onnx:{self.graph.interface['algorithm']}"
        self.state = np.zeros((1, self.graph.state_size), dtype=np.float32)
        self.episode_start = np.ones(1, dtype=bool)
        self.rng = np.random.default_rng()

    def reset(self, env: gym.Env, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)
        self.state[:] = 0.0
        self.episode_start[:] = True

    def act(self, observation: Any) -> Any:
        outputs = self.graph.run(self.graph.feed(_batch_of_one(observation), self.state, self.episode_start))
        self.episode_start[:] = False
        if self.graph.state_size:
            self.state = outputs[STATE_OUTPUT]
        action = outputs["action"][0] if self.deterministic else self._sample(outputs[self.sampling["parameters"]][0])
        return int(action) if np.ndim(action) == 0 else np.asarray(action, dtype=self.action_space.dtype)

    def _sample(self, parameters: np.ndarray) -> Any:
        """A draw from the policy the head's output parametrises, as the interface JSON describes it."""
        if self.sampling["distribution"] == "categorical":
            probabilities = np.exp(parameters - parameters.max())
            return self.rng.choice(len(parameters), p=probabilities / probabilities.sum())
        noise = self.rng.standard_normal(parameters.shape)
        action = parameters + np.exp(np.asarray(self.sampling["log_std"])) * noise
        return np.clip(action, self.action_space.low, self.action_space.high)
