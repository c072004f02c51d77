"""Exported policies against the torch networks they came from: parity, episodes and latency.

    python bench/export.py                 # three policies trained through `run`, 1,000 parity steps each
    python bench/export.py --smoke         # tiny budgets, to check the wiring

Three tiny policies are trained through the real `run` command (parity needs no good policy):
a BC MLP on LunarLander, a BC GRU on BabyAI GoToLocal (minigrid encoder, mission tokens) and a
CQL LSTM Q-network on LunarLander. Each is exported with `python -m mazerun.export`, then:

- parity: the torch network acts greedily along real episodes; at every step onnxruntime (and
  the TorchScript file) is fed the same observations and the same recurrent state. Target: the
  largest absolute difference of actions, logits (Q-values) and state <= 1e-5.
- episodes: `run policy=onnx` against `run policy=torch_policy`, greedy, parallel runner. Target:
  the same recorded actions in every episode.
- latency: one action per call for one observation on one CPU thread (torch.set_num_threads(1),
  onnxruntime intra_op_num_threads=1), median over many calls: onnxruntime's session.run against
  the network's own act_step in torch eager. Shown, no target.
"""

from __future__ import annotations

import argparse
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
from mazerun.nn.models import ActorCritic, QNetwork, Vocabulary, obs_to_tensor

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


class TorchReference:
    """What the network computes for one step, through its own API: the greedy action, the head's output, the state."""

    def __init__(self, run_dir: Path) -> None:
        self.checkpoint = load_checkpoint(run_dir)
        self.network = network_from_checkpoint(self.checkpoint)
        vocabulary = self.checkpoint.vocabulary
        self.vocabulary = Vocabulary.from_list(vocabulary) if vocabulary is not None else None

    def batch(self, observations: object) -> object:
        return obs_to_tensor(observations, self.checkpoint.observation_space, self.vocabulary, "cpu")

    @torch.no_grad()
    def step(self, batch: object, state: torch.Tensor, starts: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Action, head output (normalised logits, Q-values or mean), acting state after, whole state after."""
        network = self.network
        actions, new_state = network.act_step(batch, state, starts, deterministic=True)
        single = {key: value[None] for key, value in batch.items()} if isinstance(batch, dict) else batch[None]
        if isinstance(network, QNetwork):
            head = network.q_sequence(single, starts[None], state)[0][0]
            acting = new_state
        else:
            distribution = network.distribution_sequence(single, starts[None], state)[0]
            head = distribution.logits[0] if network.discrete else distribution.mean[0]
            acting = new_state[:, : network.actor_state_size]
        return actions, head, acting, new_state


def parity(run_dir: Path, steps: int, run_exported) -> float:
    """The largest difference between the exported graph and torch over ``steps`` steps of real episodes."""
    reference = TorchReference(run_dir)
    network = reference.network
    env = make_env(reference.checkpoint.env_id, max_episode_steps=PARITY_EPISODE_STEPS)
    observation, _ = env.reset(seed=0)
    state = network.initial_state(1, "cpu")
    starts = torch.ones(1, dtype=torch.bool)
    largest, episode = 0.0, 0
    for _ in range(steps):
        observations = stacked(observation)
        actions, head, acting, state_after = reference.step(reference.batch(observations), state, starts)
        exported = run_exported(observations, state[:, : acting.shape[1]] if network.recurrent else None, starts)
        exported_head = torch.as_tensor(np.asarray(exported[1]))
        if isinstance(network, ActorCritic) and network.discrete:
            exported_head = torch.log_softmax(exported_head, dim=-1)
        largest = max(largest, float((torch.as_tensor(np.asarray(exported[0])) - actions).abs().max()),
                      float((exported_head - head).abs().max()))
        if network.recurrent:
            largest = max(largest, float((torch.as_tensor(np.asarray(exported[2])) - acting).abs().max()))
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
            difference = parity(run_dir, args.steps, onnx_runner(onnx_path))
            table.add(f"{name}: onnxruntime max |diff|, {args.steps} steps", difference, None,
                      f"<= {TOLERANCE:g}", difference <= TOLERANCE)
            difference = parity(run_dir, args.steps, torchscript_runner(torchscript_path, TorchReference(run_dir)))
            table.add(f"{name}: TorchScript max |diff|, {args.steps} steps", difference, None,
                      f"<= {TOLERANCE:g}", difference <= TOLERANCE)
            episodes_dir = scratch / f"episodes-{run_dir.name}"
            episodes_dir.mkdir()
            same, total = same_episodes(run_dir, onnx_path, args.episodes, episodes_dir)
            table.add(f"{name}: policy=onnx episodes = torch_policy's", same, total, "all", same == total)
            onnx_us, torch_us = latency(run_dir, onnx_path, args.calls)
            table.add(f"{name}: us per action, 1 thread (onnxruntime)", onnx_us, torch_us)
    print(table.render())
    print(f"\n{load_average()}")
    return table.exit_code()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the `run` commands it starts: one thread each on a shared machine
    sys.exit(main())
