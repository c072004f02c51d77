"""Self-describing checkpoints that load with ``torch.load(path, weights_only=True)``.

A checkpoint holds the model weights plus everything needed to rebuild and use the model
without the training config: the model config, the environment's spaces and id, the
algorithm name, the mission vocabulary (BabyAI) and algorithm state (``extra``, e.g. an
optimizer ``state_dict`` and step counters).

``weights_only`` loading refuses arbitrary pickled objects, so nothing but tensors and
plain containers/scalars is stored: spaces go through :func:`space_to_dict`. MiniGrid's
``MissionSpace`` wraps a mission generator function that cannot be stored; it comes back
as a :class:`gymnasium.spaces.Text` placeholder that accepts any printable ASCII mission.
"""

from __future__ import annotations

import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gymnasium as gym
import numpy as np
import torch

from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write
from mazerun.nn.models import ModelConfig, Vocabulary, build_network

CHECKPOINT_FORMAT_VERSION = 1
"""Bumped whenever the checkpoint layout changes incompatibly."""

CHECKPOINT_MARKER = "mazerun-checkpoint"
"""Stored under ``"format"`` to tell our checkpoints from other ``.pt`` files."""

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
CHECKPOINT_NAMES = (BEST_CHECKPOINT, LAST_CHECKPOINT)
SNAPSHOT_DIR = "snapshots"
"""Where an off-policy run keeps its policy at every report (``step_<N>.pt``), for datasets of a medium policy."""
"""Files looked for, in order, when a run directory is given instead of a file."""

TRAINING_STATE = "training_state"
"""Key of ``last.pt``'s extra that holds what a continued run needs beyond the weights."""

PIPELINE_MANIFEST = "pipeline.json"
"""In a pipeline run's directory: its stages in order, where each one ran and whether it finished."""

MISSION_MAX_LENGTH = 512
"""Longest mission the placeholder space accepts; BabyAI missions are far shorter."""


def space_to_dict(space: gym.Space) -> dict[str, Any]:
    """Describe a Discrete, Box, Dict or MiniGrid mission space with plain Python values."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "box",
            "low": space.low.tolist(),
            "high": space.high.tolist(),
            "shape": list(space.shape),
            "dtype": str(space.dtype),
        }
    if isinstance(space, gym.spaces.Dict):
        return {"type": "dict", "spaces": {key: space_to_dict(sub) for key, sub in space.spaces.items()}}
    if _is_mission_space(space):
        return {"type": "mission"}
    raise MazerunError(
        f"cannot store a {type(space).__name__} space in a checkpoint; "
        "use an environment whose spaces are Discrete, Box or Dict of those"
    )


def _is_mission_space(space: gym.Space) -> bool:
    """MiniGrid's mission space. Only MiniGrid envs import minigrid (a third of a second): without it loaded, there is none."""
    mission = sys.modules.get("minigrid.core.mission")
    return mission is not None and isinstance(space, mission.MissionSpace)


def space_from_dict(description: dict[str, Any]) -> gym.Space:
    """Rebuild the space described by :func:`space_to_dict` (missions become a ``Text`` placeholder)."""
    kind = description["type"]
    if kind == "discrete":
        return gym.spaces.Discrete(description["n"], start=description["start"])
    if kind == "box":
        dtype = np.dtype(description["dtype"])
        return gym.spaces.Box(
            low=np.asarray(description["low"], dtype=dtype),
            high=np.asarray(description["high"], dtype=dtype),
            shape=tuple(description["shape"]),
            dtype=dtype,
        )
    if kind == "dict":
        return gym.spaces.Dict({key: space_from_dict(sub) for key, sub in description["spaces"].items()})
    if kind == "mission":
        return gym.spaces.Text(max_length=MISSION_MAX_LENGTH, charset=string.printable)
    raise ValueError(f"unknown space type {kind!r}")


@dataclass
class Checkpoint:
    """A loaded checkpoint; tensors are on the CPU."""

    model_state: dict[str, torch.Tensor]
    model_config: dict
    observation_space: gym.Space
    action_space: gym.Space
    env_id: str
    algorithm: str
    vocabulary: list[str] | None
    extra: dict
    format_version: int
    path: Path


def save_checkpoint(
    path: Path,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: dict,
    observation_space: gym.Space,
    action_space: gym.Space,
    env_id: str,
    algorithm: str,
    vocabulary: list[str] | None = None,
    extra: dict | None = None,
) -> None:
    """Write a checkpoint atomically, so a crash mid-save never leaves a truncated ``best.pt``.

    ``model_config`` and ``extra`` must hold only tensors and plain dicts, lists, tuples,
    str, int, float, bool and None; anything else raises ``TypeError`` here rather than
    at load time. The payload streams into a temporary file beside ``path`` (a tensor of a
    memory-mapped file, such as a replay buffer on disk, is read from the page cache, never
    copied whole into RAM), is loaded back through a memory map (which reads the structure, not
    the tensors) and is then renamed over ``path``.
    """
    payload = _compact({
        "format": CHECKPOINT_MARKER,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_state": model_state,
        "model_config": model_config,
        "observation_space": space_to_dict(observation_space),
        "action_space": space_to_dict(action_space),
        "env_id": env_id,
        "algorithm": algorithm,
        "vocabulary": None if vocabulary is None else list(vocabulary),
        "extra": {} if extra is None else extra,
    })
    atomic_write(Path(path), lambda handle: _torch_save(payload, handle), _check_loadable)


def _torch_save(payload: dict[str, Any], handle: BinaryIO) -> None:
    """``torch.save``, raising a failed write (a full disk) as the ``OSError`` that torch's writer wraps in a
    ``RuntimeError``: :func:`atomic_write` says that one in one line."""
    try:
        torch.save(payload, handle)
    except RuntimeError as error:
        if isinstance(error.__context__, OSError):
            raise error.__context__ from None
        raise


def _check_loadable(path: Path) -> None:
    try:
        torch.load(path, mmap=True, weights_only=True)
    except Exception as error:
        raise TypeError(f"checkpoint content is not loadable with weights_only=True: {error}") from error


def _compact(value: Any) -> Any:
    """``value`` with every tensor that is a view into larger storage copied out: ``torch.save`` writes a
    tensor's whole storage, and fused training keeps weights as views of one flat tensor."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.untyped_storage().nbytes() > value.numel() * value.element_size() else value
    if isinstance(value, dict):
        return {key: _compact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_compact(item) for item in value)
    return value


def read_pipeline_manifest(run_dir: Path) -> dict | None:
    """The manifest of a pipeline run directory, or None for any other path."""
    path = Path(run_dir) / PIPELINE_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise MazerunError(f"{path} is not valid JSON; it was not written by mazerun, or the disk is damaged") from None
    return manifest


def resolve_run_dir(path: str | Path) -> Path:
    """A pipeline run stands for its last stage that holds a checkpoint; any other path for itself."""
    path = Path(path)
    manifest = read_pipeline_manifest(path) if path.is_dir() else None
    if manifest is None:
        return path
    for stage in reversed(manifest["stages"]):
        stage_dir = Path(stage["dir"])
        if any((stage_dir / name).is_file() for name in CHECKPOINT_NAMES):
            return stage_dir
    raise MazerunError(f"pipeline run {path} has no stage with a checkpoint yet; continue it with input_dir={path}")


def checkpoint_file(path_or_run_dir: str | Path, prefer: tuple[str, ...] = CHECKPOINT_NAMES) -> Path:
    """The checkpoint file itself, or the first of ``prefer`` inside a run directory (a pipeline's last stage)."""
    path = Path(path_or_run_dir)
    if not path.exists():
        raise MazerunError(
            f"checkpoint {path} does not exist; pass a checkpoint file (.pt) or a training run's output directory"
        )
    if path.is_file():
        return path
    path = resolve_run_dir(path)
    for name in prefer:
        if (path / name).is_file():
            return path / name
    entries = sorted(entry.name for entry in path.iterdir())
    listing = ", ".join(entries[:8]) + (f", ... ({len(entries) - 8} more)" if len(entries) > 8 else "")
    raise MazerunError(
        f"no checkpoint (best.pt or last.pt) in {path} (it holds: {listing or 'nothing'}); "
        "pass a training run's output directory"
    )


def load_checkpoint(path_or_run_dir: str | Path, prefer: tuple[str, ...] = CHECKPOINT_NAMES) -> Checkpoint:
    """Load a checkpoint file, or the ``best.pt`` (else ``last.pt``) of a run directory.

    Its tensors are memory-mapped from the file (checkpoints are replaced by a rename, never rewritten in place),
    so a continued run copies the replay buffer of ``last.pt`` a page at a time, never holding a second whole copy.
    """
    path = checkpoint_file(path_or_run_dir, prefer)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise MazerunError(
            f"cannot read checkpoint {path} ({type(error).__name__}); it is corrupt or not a "
            "mazerun checkpoint: pass a best.pt or last.pt written by mazerun training"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_MARKER:
        raise MazerunError(f"{path} is not a mazerun checkpoint; pass a best.pt or last.pt written by mazerun training")
    version = payload.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise MazerunError(
            f"{path} has checkpoint format version {version}, this mazerun reads version "
            f"{CHECKPOINT_FORMAT_VERSION}; use the mazerun release that wrote it or train again"
        )
    return _checked(payload, path)


FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "model_state": dict, "model_config": dict, "observation_space": dict, "action_space": dict, "env_id": str,
    "algorithm": str, "vocabulary": (list, type(None)), "extra": dict,
}
"""Each field of a checkpoint and the type it must hold."""


def _checked(payload: dict, path: Path) -> Checkpoint:
    """The payload as a :class:`Checkpoint`, refused in one line if a part is missing, damaged or does not fit
    the others: checked once here, so no later use of a checkpoint fails with a traceback."""
    def damaged(what: str) -> MazerunError:
        return MazerunError(f"{path} is damaged: {what}; use another checkpoint of that run (best.pt or last.pt) "
                            "or train again")

    for field, kind in FIELD_TYPES.items():
        if field not in payload:
            raise damaged(f"it has no {field}")
        if not isinstance(payload[field], kind):
            raise damaged(f"its {field} is a {type(payload[field]).__name__}")
    try:
        observation_space = space_from_dict(payload["observation_space"])
        action_space = space_from_dict(payload["action_space"])
    except (KeyError, TypeError, ValueError) as error:
        raise damaged(f"a space it describes cannot be rebuilt ({type(error).__name__}: {error})") from None
    checkpoint = Checkpoint(
        model_state=payload["model_state"], model_config=payload["model_config"], observation_space=observation_space,
        action_space=action_space, env_id=payload["env_id"], algorithm=payload["algorithm"],
        vocabulary=payload["vocabulary"], extra=payload["extra"], format_version=payload["format_version"], path=path,
    )
    training_state = checkpoint.extra.get(TRAINING_STATE)
    if training_state is not None and not (isinstance(training_state, dict)
                                           and isinstance(training_state.get("algorithm"), dict)
                                           and all(isinstance(checkpoint.extra.get(key), int)
                                                   for key in ("step", "global_step"))):
        raise damaged(f"its {TRAINING_STATE} lacks the algorithm's state or its step, so its run cannot be continued")
    for name, value in checkpoint.model_state.items():
        if not isinstance(value, torch.Tensor):
            raise damaged(f"model_state[{name!r}] is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise damaged(f"model_state[{name!r}] holds NaN or infinite weights")
    try:
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: the caller's seed is not touched
            expected = _build_network(checkpoint).state_dict()
    except (KeyError, TypeError, ValueError) as error:
        raise damaged(f"its model_config cannot build a network ({type(error).__name__}: {error})") from None
    network = checkpoint.model_config["network"]
    for name, value in expected.items():
        found = checkpoint.model_state.get(name)
        if found is None:
            raise damaged(f"model_state has no {name!r}, which its {network} needs")
        if found.shape != value.shape:
            raise damaged(f"model_state[{name!r}] has shape {tuple(found.shape)}, but the {network} of its model_config "
                          f"for its {type(observation_space).__name__} observations of shape {observation_space.shape} "
                          f"needs {tuple(value.shape)}")
    unexpected = sorted(set(checkpoint.model_state) - set(expected))
    if unexpected:
        raise damaged(f"model_state holds {unexpected[0]!r}, which its {network} does not have")
    return checkpoint


def _build_network(checkpoint: Checkpoint) -> torch.nn.Module:
    vocabulary = Vocabulary.from_list(checkpoint.vocabulary) if checkpoint.vocabulary is not None else None
    return build_network(checkpoint.model_config["network"], ModelConfig.from_dict(checkpoint.model_config),
                         checkpoint.observation_space, checkpoint.action_space, vocabulary)


def network_from_checkpoint(checkpoint: Checkpoint) -> torch.nn.Module:
    """The checkpoint's network with its weights, built from the package's own classes, in eval mode."""
    network = _build_network(checkpoint)
    network.load_state_dict(checkpoint.model_state)
    return network.eval()


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:09d}.pt"


def snapshots(run_dir: Path) -> dict[int, Path]:
    """An off-policy run's policy snapshots by step (empty if it kept none)."""
    found = {}
    for path in (Path(run_dir) / SNAPSHOT_DIR).glob("step_*.pt"):
        step = path.stem[len("step_"):]
        if step.isdigit():
            found[int(step)] = path
    return dict(sorted(found.items()))
