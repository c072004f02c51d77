"""DAgger against behavioural cloning with the same number of expert labels.

    python bench/dagger.py                          # LunarLander-v3 at 2k, 5k, 10k, 20k labels
    python bench/dagger.py --babyai                 # also BabyAI-GoToLocal-v0 at 10k, 30k, 100k labels
    python bench/dagger.py --budgets 2000 --babyai-budgets 10000 --eval-episodes 20   # a quick look

BC clones the expert's own episodes (whole episodes up to the budget, the last one cut to fit);
DAgger spends the same budget on states its learner visits, each labelled by the expert. Both
train the same model for the same number of gradient updates through the real `run` command,
and both are scored with their best.pt on unseen seeds (neither recorded nor used to pick
best.pt), averaged over ``--seeds`` training seeds: one LunarLander run's return moves by
tens between seeds, as much as the difference being measured. Targets: DAgger >= BC at every budget; LunarLander: DAgger >= 0.95x the heuristic by
10k labels; BabyAI: DAgger >= 0.95 success with <= 100k labels on CPU. Exits non-zero when a
target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import Table, evaluate_run, expert_return, labelled_subset, load_average, record, run


def compare(env_id: str, budgets: list[int], args: argparse.Namespace, scratch: Path, table: Table) -> dict:
    metric = "success_rate" if env_id.startswith("BabyAI") else "mean_return"
    demos = record(env_id, args.demo_episodes[env_id], scratch / env_id / "demos")
    expert = expert_return(env_id, args.eval_episodes, scratch / env_id / "expert")
    expert_value = expert.get("success_rate", expert["mean"]) if metric == "success_rate" else expert["mean"]
    common = [f"env={env_id}" if env_id != "LunarLander-v3" else "env=LunarLander-v3",
              f"runner.eval_repeats={args.selection_episodes}", *args.model[env_id]]
    results = {}
    for budget in budgets:
        dagger_scores, bc_scores = [], []
        for seed in range(args.seeds):
            work = scratch / env_id / f"{budget}_{seed}"
            work.mkdir(parents=True)
            updates = args.updates[env_id]
            data = labelled_subset(demos, budget, work / "bc_data")
            trained = [*common, f"runner.seed={seed}", f"algorithm.n_updates={updates}"]
            run("-cn", "conf_train", *trained, f"runner.dataset.dir_or_file={data}",
                f"algorithm.eval_every={max(updates // 5, 1)}", "algorithm.validation_percentage=0", "hydra.run.dir=bc",
                cwd=work)
            n_envs, n_steps = args.dagger_envs[env_id], args.dagger_steps[env_id]
            run("algorithm=dagger", *trained, f"algorithm.total_steps={budget}",
                f"algorithm.eval_every={max(budget // 5, n_envs * n_steps)}", f"runner.n_envs={n_envs}",
                f"algorithm.n_steps={n_steps}", "hydra.run.dir=dagger", cwd=work)
            bc_scores.append(evaluate_run(work / "bc", args.eval_episodes)[metric])
            dagger_scores.append(evaluate_run(work / "dagger", args.eval_episodes)[metric])
            print(f"  {env_id} {budget} labels, seed {seed}: DAgger {dagger_scores[-1]:.3f}, BC {bc_scores[-1]:.3f}",
                  file=sys.stderr)
        dagger, bc = statistics.mean(dagger_scores), statistics.mean(bc_scores)
        results[budget] = (dagger, bc)
        name = "success" if metric == "success_rate" else "return"
        table.add(f"{env_id} {budget // 1000}k labels: {name}", dagger, bc, ">= BC", dagger >= bc)
    return {"expert": expert_value, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    parser.add_argument("--babyai", action="store_true", help="also compare on BabyAI-GoToLocal-v0")
    parser.add_argument("--babyai-budgets", type=int, nargs="+", default=[10000, 30000, 100000])
    parser.add_argument("--eval-episodes", type=int, default=100, help="unseen seeds per score (BabyAI: 3x)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per budget, scores averaged")
    parser.add_argument("--selection-episodes", type=int, default=20, help="episodes per evaluation that picks best.pt")
    parser.add_argument("--lunar-updates", type=int, default=4000)
    parser.add_argument("--babyai-updates", type=int, default=20000)
    args = parser.parse_args()
    args.demo_episodes = {"LunarLander-v3": max(args.budgets) // 150 + 20,
                          "BabyAI-GoToLocal-v0": max(args.babyai_budgets) // 4 + 500}
    args.updates = {"LunarLander-v3": args.lunar_updates, "BabyAI-GoToLocal-v0": args.babyai_updates}
    args.dagger_envs = {"LunarLander-v3": 4, "BabyAI-GoToLocal-v0": 16}
    args.dagger_steps = {"LunarLander-v3": 125, "BabyAI-GoToLocal-v0": 32}
    args.model = {"LunarLander-v3": [], "BabyAI-GoToLocal-v0": []}

    print(f"bench/dagger.py, {load_average()}", file=sys.stderr)
    table = Table("DAgger vs BC, same expert labels and updates, best.pt on unseen seeds", peer_name="BC")
    with tempfile.TemporaryDirectory() as scratch:
        lunar = compare("LunarLander-v3", args.budgets, args, Path(scratch), table)
        by_10k = [value for budget, (value, _) in lunar["results"].items() if budget >= 10000]
        if by_10k:
            table.add("LunarLander DAgger by 10k labels vs heuristic", by_10k[0], lunar["expert"],
                      ">= 0.95x heuristic", by_10k[0] >= 0.95 * lunar["expert"])
        if args.babyai:
            args.eval_episodes *= 3
            babyai = compare("BabyAI-GoToLocal-v0", args.babyai_budgets, args, Path(scratch), table)
            best = max(value for value, _ in babyai["results"].values())
            table.add(f"BabyAI DAgger success, <= {max(args.babyai_budgets) // 1000}k labels", best,
                      babyai["expert"], ">= 0.95 success", best >= 0.95)
    print(table.render())
    print(f"({load_average()})")
    sys.exit(table.exit_code())


if __name__ == "__main__":
    main()
