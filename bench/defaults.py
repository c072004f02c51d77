"""The README's commands with their default budgets and settings: do they reach the figures the README quotes?

    python bench/defaults.py                                  # every part, about 2 hours on 2 CPU cores
    python bench/defaults.py --parts babyai lunar cartpole    # the clones and the POMDP (about 45 minutes)
    python bench/defaults.py --parts dagger pipelines --demos outputs/<a 20k bot recording>/trajectory_data

Each row runs a command as a user copies it, through the real `run`, adding only what the
command leaves to the user (the dataset it reads, a scratch run directory, a training seed) or the
one budget that a row varies (DAgger's labels). Tuned defaults (conf/tuned/) apply as they would
for the user. Every policy is scored with its best.pt on seeds that neither the recordings nor
training's evaluations used. Rows and targets:

- babyai: `run -cn conf_train env=BabyAI-GoToLocal-v0` (a GRU, the grid default) on 10k bot demos: >= 0.95
  success on 500 seeds in <= 15 minutes; with model.memory=none >= 0.90.
- dagger: `run algorithm=dagger env=BabyAI-GoToLocal-v0`: >= 0.95 success with <= 100k labels in
  <= 20 minutes; DAgger (algorithm.total_steps=N) against BC on N labels of bot demos (whole
  episodes, the last cut to fit) at 10k, 30k and 100k labels: DAgger >= BC at each.
- lunar: `run -cn conf_train algorithm=bc` on 50 heuristic episodes, 5 training seeds:
  mean >= 0.95x the heuristic on 100 seeds.
- cartpole: `run env=CartPole-v1 wrappers=mask_velocity algorithm=ppo model.memory=gru` >= 195;
  the same without memory < 100 (the velocities are hidden: the task needs memory).
- pipelines: `run pipeline=dagger_ppo env=BabyAI-GoToLocal-v0` and `run pipeline=bc_ppo`: the final
  score, and the last stage >= the stage before.

Exits non-zero when a row misses its target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import Table, evaluate_run, expert_return, labelled_subset, load_average, record, run

from mazerun.nn.checkpoint import load_checkpoint

BABYAI = "BabyAI-GoToLocal-v0"
LUNAR = "LunarLander-v3"
PARTS = ("babyai", "dagger", "lunar", "cartpole", "pipelines")


def timed(work: Path, name: str, *overrides: str) -> float:
    """The real `run <overrides>` into ``work/name``, said on stderr; its wall seconds."""
    print(f"  run {' '.join(overrides)}", file=sys.stderr)
    seconds = run(*overrides, f"hydra.run.dir={name}", cwd=work)
    print(f"    {seconds / 60:.1f} min", file=sys.stderr)
    return seconds


def success(work: Path, name: str, episodes: int) -> float:
    return evaluate_run(work / name, episodes)["success_rate"]


def babyai(args: argparse.Namespace, work: Path, demos: Path, table: Table) -> None:
    data = f"runner.dataset.dir_or_file={demos}"
    ten_k = f"runner.dataset.max_episodes={10_000}"
    minutes = timed(work, "bc_gru", "-cn", "conf_train", f"env={BABYAI}", data, ten_k) / 60
    recurrent = success(work, "bc_gru", args.babyai_episodes)
    timed(work, "bc_ff", "-cn", "conf_train", f"env={BABYAI}", "model.memory=none", data, ten_k)
    feed_forward = success(work, "bc_ff", args.babyai_episodes)
    table.add("BabyAI BC, 10k demos, GRU (default): success", recurrent, None, ">= 0.95", recurrent >= 0.95)
    table.add("BabyAI BC, 10k demos, GRU (default): minutes", minutes, None, "<= 15", minutes <= 15)
    table.add("BabyAI BC, 10k demos, model.memory=none: success", feed_forward, None, ">= 0.90", feed_forward >= 0.90)


def dagger(args: argparse.Namespace, work: Path, demos: Path, table: Table) -> None:
    minutes = timed(work, "dagger", "algorithm=dagger", f"env={BABYAI}") / 60
    labels = int(load_checkpoint(work / "dagger" / "last.pt").extra["step"])
    default = success(work, "dagger", args.babyai_episodes)
    table.add("BabyAI DAgger, defaults: success", default, None, ">= 0.95", default >= 0.95)
    table.add("BabyAI DAgger, defaults: labels", float(labels), None, "<= 100000", labels <= 100_000)
    table.add("BabyAI DAgger, defaults: minutes", minutes, None, "<= 20", minutes <= 20)
    for budget in args.label_budgets:
        name = "dagger" if budget == labels else f"dagger_{budget}"
        if name != "dagger":
            timed(work, name, "algorithm=dagger", f"env={BABYAI}", f"algorithm.total_steps={budget}")
        subset = labelled_subset(demos, budget, work / f"bc_{budget}_data")
        timed(work, f"bc_{budget}", "-cn", "conf_train", f"env={BABYAI}", f"runner.dataset.dir_or_file={subset}")
        ours, peer = success(work, name, args.babyai_episodes), success(work, f"bc_{budget}", args.babyai_episodes)
        table.add(f"BabyAI {budget // 1000}k labels: DAgger vs BC success", ours, peer, ">= BC", ours >= peer)


def lunar(args: argparse.Namespace, work: Path, table: Table) -> None:
    demos = record(LUNAR, 50, work / "lunar_heuristic")
    expert = expert_return(LUNAR, args.lunar_episodes, work / "lunar_expert")["mean"]
    returns = []
    for seed in range(args.lunar_seeds):
        timed(work, f"lunar_bc_{seed}", "-cn", "conf_train", "algorithm=bc", f"runner.dataset.dir_or_file={demos}",
              f"runner.seed={seed}")
        returns.append(evaluate_run(work / f"lunar_bc_{seed}", args.lunar_episodes)["mean_return"])
        print(f"    seed {seed}: {returns[-1]:.1f}", file=sys.stderr)
    mean = statistics.mean(returns)
    table.add(f"LunarLander BC, 50 episodes, mean of {args.lunar_seeds} seeds: return", mean, expert,
              ">= 0.95x heuristic", mean >= 0.95 * expert)


def cartpole(args: argparse.Namespace, work: Path, table: Table) -> None:
    scores = {}
    for name, memory in (("gru", ["model.memory=gru"]), ("ff", [])):
        timed(work, f"cartpole_{name}", "env=CartPole-v1", "wrappers=mask_velocity", "algorithm=ppo", *memory)
        scores[name] = evaluate_run(work / f"cartpole_{name}", args.cartpole_episodes)["mean_return"]
    table.add("CartPole, velocities hidden, PPO model.memory=gru: return", scores["gru"], None, ">= 195",
              scores["gru"] >= 195)
    table.add("CartPole, velocities hidden, PPO without memory: return", scores["ff"], None, "< 100",
              scores["ff"] < 100)


def pipelines(args: argparse.Namespace, work: Path, table: Table) -> None:
    for name, overrides, metric, episodes in (
        ("dagger_ppo", ["pipeline=dagger_ppo", f"env={BABYAI}"], "success_rate", args.babyai_episodes),
        ("bc_ppo", ["pipeline=bc_ppo"], "mean_return", args.lunar_episodes),
    ):
        timed(work, name, *overrides)
        stages = json.loads((work / name / "pipeline.json").read_text())["stages"]
        trained = [work / name / stage["dir"] for stage in stages if stage["algorithm"] != "record"]
        before, last = (evaluate_run(stage_dir, episodes)[metric] for stage_dir in trained[-2:])
        label = "success" if metric == "success_rate" else "return"
        table.add(f"pipeline={name}: final {label} vs the stage before", last, before, ">= the stage before",
                  last >= before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--demos", type=Path, help="a trajectory_data of >= 20k bot demos on GoToLocal (else recorded)")
    parser.add_argument("--babyai-episodes", type=int, default=500)
    parser.add_argument("--lunar-episodes", type=int, default=100)
    parser.add_argument("--cartpole-episodes", type=int, default=100)
    parser.add_argument("--lunar-seeds", type=int, default=5)
    parser.add_argument("--label-budgets", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a scratch one)")
    args = parser.parse_args()
    print(f"bench/defaults.py, {load_average()}", file=sys.stderr)
    table = Table("README commands with their defaults, best.pt on unseen seeds, 2 CPU cores", peer_name="peer")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        demos = args.demos
        if demos is None and {"babyai", "dagger"} & set(args.parts):
            episodes = max(10_000, max(args.label_budgets) // 5 + 1000) if "dagger" in args.parts else 10_000
            demos = record(BABYAI, episodes, work / "bot")
        for part in args.parts:
            print(f"{part}:", file=sys.stderr)
            if part == "babyai":
                babyai(args, work, demos, table)
            elif part == "dagger":
                dagger(args, work, demos, table)
            elif part == "lunar":
                lunar(args, work, table)
            elif part == "cartpole":
                cartpole(args, work, table)
            else:
                pipelines(args, work, table)
            print(table.render(), file=sys.stderr)
    print(table.render())
    print(f"({load_average()})")
    sys.exit(table.exit_code())


if __name__ == "__main__":
    main()
