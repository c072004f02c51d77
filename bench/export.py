"""Exported policies against the torch networks they came from: parity, episodes and latency.

    python bench/export.py                 # three policies trained through `run`, 1,000 parity steps each
    python bench/export.py --smoke         # tiny budgets, to check the wiring

Three tiny policies are trained through the real `run` command (parity needs no good policy):
a BC MLP on LunarLander, a BC GRU on BabyAI GoToLocal (minigrid encoder, mission tokens) and a
CQL LSTM Q-network on LunarLander. Each is exported with `python -m mazerun.export`, then:

- parity: the torch network acts greedily along real episodes; at every step onnxruntime (and
  the TorchScript file) is fed the same observations and the same recurrent state. Target: the
  largest absolute difference of actions, logits (Q-values) and state <= 1e-5. Shown beside it:
  torch's own float32 result against the same network in float64, the rounding no float32 graph
  computed in another order can be expected to beat.
- episodes: `run policy=onnx` against `run policy=torch_policy`, greedy, parallel runner. Target:
  the same recorded actions in every episode.
- latency: one action per call for one observation on one CPU thread (torch.set_num_threads(1),
  onnxruntime intra_op_num_threads=1), median over many calls: onnxruntime's session.run against
  the network's own act_step in torch eager. Shown, no target.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import Table, load_average, record, run

from mazerun.acting.envs import make_env
from mazerun.acting.policies.onnx_policy import OnnxGraph
from mazerun.data.records import load_records
from mazerun.nn.checkpoint import load_checkpoint, network_from_checkpoint
from mazerun.nn.models import QNetwork, Vocabulary, obs_to_tensor

TOLERANCE = 1e-5
PARITY_EPISODE_STEPS = 200
"""A time limit on the parity episodes, so that 1,000 steps cross several episode starts."""


def train(scratch: Path, budget: int) -> dict[str, Path]:
    """The three policies, trained through `run` on expert recordings."""
    lunar = record("LunarLander-v3", 10, scratch / "lunar")
    bot = record("BabyAI-GoToLocal-v0", 100, scratch / "bot")
    tiny = [f"algorithm.n_updates={budget}", f"algorithm.eval_every={budget}", "runner.eval_repeats=2"]
    runs = {
        "MLP (BC, LunarLander)": ["-cn", "conf_train", f"runner.dataset.dir_or_file={lunar}", *tiny],
        "minigrid GRU (BC, GoToLocal)": ["-cn", "conf_train", "env=BabyAI-GoToLocal-v0", "model.memory=gru",
                                         f"runner.dataset.dir_or_file={bot}", *tiny],
        "LSTM Q-network (CQL, LunarLander)": ["-cn", "conf_train", "algorithm=cql", "model.memory=lstm",
                                              f"runner.dataset.dir_or_file={lunar}", *tiny],
    }
    directories = {}
    for index, (name, overrides) in enumerate(runs.items()):
        started = time.perf_counter()
        run(*overrides, f"hydra.run.dir=run{index}", cwd=scratch)
        print(f"  trained {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        directories[name] = scratch / f"run{index}"
    return directories


def export(run_dir: Path, graph_format: str) -> Path:
    out = run_dir / ("policy.onnx" if graph_format == "onnx" else "policy.torchscript.pt")
    subprocess.run([sys.executable, "-m", "mazerun.export", str(run_dir), "--format", graph_format, "--out", str(out)],
                   check=True, capture_output=True, text=True)
    return out


def stacked(observation: object) -> object:
    """One observation as a batch of one, as the env copies of a runner send it."""
    if isinstance(observation, dict):
        return {key: [value] if key == "mission" else np.asarray(value)[None] for key, value in observation.items()}
    return np.asarray(observation)[None]


def head_output(network: torch.nn.Module, batch: object, state: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The head's raw output (logits, Q-values or the Gaussian mean) for one step, through the network's own modules.

    ``Categorical`` keeps its logits normalised, which adds its own rounding: the graph's raw logits are compared raw.
    """
    if isinstance(network, QNetwork):
        encoder, memory, trunk, head = network.encoder, network.memory, network.trunk, network.head
    else:
        encoder, memory, trunk, head = (network.actor_encoder, network.actor_memory, network.actor_trunk,
                                        network.policy_head)
    features = encoder(batch)
    if memory is not None:  # Memory's sequence path, which zeroes the state where an episode starts
        features = memory(features[None], starts[None], state[:, : memory.state_size])[0][0]
    return head(trunk(features))


class TorchReference:
    """What the network computes for one step: the greedy action and state of ``act_step``, the head's output.

    A float64 copy of the network gives the float32 floor: how far torch's own float32 result lies from the
    same network computed in float64, which no float32 graph can be expected to beat.
    """

    def __init__(self, run_dir: Path) -> None:
        self.checkpoint = load_checkpoint(run_dir)
        self.network = network_from_checkpoint(self.checkpoint)
        self.network64 = copy.deepcopy(self.network).double()
        vocabulary = self.checkpoint.vocabulary
        self.vocabulary = Vocabulary.from_list(vocabulary) if vocabulary is not None else None

    def batch(self, observations: object) -> object:
        return obs_to_tensor(observations, self.checkpoint.observation_space, self.vocabulary, "cpu")

    @torch.no_grad()
    def step(self, batch: object, state: torch.Tensor, starts: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Action, head output, acting state after, whole state after, and the head output in float64."""
        network = self.network
        actions, new_state = network.act_step(batch, state, starts, deterministic=True)
        acting = new_state if isinstance(network, QNetwork) else new_state[:, : network.actor_state_size]
        batch64 = batch if isinstance(batch, dict) else batch.double()  # minigrid's inputs are indices
        head64 = head_output(self.network64, batch64, state.double(), starts)
        return actions, head_output(network, batch, state, starts), acting, new_state, head64


FLOOR = "float32 floor"


def parity(run_dir: Path, steps: int, run_exported) -> dict[str, float]:
    """The largest differences between the exported graph and torch over ``steps`` steps of real episodes.

    The torch network acts greedily; the graph is fed the same observations and the same state at every
    step. Keyed by what differs (actions, logits or Q-values or mean, the state of a network with memory),
    and :data:`FLOOR`: torch float32 against float64 on the head's output.
    """
    reference = TorchReference(run_dir)
    network = reference.network
    env = make_env(reference.checkpoint.env_id, max_episode_steps=PARITY_EPISODE_STEPS)
    observation, _ = env.reset(seed=0)
    state = network.initial_state(1, "cpu")
    starts = torch.ones(1, dtype=torch.bool)
    head_name = "Q-values" if isinstance(network, QNetwork) else "logits" if network.discrete else "mean"
    largest: dict[str, float] = {}
    episode = 0
    for _ in range(steps):
        observations = stacked(observation)
        actions, head, acting, state_after, head64 = reference.step(reference.batch(observations), state, starts)
        exported = [torch.as_tensor(np.asarray(output))
                    for output in run_exported(observations, state[:, : acting.shape[1]] if network.recurrent
                                               else None, starts)]
        differences = {"actions": (exported[0] - actions).abs().max(), head_name: (exported[1] - head).abs().max(),
                       FLOOR: (head.double() - head64).abs().max()}
        if network.recurrent:
            differences["state"] = (exported[2] - acting).abs().max()
        largest = {part: max(largest.get(part, 0.0), float(value)) for part, value in differences.items()}
        state, starts = state_after, torch.zeros(1, dtype=torch.bool)
        action = actions[0].numpy()
        observation, _, terminated, truncated, _ = env.step(int(action) if action.ndim == 0 else action)
        if terminated or truncated:
            episode += 1
            observation, _ = env.reset(seed=episode)
            starts = torch.ones(1, dtype=torch.bool)
    env.close()
    return largest


def onnx_runner(path: Path):
    graph = OnnxGraph(path)

    def run_exported(observations: object, state: torch.Tensor | None, starts: torch.Tensor) -> list[np.ndarray]:
        feed = graph.feed(observations, None if state is None else state.numpy(), starts.numpy())
        return list(graph.run(feed).values())

    return run_exported


def torchscript_runner(path: Path, reference: TorchReference):
    module = torch.jit.load(str(path))

    def run_exported(observations: object, state: torch.Tensor | None, starts: torch.Tensor) -> list[torch.Tensor]:
        batch = reference.batch(observations)
        inputs = [batch["image"], batch["direction"], batch["mission"]] if isinstance(batch, dict) else [batch]
        if state is not None:
            inputs += [state, starts]
        with torch.no_grad():
            return list(module(*inputs))

    return run_exported


def same_episodes(run_dir: Path, onnx_path: Path, episodes: int, scratch: Path) -> tuple[int, int]:
    """Episodes whose recorded actions are the same under policy=onnx and policy=torch_policy, and the episodes."""
    watch = [f"runner.n_episodes={episodes}", "runner=parallel"]
    run("policy=torch_policy", f"input_dir={run_dir}", *watch, "hydra.run.dir=torch", cwd=scratch)
    run("policy=onnx", f"policy.path={onnx_path}", *watch, "hydra.run.dir=onnx", cwd=scratch)
    torch_records = load_records(scratch / "torch" / "trajectory_data")
    onnx_records = load_records(scratch / "onnx" / "trajectory_data")
    same = sum(np.array_equal(a.actions, b.actions) for a, b in zip(torch_records, onnx_records))
    return same, len(torch_records)


def latency(run_dir: Path, onnx_path: Path, calls: int) -> tuple[float, float]:
    """Median microseconds of one action for one observation: onnxruntime's run, torch eager's act_step."""
    torch.set_num_threads(1)
    reference = TorchReference(run_dir)
    graph = OnnxGraph(onnx_path)  # one intra-op thread, as policy=onnx runs it
    env = make_env(reference.checkpoint.env_id)
    observation, _ = env.reset(seed=0)
    env.close()
    observations = stacked(observation)
    network = reference.network
    state = network.initial_state(1, "cpu")
    starts = torch.zeros(1, dtype=torch.bool)
    batch = reference.batch(observations)
    acting_state = state[:, : getattr(network, "actor_state_size", state.shape[1])]
    feed = graph.feed(observations, acting_state.numpy(), starts.numpy())

    def torch_call() -> None:
        with torch.no_grad():
            network.act_step(batch, state, starts, deterministic=True)

    def onnx_call() -> None:
        graph.run(feed)

    return median_microseconds(onnx_call, calls), median_microseconds(torch_call, calls)


def median_microseconds(call, calls: int) -> float:
    for _ in range(min(calls, 100)):  # warm up: first calls allocate
        call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=300, help="training updates of each policy")
    parser.add_argument("--steps", type=int, default=1000, help="parity steps of real episodes per policy")
    parser.add_argument("--episodes", type=int, default=10, help="episodes of policy=onnx against policy=torch_policy")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per latency figure")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets, to check the wiring")
    args = parser.parse_args()
    if args.smoke:
        args.updates, args.steps, args.episodes, args.calls = 20, 50, 2, 50
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"bench/export.py on {model}, {load_average()}", file=sys.stderr)
    table = Table(f"Exported policies against torch ({model}; {load_average()})", peer_name="torch")
    with tempfile.TemporaryDirectory(prefix="mazerun-bench-export-") as directory:
        scratch = Path(directory)
        for name, run_dir in train(scratch, args.updates).items():
            onnx_path, torchscript_path = export(run_dir, "onnx"), export(run_dir, "torchscript")
            for exporter, runner in (("onnxruntime", onnx_runner(onnx_path)),
                                     ("TorchScript", torchscript_runner(torchscript_path, TorchReference(run_dir)))):
                largest = parity(run_dir, args.steps, runner)
                floor = largest.pop(FLOOR)
                for part, difference in largest.items():
                    table.add(f"{name}: {exporter} max |diff| {part}, {args.steps} steps", difference, None,
                              f"<= {TOLERANCE:g}", difference <= TOLERANCE)
            table.add(f"{name}: torch float32 vs float64, max |diff|", floor, None)
            episodes_dir = scratch / f"episodes-{run_dir.name}"
            episodes_dir.mkdir()
            same, total = same_episodes(run_dir, onnx_path, args.episodes, episodes_dir)
            table.add(f"{name}: policy=onnx episodes = torch_policy's", same, total, "all", same == total)
            onnx_us, torch_us = latency(run_dir, onnx_path, args.calls)
            table.add(f"{name}: us per action, 1 thread: onnxruntime, torch eager", onnx_us, torch_us)
    print(table.render())
    print(f"\n{load_average()}")
    return table.exit_code()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the `run` commands it starts: one thread each on a shared machine
    sys.exit(main())
