"""A trained network as files other tools read: one acting step as an ONNX or TorchScript graph, and a JSON beside it.

The graph holds everything that is arithmetic: observation normalisation, the mission reader,
the encoder, the recurrent core, the trunk and the head, and the greedy action (argmax of the
logits or Q-values, or the Gaussian mean clipped to the action bounds). What is not arithmetic
goes in the interface JSON (``<graph file>.json``): the inputs in order with their shapes and
dtypes, the mission vocabulary and how missions become token ids, the observation and action
spaces, the state size, and how to sample instead of acting greedily.

A network with memory takes its state and an ``episode_start`` flag as inputs and returns the
new state, so the caller owns the state as it owns the env: zeros at first, ``episode_start``
true on the first step of an episode (the graph then zeroes that row's state before the step,
as training did), and ``state_out`` fed back as ``state`` on the next step. An actor-critic
exports its actor alone: acting needs no value.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from torch import nn

from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write_bytes
from mazerun.nn.checkpoint import Checkpoint, network_from_checkpoint
from mazerun.nn.models import ActorCritic, QNetwork, Vocabulary

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_MARKER = "mazerun-policy"
"""Stored under ``"format"`` in the interface JSON, to tell it from other JSON files."""
EXPORT_FORMAT_VERSION = 1
"""Bumped whenever the graph's inputs or outputs, or the JSON's layout, change incompatibly."""
GRAPH_SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
"""What a default export file ends with; TorchScript is not ``.pt`` alone, which is the checkpoint's own name."""

MINIGRID_INPUTS = ("image", "direction", "mission")
"""A minigrid network's observation inputs, in graph order; each is the env observation's key of that name."""
VECTOR_INPUT = "observation"
STATE_INPUT, EPISODE_START_INPUT, STATE_OUTPUT = "state", "episode_start", "state_out"
BATCH, WORDS = "batch", "words"
"""The names of the free dimensions: any number of env copies, any number of words in a mission."""
EXAMPLE_BATCH = 2
"""Rows of the example inputs the graph is traced with: torch.export fixes a dimension whose example size is 1."""


class WindowMaxPool(nn.Module):
    """``nn.AdaptiveMaxPool2d`` for one input size, written as maxima over fixed windows.

    ONNX has no adaptive pooling, and neither exporter writes one whose output size does not
    divide the input size (MiniGrid's 7x7 view pooled to 3x3). The windows are the ones torch
    uses, rows ``floor(i * H / h)`` to ``ceil((i + 1) * H / h)``, and a maximum is exact, so the
    output is the same to the bit.
    """

    def __init__(self, input_size: tuple[int, int], output_size: tuple[int, int]) -> None:
        super().__init__()
        self.row_windows = _windows(input_size[0], output_size[0])
        self.column_windows = _windows(input_size[1], output_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([x[:, :, start:end].amax(dim=2) for start, end in self.row_windows], dim=2)
        return torch.stack([rows[..., start:end].amax(dim=-1) for start, end in self.column_windows], dim=-1)


def _windows(size: int, pooled: int) -> list[tuple[int, int]]:
    return [(math.floor(i * size / pooled), math.ceil((i + 1) * size / pooled)) for i in range(pooled)]


def _with_fixed_pools(encoder: nn.Module, image_size: tuple[int, int]) -> nn.Module:
    """A copy of ``encoder`` with :class:`WindowMaxPool` for its adaptive pools (the convolutions keep the size)."""
    encoder = copy.deepcopy(encoder)
    for module in list(encoder.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.AdaptiveMaxPool2d):
                output_size = child.output_size if isinstance(child.output_size, tuple) else (child.output_size,) * 2
                setattr(module, name, WindowMaxPool(image_size, output_size))
    return encoder


class ActingStep(nn.Module):
    """One acting step of an :class:`ActorCritic`'s actor or of a :class:`QNetwork`, with tensors in and out only.

    ``forward(*inputs)`` reads the observation inputs (``observation``, or ``image``,
    ``direction``, ``mission``), then, with memory, ``state`` and ``episode_start``. It returns
    the greedy ``action``, the head's output (``logits``, ``q_values`` or the Gaussian ``mean``)
    and, with memory, ``state_out``: what ``act_step`` computes, as one graph.
    """

    def __init__(self, network: nn.Module, observation_space: gym.Space) -> None:
        super().__init__()
        if isinstance(network, ActorCritic):
            encoder, memory, trunk, head = (network.actor_encoder, network.actor_memory, network.actor_trunk,
                                            network.policy_head)
            self.discrete = network.discrete
            self.head_output = "logits" if network.discrete else "mean"
        elif isinstance(network, QNetwork):
            encoder, memory, trunk, head = network.encoder, network.memory, network.trunk, network.head
            self.discrete, self.head_output = True, "q_values"
        else:
            raise MazerunError(f"cannot export a {type(network).__name__}; export an actor-critic or a Q-network")
        self.minigrid = encoder.kind == "minigrid"
        if self.minigrid:
            height, width, _ = observation_space["image"].shape
            encoder = _with_fixed_pools(encoder, (height, width))
        self.encoder, self.memory, self.trunk, self.head = encoder, memory, trunk, head
        if not self.discrete:
            self.register_buffer("action_low", network.action_low.clone())
            self.register_buffer("action_high", network.action_high.clone())

    @property
    def recurrent(self) -> bool:
        return self.memory is not None

    @property
    def state_size(self) -> int:
        return 0 if self.memory is None else self.memory.state_size

    def input_names(self) -> list[str]:
        names = list(MINIGRID_INPUTS) if self.minigrid else [VECTOR_INPUT]
        return names + ([STATE_INPUT, EPISODE_START_INPUT] if self.recurrent else [])

    def output_names(self) -> list[str]:
        return ["action", self.head_output] + ([STATE_OUTPUT] if self.recurrent else [])

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        observation: Any = dict(zip(MINIGRID_INPUTS, inputs)) if self.minigrid else inputs[0]
        features = self.encoder(observation)
        if self.memory is not None:
            state, episode_start = inputs[-2:]
            keep = (~episode_start).unsqueeze(-1).to(state.dtype)  # a new episode starts from zeros
            features, state = self.memory.step(features, state * keep)
        out = self.head(self.trunk(features))
        action = out.argmax(dim=-1) if self.discrete else torch.clamp(out, self.action_low, self.action_high)
        return (action, out, state) if self.memory is not None else (action, out)


def acting_step(checkpoint: Checkpoint) -> ActingStep:
    """The acting step of a checkpoint's network, in eval mode."""
    return ActingStep(network_from_checkpoint(checkpoint), checkpoint.observation_space).eval()


def example_inputs(step: ActingStep, observation_space: gym.Space) -> tuple[torch.Tensor, ...]:
    """Inputs of :data:`EXAMPLE_BATCH` rows to trace the graph with; their values do not matter, their types do."""
    if step.minigrid:
        height, width, channels = observation_space["image"].shape
        observation: tuple[torch.Tensor, ...] = (
            torch.zeros(EXAMPLE_BATCH, height, width, channels, dtype=torch.uint8),
            torch.zeros(EXAMPLE_BATCH, dtype=torch.int64),
            torch.full((EXAMPLE_BATCH, 2), Vocabulary.UNKNOWN, dtype=torch.int64),
        )
    else:
        observation = (torch.zeros(EXAMPLE_BATCH, *observation_space.shape),)
    if not step.recurrent:
        return observation
    starts = torch.arange(EXAMPLE_BATCH) == 0
    return (*observation, torch.zeros(EXAMPLE_BATCH, step.state_size), starts)


def space_signature(space: gym.Space) -> dict[str, Any]:
    """What a graph's inputs and outputs depend on in a space: kinds, shapes, dtypes, action counts (not Box bounds).

    An env is fit for an exported policy when its spaces have the signature the JSON records.
    """
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Box):
        return {"type": "box", "shape": list(space.shape), "dtype": str(space.dtype)}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "dict", "spaces": {key: space_signature(sub) for key, sub in space.spaces.items()}}
    return {"type": "mission"}  # MiniGrid's mission (a Text placeholder in a checkpoint): read as token ids


def _tensor_spec(name: str, shape: list[Any], dtype: str, meaning: str) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype, "meaning": meaning}


def interface(step: ActingStep, checkpoint: Checkpoint, graph_format: str, graph_file: str) -> dict[str, Any]:
    """The interface JSON: what a program needs, beside the graph, to feed it and read its outputs."""
    space = checkpoint.observation_space
    if step.minigrid:
        height, width, channels = space["image"].shape
        inputs = [
            _tensor_spec("image", [BATCH, height, width, channels], "uint8", "the observation's image, as given"),
            _tensor_spec("direction", [BATCH], "int64", "the observation's direction"),
            _tensor_spec("mission", [BATCH, WORDS], "int64",
                         "the observation's mission as token ids (see mission), right-padded with pad_id"),
        ]
    else:
        inputs = [_tensor_spec(VECTOR_INPUT, [BATCH, *space.shape], "float32",
                               "the env observation, unnormalised: the graph standardises and clips it")]
    action_space = checkpoint.action_space
    if step.discrete:
        outputs = [_tensor_spec("action", [BATCH], "int64", f"the greedy action: argmax of {step.head_output}")]
        width_out = int(action_space.n)
    else:
        outputs = [_tensor_spec("action", [BATCH, *action_space.shape], "float32",
                                "the greedy action: the mean clipped to the action bounds")]
        width_out = int(action_space.shape[0])
    meanings = {"logits": "unnormalised log-probabilities of the actions",
                "q_values": "Q-values of the actions", "mean": "the mean of the Gaussian policy, unclipped"}
    outputs.append(_tensor_spec(step.head_output, [BATCH, width_out], "float32", meanings[step.head_output]))
    state = None
    if step.recurrent:
        state = {"size": step.state_size, "memory": step.memory.kind, "initial": "zeros",
                 "reset": f"{EPISODE_START_INPUT}=true on an episode's first step zeroes that row's state first"}
        inputs += [_tensor_spec(STATE_INPUT, [BATCH, step.state_size], "float32",
                                f"the {STATE_OUTPUT} of the previous step (zeros at first)"),
                   _tensor_spec(EPISODE_START_INPUT, [BATCH], "bool", "true on the first step of an episode")]
        outputs.append(_tensor_spec(STATE_OUTPUT, [BATCH, step.state_size], "float32",
                                    f"the next step's {STATE_INPUT}"))
    if step.discrete:
        sampling: dict[str, Any] = {"distribution": "categorical", "parameters": step.head_output,
                                    "sample": f"an action drawn with probabilities softmax({step.head_output})"}
    else:
        log_std = [float(value) for value in checkpoint.model_state["log_std"]]
        sampling = {"distribution": "gaussian", "parameters": "mean", "log_std": log_std,
                    "sample": "mean + exp(log_std) * N(0, 1), clipped to the action bounds"}
    mission = None
    if step.minigrid:
        mission = {"vocabulary": list(checkpoint.vocabulary or []), "pad_id": Vocabulary.PAD,
                   "unknown_id": Vocabulary.UNKNOWN, "first_word_id": Vocabulary.UNKNOWN + 1,
                   "tokens": "lower-case the mission and take its words and numbers (regex [a-z0-9]+); a word is "
                             "first_word_id + its index in vocabulary, or unknown_id if absent"}
    return {
        "format": EXPORT_MARKER, "format_version": EXPORT_FORMAT_VERSION, "graph": graph_format, "file": graph_file,
        "env_id": checkpoint.env_id, "algorithm": checkpoint.algorithm, "network": checkpoint.model_config["network"],
        "checkpoint": str(checkpoint.path),
        "inputs": inputs, "outputs": outputs,
        "observation_space": space_signature(space), "action_space": space_signature(action_space),
        "greedy": "the action output is the greedy action", "sampling": sampling, "state": state, "mission": mission,
    }


def interface_path(graph_path: Path) -> Path:
    """The JSON beside a graph file: ``policy.onnx`` -> ``policy.onnx.json``."""
    return graph_path.with_name(graph_path.name + ".json")


def default_graph_path(checkpoint: Checkpoint, graph_format: str) -> Path:
    """Beside the checkpoint, named after it: ``best.pt`` -> ``best.onnx`` or ``best.torchscript.pt``."""
    return checkpoint.path.with_name(checkpoint.path.stem + GRAPH_SUFFIXES[graph_format])


def export_policy(checkpoint: Checkpoint, graph_format: str, graph_path: Path | None = None) -> tuple[Path, Path]:
    """Write the checkpoint's acting step as ``graph_format`` and its interface JSON; returns both paths."""
    if graph_format not in EXPORT_FORMATS:
        raise MazerunError(f"unknown export format {graph_format!r}; use {' or '.join(EXPORT_FORMATS)}")
    graph_path = Path(graph_path) if graph_path is not None else default_graph_path(checkpoint, graph_format)
    if graph_path.resolve() == checkpoint.path.resolve():
        raise MazerunError(f"--out {graph_path} is the checkpoint itself; name another file")
    step = acting_step(checkpoint)
    example = example_inputs(step, checkpoint.observation_space)
    graph = onnx_bytes(step, example) if graph_format == "onnx" else torchscript_bytes(step, example)
    description = interface(step, checkpoint, graph_format, graph_path.name)
    atomic_write_bytes(graph_path, graph)
    json_path = interface_path(graph_path)
    atomic_write_bytes(json_path, (json.dumps(description, indent=2) + "\n").encode())
    return graph_path, json_path


def _free_dimensions(step: ActingStep) -> tuple[dict[int, Any], ...]:
    """torch.export's dynamic shapes of each input: the batch everywhere, and the words of a mission."""
    batch, words = torch.export.Dim(BATCH), torch.export.Dim(WORDS)
    return tuple({0: batch, 1: words} if name == "mission" else {0: batch} for name in step.input_names())


def onnx_bytes(step: ActingStep, example: tuple[torch.Tensor, ...]) -> bytes:
    """The ONNX model of ``step`` (torch's dynamo exporter, which needs onnx and onnxscript)."""
    try:
        import onnxscript  # noqa: F401  (the exporter's own import fails later, in a long report)
    except ImportError:
        raise MazerunError("--format onnx needs onnx and onnxscript: pip install 'mazerun[onnx]'") from None
    # The exporter prints its progress to stdout, warns about names it keeps and logs the torchvision operators it
    # skips: the command says what it wrote, nothing else.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    _forget_rnn_kernels()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(step, example, dynamo=True, input_names=step.input_names(),
                                        output_names=step.output_names(), dynamic_shapes=(_free_dimensions(step),),
                                        external_data=False, verbose=False)
    finally:
        exporter_log.setLevel(level)
        _forget_rnn_kernels()
    _check_free_dimensions(program.model_proto, step)
    return program.model_proto.SerializeToString()


def _forget_rnn_kernels() -> None:
    """Empty the dispatch caches of torch's GRU and LSTM operators.

    For free sequence lengths torch's exporter registers a while-loop GRU/LSTM only while it
    exports, but the operators cache the kernel they dispatched to: the second export in one
    process then unrolled the mission reader and fixed the mission length (torch 2.13).
    """
    for operator in (torch.ops.aten.gru.input, torch.ops.aten.lstm.input):
        getattr(operator, "_dispatch_cache", {}).clear()


def _check_free_dimensions(model: Any, step: ActingStep) -> None:
    """Refuse a graph whose batch or mission length the exporter fixed: it would fail on other inputs, later."""
    free = dict(zip(step.input_names(), _free_dimensions(step)))
    for graph_input in model.graph.input:
        dimensions = graph_input.type.tensor_type.shape.dim
        fixed = [index for index in free.get(graph_input.name, {}) if not dimensions[index].dim_param]
        if fixed:
            raise MazerunError(f"torch {torch.__version__}'s ONNX exporter fixed dimension {fixed[0]} of input "
                               f"{graph_input.name}; export with --format torchscript, or with another torch release")


def torchscript_bytes(step: ActingStep, example: tuple[torch.Tensor, ...]) -> bytes:
    """The TorchScript archive of ``step``, traced (``torch.jit.load`` reads it; no mazerun needed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(step, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def read_interface(graph_path: Path) -> dict[str, Any]:
    """The interface JSON beside ``graph_path``, checked to be one this mazerun wrote."""
    json_path = interface_path(graph_path)
    if not json_path.is_file():
        raise MazerunError(f"{graph_path} has no {json_path.name} beside it; export the policy with "
                           "python -m mazerun.export <run dir> --format onnx, which writes both")
    try:
        description = json.loads(json_path.read_text())
    except (OSError, ValueError) as error:
        raise MazerunError(f"cannot read {json_path} ({type(error).__name__}); export the policy again") from None
    if not isinstance(description, dict) or description.get("format") != EXPORT_MARKER:
        raise MazerunError(f"{json_path} is not a mazerun policy interface; export the policy again")
    if description.get("format_version") != EXPORT_FORMAT_VERSION:
        raise MazerunError(f"{json_path} has export format version {description.get('format_version')}, this mazerun "
                           f"reads version {EXPORT_FORMAT_VERSION}; export the policy again with this mazerun")
    return description
