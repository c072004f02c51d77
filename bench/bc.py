"""Behavioural cloning: our update speed against a bare torch loop and d3rlpy, and the clone's quality.

    python bench/bc.py                        # LunarLander-v3, 50 heuristic episodes, 3000 updates
    python bench/bc.py --babyai-episodes 10000 --babyai-updates 20000 --device cuda
    python bench/bc.py --smoke                # tiny budgets: checks the wiring, not the targets

Every speed figure trains the same MLP (8-256-256-4, tanh: our BC default) with batch 256 on the
same recorded data, with torch's default thread count:

* bare loop: tensors in memory, one gather, a forward, a cross-entropy, a backward and an Adam
  step per update (the fastest honest loop);
* ours: the whole training call of ``run -cn conf_train algorithm=bc`` (``mazerun.training.train.train``:
  loading the records, building the tensors, training, one report with one evaluation episode),
  so its ratio to the bare loop is a lower bound;
* d3rlpy: DiscreteBC's ``fit()`` alone, in a worker process (the ``bench`` extra; see README).

Quality: our default clone (``run -cn conf_train``: 3000 updates, 10 % of the episodes held out,
best.pt by validation loss) and the heuristic play the same 100 unseen seeds. Targets: ours
>= 0.9x the bare loop and >= 3x d3rlpy; the clone >= 0.95x the heuristic. The command exits 1
when a target is missed or d3rlpy is missing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    D3RLPY_INSTALL,
    Table,
    d3rlpy_run,
    evaluate_run,
    expert_return,
    load_average,
    peer_version,
    record,
    run,
)

from mazerun.algorithms.bc import BCConfig
from mazerun.config.schemas import DatasetConfig, EnvConfig, RunConfig, RunnerConfig
from mazerun.data.records import load_records
from mazerun.data.tensors import records_to_dataset
from mazerun.training.train import train

LUNAR_ENV = "LunarLander-v3"
BABYAI_ENV = "BabyAI-GoToLocal-v0"


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


def ours_updates_per_second(data: Path, run_dir: Path, updates: int, env_id: str, device: str) -> float:
    """Updates/s of the whole `run -cn conf_train algorithm=bc` training call."""
    config = RunConfig(
        env=EnvConfig(name=env_id),
        runner=RunnerConfig(dataset=DatasetConfig(dir_or_file=str(data)), eval_repeats=1),
        algorithm=BCConfig(n_updates=updates, eval_every=updates, validation_percentage=0),
        device=device,
    )
    start = time.perf_counter()
    train(config, run_dir)
    return updates / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=50, help="heuristic episodes to clone")
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3, help="speed measurements per variant (median)")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--clone-updates", type=int, default=BCConfig.n_updates, help="updates of the default clone")
    parser.add_argument("--babyai-episodes", type=int, default=0, help="bot demos for the BabyAI clone (0: skip)")
    parser.add_argument("--babyai-updates", type=int, default=20000)
    parser.add_argument("--device", default="cpu", help="device for the BabyAI clone")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: checks the wiring, not the targets")
    args = parser.parse_args()
    if args.smoke:
        args.episodes, args.updates, args.repeats, args.eval_episodes, args.clone_updates = 3, 20, 1, 2, 20

    version = peer_version("d3rlpy", D3RLPY_INSTALL)
    print(f"bench/bc.py: {load_average()}", file=sys.stderr)
    table = Table(f"Behavioural cloning, {LUNAR_ENV}, {args.episodes} heuristic episodes, MLP 256x256 tanh, batch 256, "
                  f"{args.updates} updates, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-bc-") as scratch, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        work = Path(scratch)
        data = record(LUNAR_ENV, args.episodes, work / "expert")
        dataset = records_to_dataset(load_records(data))
        speeds: dict[str, list[float]] = {"bare": [], "ours": [], "d3rlpy": []}
        for index in range(args.repeats):  # rounds, so that a change in the machine's load hits every variant
            print(f"  round {index + 1}/{args.repeats} ({load_average()})", file=sys.stderr, flush=True)
            speeds["bare"].append(bare_loop_updates_per_second(dataset.observations, dataset.actions, args.updates))
            speeds["ours"].append(ours_updates_per_second(data, work / f"ours{index}", args.updates, LUNAR_ENV, "cpu"))
            if version:
                fitted = pool.submit(d3rlpy_run, "bc", data, [args.updates], seed=0, threads=torch.get_num_threads(),
                                     hidden_units=(256, 256), activation="tanh").result()
                speeds["d3rlpy"].append(args.updates / fitted[args.updates][0])
            print("    " + ", ".join(f"{name} {values[-1]:.1f}" for name, values in speeds.items() if values)
                  + " updates/s", file=sys.stderr, flush=True)
        ours, bare = statistics.median(speeds["ours"]), statistics.median(speeds["bare"])
        peer = statistics.median(speeds["d3rlpy"]) if speeds["d3rlpy"] else "missing"
        table.add("BC updates/s vs a bare torch loop", ours, bare, ">= 0.9x", ours >= 0.9 * bare)
        table.add("BC updates/s vs d3rlpy DiscreteBC fit()", ours, peer, ">= 3x",
                  isinstance(peer, float) and ours >= 3 * peer)

        run("-cn", "conf_train", f"runner.dataset.dir_or_file={data}", f"algorithm.n_updates={args.clone_updates}",
            "hydra.run.dir=clone", cwd=work)
        clone = evaluate_run(work / "clone", args.eval_episodes)["mean_return"]
        expert = expert_return(LUNAR_ENV, args.eval_episodes, work / "expert_eval")["mean"]
        table.add(f"default clone vs heuristic return ({args.eval_episodes} ep.)", clone, expert, ">= 0.95x",
                  clone >= 0.95 * expert)

        if args.babyai_episodes:
            bot_data = record(BABYAI_ENV, args.babyai_episodes, work / "bot")
            speed = ours_updates_per_second(bot_data, work / "babyai", args.babyai_updates, BABYAI_ENV, args.device)
            success = evaluate_run(work / "babyai", args.eval_episodes)["success_rate"]
            table.add(f"BabyAI clone success ({args.babyai_episodes} demos)", success, 1.0, ">= 0.9 (CPU)",
                      success >= 0.9)
            print(f"(BabyAI: {args.babyai_updates} updates at {speed:.0f} updates/s on {args.device}, feed-forward model)")
    print(table.render())
    print(f"({load_average()}; {time.perf_counter() - started:.0f} s in all)")
    return table.exit_code()


if __name__ == "__main__":
    sys.exit(main())
