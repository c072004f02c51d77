"""Behavioural cloning: our update speed against a bare torch loop and d3rlpy, and the clone's quality.

    python bench/bc.py                        # LunarLander-v3, 50 heuristic episodes, 3000 updates
    python bench/bc.py --babyai-episodes 10000 --babyai-updates 20000 --device cuda

All speed figures train the same MLP (8-256-256-4, tanh) with batch 256 on the same recorded
data in the same process; ours is the whole `train_offline` call (data loading, tensors, one
evaluation episode included), so its ratio to the bare loop is a lower bound. d3rlpy comes
from the `bench` extra (pip install ".[bench]"); without it its row says so.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mazerun.algorithms.bc import BCConfig
from mazerun.checkpoint import load_checkpoint
from mazerun.config import DatasetConfig, EnvConfig, PolicyConfig, RunConfig, RunnerConfig
from mazerun.data import records_to_dataset
from mazerun.evaluation import EVAL_SEED_OFFSET, evaluate
from mazerun.models import Vocabulary
from mazerun.policies.torch_policy import TorchPolicy, greedy_or_sampled
from mazerun.records import load_records
from mazerun.rollout import rollout
from mazerun.training import train_offline

QUIET = {"print_fn": lambda _: None}


def record(env_id: str, episodes: int, directory: Path) -> Path:
    rollout(env_id, PolicyConfig(), RunnerConfig(n_episodes=episodes), directory, **QUIET)
    return directory / "trajectory_data"


def bare_loop_updates_per_second(observations: torch.Tensor, actions: torch.Tensor, updates: int) -> float:
    """The fastest honest BC loop: tensors in memory, one gather and one optimiser step per batch."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Linear(observations.shape[1], 256), torch.nn.Tanh(),
        torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, int(actions.max()) + 1),
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-4)
    start = time.perf_counter()
    for _ in range(updates):
        index = torch.randint(len(actions), (256,))
        loss = F.cross_entropy(network(observations[index]), actions[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return updates / (time.perf_counter() - start)


def ours(data: Path, run_dir: Path, updates: int, env_id: str, device: str, eval_every: int | None = None) -> float:
    """Updates/s of the whole `run -cn conf_train algorithm=bc` training call."""
    config = RunConfig(
        env=EnvConfig(name=env_id),
        runner=RunnerConfig(dataset=DatasetConfig(dir_or_file=str(data)), eval_repeats=1),
        algorithm=BCConfig(n_updates=updates, eval_every=eval_every or updates, validation_percentage=0),
        device=device,
    )
    start = time.perf_counter()
    train_offline(config, run_dir)
    return updates / (time.perf_counter() - start)


def d3rlpy_updates_per_second(data: Path, updates: int) -> float | str:
    try:
        import d3rlpy
    except ImportError:
        return "not installed (pip install '.[bench]')"
    records = load_records(data)
    dataset = d3rlpy.dataset.MDPDataset(
        observations=np.concatenate([record.observations[:-1] for record in records]).astype(np.float32),
        actions=np.concatenate([record.actions for record in records]),
        rewards=np.concatenate([record.rewards for record in records]).astype(np.float32),
        terminals=np.concatenate([[0.0] * (len(r) - 1) + [float(r.terminated)] for r in records]).astype(np.float32),
        timeouts=np.concatenate([[0.0] * (len(r) - 1) + [float(not r.terminated)] for r in records]).astype(np.float32),
    )
    encoder = d3rlpy.models.encoders.VectorEncoderFactory(hidden_units=[256, 256], activation="tanh")
    bc = d3rlpy.algos.DiscreteBCConfig(batch_size=256, learning_rate=3e-4, encoder_factory=encoder).create(device="cpu:0")
    bc.build_with_dataset(dataset)
    start = time.perf_counter()
    bc.fit(dataset, n_steps=updates, n_steps_per_epoch=updates, show_progress=False, save_interval=updates + 1,
           logger_adapter=d3rlpy.logging.NoopAdapterFactory())
    return updates / (time.perf_counter() - start)


def clone_return(run_dir: Path, env_id: str, episodes: int) -> dict[str, float]:
    checkpoint = load_checkpoint(run_dir)
    policy = TorchPolicy(str(run_dir), env_id, checkpoint.action_space)
    vocabulary = Vocabulary.from_list(checkpoint.vocabulary) if checkpoint.vocabulary else None
    return evaluate(lambda obs: greedy_or_sampled(policy.network, obs, True), env_id, episodes,
                    observation_space=checkpoint.observation_space, vocabulary=vocabulary, device="cpu").metrics()


def row(name: str, ours_value: float | str, peer: float | str, target: str, passed: bool | None) -> str:
    def cell(value: float | str) -> str:
        return f"{value:>12.1f}" if isinstance(value, float) else f"{value:>12}"

    ratio = f"{ours_value / peer:>7.2f}x" if isinstance(ours_value, float) and isinstance(peer, float) else f"{'-':>8}"
    verdict = "" if passed is None else ("PASS" if passed else "FAIL")
    return f"{name:<34}|{cell(ours_value)}|{cell(peer)}|{ratio}|{target:>24}| {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=50, help="heuristic episodes to clone")
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3, help="speed measurements per variant (median)")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--babyai-episodes", type=int, default=0, help="bot demos for the BabyAI clone (0: skip)")
    parser.add_argument("--babyai-updates", type=int, default=20000)
    parser.add_argument("--device", default="cpu", help="device for the BabyAI clone")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        data = record("LunarLander-v3", args.episodes, scratch_dir / "expert")
        dataset = records_to_dataset(load_records(data))
        bare = statistics.median(bare_loop_updates_per_second(dataset.observations, dataset.actions, args.updates)
                                 for _ in range(args.repeats))
        our_speeds = [ours(data, scratch_dir / f"ours{i}", args.updates, "LunarLander-v3", "cpu") for i in range(args.repeats)]
        our_speed = statistics.median(our_speeds)
        peer_runs = [d3rlpy_updates_per_second(data, args.updates) for _ in range(args.repeats)]
        peer_speed = statistics.median(peer_runs) if isinstance(peer_runs[0], float) else peer_runs[0]

        clone = clone_return(scratch_dir / "ours0", "LunarLander-v3", args.eval_episodes)
        expert = rollout("LunarLander-v3", PolicyConfig(), RunnerConfig(n_episodes=args.eval_episodes, seed=EVAL_SEED_OFFSET,
                         record_trajectory=False), scratch_dir / "expert_eval", **QUIET)

        print(f"\nBehavioural cloning, LunarLander-v3, {args.episodes} heuristic episodes, MLP 256x2, batch 256, "
              f"{args.updates} updates, torch threads {torch.get_num_threads()}, median of {args.repeats}")
        print(f"{'measure':<34}|{'ours':>12}|{'peer':>12}|{'ratio':>8}|{'target':>24}|")
        print("-" * 100)
        print(row("updates/s vs bare torch loop", our_speed, bare, ">= 0.9x bare loop", our_speed >= 0.9 * bare))
        print(row("updates/s vs d3rlpy DiscreteBC", our_speed, peer_speed, ">= 3x d3rlpy",
                  our_speed >= 3 * peer_speed if isinstance(peer_speed, float) else None))
        print(row(f"clone vs heuristic return ({args.eval_episodes} ep)", clone["mean_return"], expert["mean"],
                  ">= 0.95x heuristic", clone["mean_return"] >= 0.95 * expert["mean"]))

        if args.babyai_episodes:
            bot_data = record("BabyAI-GoToLocal-v0", args.babyai_episodes, scratch_dir / "bot")
            speed = ours(bot_data, scratch_dir / "babyai", args.babyai_updates, "BabyAI-GoToLocal-v0", args.device,
                         eval_every=args.babyai_updates)
            success = clone_return(scratch_dir / "babyai", "BabyAI-GoToLocal-v0", args.eval_episodes)["success_rate"]
            print(row(f"BabyAI clone success ({args.babyai_episodes} demos)", success, 1.0, ">= 0.9 (CPU), 0.99 (GPU)",
                      success >= 0.9))
            print(f"(BabyAI: {args.babyai_updates} updates at {speed:.0f} updates/s on {args.device}, feed-forward model)")


if __name__ == "__main__":
    main()
