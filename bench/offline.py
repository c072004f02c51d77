"""Offline learning on noisy LunarLander data: our whole `run` command against d3rlpy's `fit()`, and CQL's return.

    python bench/offline.py [--episodes 200] [--updates 5000] [--repeats 3] [--quality-updates 2000 20000]
                            [--seeds 0 1 2] [--long-seeds 0] [--eval-episodes 100] [--threads 0]
                            [--parts speed quality others]
    python bench/offline.py --smoke     # tiny budgets: checks the wiring, not the targets

d3rlpy comes from the bench extra (see README: ``pip install -e ".[bench]"`` and
``pip install --no-deps "d3rlpy==2.8.1"``); it runs in a spawned worker process with the same
torch thread count as our command (``--threads``, 0: torch's default, the cores this process may use).

1. Data: ``--episodes`` episodes of gymnasium's LunarLander heuristic with 30 % random actions,
   recorded by our ``run`` (episode i seeded i). Every learner reads exactly these transitions (a
   truncated episode's last step bootstraps from its final observation in both libraries).
   Networks: 256x256 ReLU (d3rlpy's default encoder; ``model.activation=relu`` on our side), batch
   256, lr 3e-4, gamma 0.99, observations standardised with the dataset's statistics.
2. speed: ``--updates`` updates of CQL and of BC, ``--repeats`` rounds of ours then d3rlpy (medians). Ours
   is the whole command, from launch to exit:
   start-up, loading the records, building the tensors, training, the reports every 2000 updates
   (CQL's default; 10 evaluation episodes each) and checkpoints:
   ``run -cn conf_train algorithm=cql|bc algorithm.n_updates=5000 algorithm.eval_every=2000 ...``.
   The peer is d3rlpy's ``fit()`` alone (DiscreteCQL: alpha 1, hard target copy every 1000
   updates; DiscreteBC), its dataset built and its networks created before the clock starts.
   As updates/s; target >= 3x for both.
3. quality: CQL's return after each of ``--quality-updates``, our defaults (``algorithm=cql``)
   against d3rlpy's DiscreteCQL as above: the final policy plays ``--eval-episodes`` greedy episodes
   on seeds no run has seen (2,000,000 + i), a mean over ``--seeds`` (``--long-seeds`` for budgets
   above 5000). Target: ours >= d3rlpy at every budget.
4. others (shown, no target): IQL and BC with their defaults at the largest quality budget, for
   what value learning buys over cloning noisy data, and the data's own return.

The command exits 1 when a target is missed or d3rlpy is missing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import D3RLPY_INSTALL, Table, d3rlpy_run, evaluate_run, load_average, peer_version, run

ENV_ID = "LunarLander-v3"
EPSILON = 0.3
HIDDEN_UNITS = (256, 256)
ACTIVATION = "relu"
BATCH_SIZE = 256
REPORT_EVERY = 2000
SPEED_TARGET = 3.0
MODEL = [f"model.hidden_sizes=[{','.join(map(str, HIDDEN_UNITS))}]", f"model.activation={ACTIVATION}"]


def ours(work: Path, name: str, algorithm: str, updates: int, data_dir: Path, *extra: str) -> float:
    """Our whole `run` command; returns its wall seconds."""
    return run("-cn", "conf_train", f"algorithm={algorithm}", f"algorithm.n_updates={updates}",
               f"runner.dataset.dir_or_file={data_dir}", *MODEL, *extra, f"hydra.run.dir={name}", cwd=work)


def speed(args: argparse.Namespace, work: Path, data_dir: Path, pool: ProcessPoolExecutor | None,
          table: Table) -> None:
    for algorithm, extra in (("cql", []), ("bc", ["algorithm.validation_percentage=0"])):
        ours_rates, peer_rates = [], []
        for repeat in range(args.repeats):  # alternating, so that a noisy minute hits both sides alike
            say(f"speed: {algorithm}, {args.updates} updates, round {repeat + 1}/{args.repeats} ({load_average()})")
            seconds = ours(work, f"speed_{algorithm}_{repeat}", algorithm, args.updates, data_dir,
                           f"algorithm.eval_every={min(REPORT_EVERY, args.updates)}", *extra)
            ours_rates.append(args.updates / seconds)
            if pool is not None:
                fitted = pool.submit(d3rlpy_run, algorithm, data_dir, [args.updates], seed=0, threads=args.threads,
                                     hidden_units=HIDDEN_UNITS, activation=ACTIVATION).result()
                peer_rates.append(args.updates / fitted[args.updates][0])
            say(f"  ours {ours_rates[-1]:.1f} updates/s" + (f", d3rlpy {peer_rates[-1]:.1f}" if peer_rates else ""))
        ours_rate = statistics.median(ours_rates)
        peer: float | str = statistics.median(peer_rates) if peer_rates else "missing"
        name = "DiscreteCQL" if algorithm == "cql" else "DiscreteBC"
        table.add(f"{algorithm.upper()} {args.updates:,} updates/s: run vs {name} fit()", ours_rate, peer,
                  f">= {SPEED_TARGET:g}x", isinstance(peer, float) and ours_rate >= SPEED_TARGET * peer)


def quality(args: argparse.Namespace, work: Path, data_dir: Path, pool: ProcessPoolExecutor | None,
            table: Table) -> None:
    budgets = sorted(args.quality_updates)
    for budget in budgets:
        seeds = args.seeds if budget <= 5000 else args.long_seeds
        returns = []
        for seed in seeds:
            say(f"quality: ours, CQL {budget} updates, seed {seed} ({load_average()})")
            name = f"cql_{budget}_{seed}"
            ours(work, name, "cql", budget, data_dir, f"runner.seed={seed}", f"algorithm.eval_every={budget}")
            returns.append(evaluate_run(work / name, args.eval_episodes, "last.pt")["mean_return"])
        peer: float | str = "missing"
        if pool is not None:
            peer_returns = []
            for seed in seeds:
                say(f"quality: d3rlpy, CQL {budget} updates, seed {seed} ({load_average()})")
                fitted = pool.submit(d3rlpy_run, "cql", data_dir, [budget], seed=seed, threads=args.threads,
                                     hidden_units=HIDDEN_UNITS, activation=ACTIVATION,
                                     eval_episodes=args.eval_episodes).result()
                peer_returns.append(fitted[budget][1])
            peer = statistics.fmean(peer_returns)
        mean = statistics.fmean(returns)
        table.add(f"CQL return, {budget:,} updates, seeds {seeds}", mean, peer, ">= d3rlpy",
                  isinstance(peer, float) and mean >= peer)
        say(f"  ours {[round(value, 1) for value in returns]}" + (f", d3rlpy {[round(v, 1) for v in peer_returns]}"
                                                                  if pool is not None else ""))


def others(args: argparse.Namespace, work: Path, data_dir: Path, data_return: float, table: Table) -> None:
    budget = max(args.quality_updates)
    for algorithm, extra in (("iql", []), ("bc", ["algorithm.validation_percentage=0"])):
        say(f"others: {algorithm} {budget} updates ({load_average()})")
        ours(work, f"{algorithm}_{budget}", algorithm, budget, data_dir, f"algorithm.eval_every={budget}", *extra)
        score = evaluate_run(work / f"{algorithm}_{budget}", args.eval_episodes, "last.pt")["mean_return"]
        table.add(f"{algorithm.upper()} return, {budget:,} updates (shown)", score, "-")
    table.add("the data's mean episode return (shown)", data_return, "-")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200, help="recorded noisy episodes (default 200)")
    parser.add_argument("--updates", type=int, default=5000, help="updates of the speed rows (default 5000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the speed rows, each ours then d3rlpy (median)")
    parser.add_argument("--quality-updates", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of budgets up to 5000")
    parser.add_argument("--long-seeds", type=int, nargs="+", default=[0], help="seeds of larger budgets")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="d3rlpy's torch threads; 0: torch's default, as ours")
    parser.add_argument("--parts", nargs="+", choices=("speed", "quality", "others"),
                        default=["speed", "quality", "others"])
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: checks the wiring, not the targets")
    args = parser.parse_args()
    if args.smoke:
        args.episodes, args.updates, args.quality_updates, args.seeds, args.repeats = 3, 20, [20], [0], 1
        args.eval_episodes = 2

    version = peer_version("d3rlpy", D3RLPY_INSTALL)
    say(f"bench/offline.py: {', '.join(args.parts)}; {load_average()}")
    table = Table(f"Offline learning, {args.episodes} noisy LunarLander episodes (epsilon {EPSILON}), "
                  f"{'x'.join(map(str, HIDDEN_UNITS))} {ACTIVATION}, batch {BATCH_SIZE}; peer: d3rlpy "
                  f"{version or '(missing)'}", peer_name="d3rlpy")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-offline-") as scratch, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        work = Path(scratch)
        say(f"recording {args.episodes} episodes of the heuristic with epsilon {EPSILON} ...")
        run(f"env={ENV_ID}", "policy=heuristic", f"policy.epsilon={EPSILON}", f"runner.n_episodes={args.episodes}",
            "hydra.run.dir=data", cwd=work)
        data_dir = work / "data" / "trajectory_data"
        data_return = json.loads((work / "data" / "rollout_stats.json").read_text())["mean"]
        peer_pool = pool if version else None
        if "speed" in args.parts:
            speed(args, work, data_dir, peer_pool, table)
        if "quality" in args.parts:
            quality(args, work, data_dir, peer_pool, table)
        if "others" in args.parts:
            others(args, work, data_dir, data_return, table)
    print(table.render())
    print(f"({load_average()}; {time.perf_counter() - started:.0f} s in all; d3rlpy threads: "
          f"{args.threads or 'torch default'})")
    return table.exit_code()


if __name__ == "__main__":
    sys.exit(main())
