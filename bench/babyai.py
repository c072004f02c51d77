"""BabyAI-GoToLocal-v0: feed-forward against recurrent cloning of the bot, DAgger, and a POMDP for PPO.

    python bench/babyai.py                                  # 1k, 3k, 10k demos; recurrent DAgger; CartPole POMDP
    python bench/babyai.py --demos 1000 --updates 2000 --eval-episodes 100 --skip-dagger --skip-cartpole

Every clone trains on CPU through the real `run` command, on the first N of one set of 10k bot
demos (`runner.dataset.max_episodes`), for the same number of updates at the same learning rate
(1e-3, decaying linearly to 0), and is scored with its best.pt on unseen seeds. Targets: the
recurrent clone of 10k demos reaches >= 0.95 success in <= 15 minutes of CPU training, and beats
the feed-forward clone at every demo count. Also
reported: recurrent DAgger's success and the labels it took, and PPO on CartPole with its
velocities hidden (feed-forward against recurrent, return after 200k steps). Exits non-zero
when a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import Table, evaluate_run, load_average, record, run

ENV = "BabyAI-GoToLocal-v0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--updates", type=int, default=10000, help="gradient steps of every clone")
    parser.add_argument("--eval-episodes", type=int, default=500, help="unseen seeds per score")
    parser.add_argument("--minutes", type=float, default=15.0, help="CPU training time the 10k recurrent clone may take")
    parser.add_argument("--dagger-steps", type=int, default=60000, help="labels of the recurrent DAgger run")
    parser.add_argument("--cartpole-steps", type=int, default=200000)
    parser.add_argument("--skip-dagger", action="store_true")
    parser.add_argument("--skip-cartpole", action="store_true")
    args = parser.parse_args()
    print(f"bench/babyai.py, {load_average()}", file=sys.stderr)
    table = Table(f"{ENV}: clones of the bot on CPU, {args.updates} updates, success on {args.eval_episodes} "
                  "unseen seeds", peer_name="feed-fwd")
    recurrent = ["model.memory=gru", "algorithm.rollout_len=16", "algorithm.nrollouts=16"]
    # both kinds: a rate 3x the default that decays to 0 (0.946 -> 0.990 success for the recurrent 10k clone)
    optimiser = ["algorithm.lr=0.001", "algorithm.lr_schedule=linear"]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        demos = record(ENV, max(args.demos), work / "bot")
        for count in args.demos:
            scores, times = {}, {}
            for name, extra in (("feed-forward", ["model.memory=none"]), ("recurrent", recurrent)):
                run_dir = f"{name}_{count}"
                times[name] = run("-cn", "conf_train", f"env={ENV}", "model=minigrid", *extra, *optimiser,
                                  f"runner.dataset.dir_or_file={demos}", f"runner.dataset.max_episodes={count}",
                                  f"algorithm.n_updates={args.updates}", f"algorithm.eval_every={args.updates // 5}",
                                  "runner.eval_repeats=100", "algorithm.validation_percentage=0",
                                  f"hydra.run.dir={run_dir}", cwd=work)
                scores[name] = evaluate_run(work / run_dir, args.eval_episodes)["success_rate"]
                print(f"  {count} demos, {name}: success {scores[name]:.3f} in {times[name]:.0f} s "
                      f"({args.updates / times[name]:.1f} updates/s)", file=sys.stderr)
            table.add(f"{count} demos: recurrent vs feed-forward", scores["recurrent"], scores["feed-forward"],
                      "> feed-forward", scores["recurrent"] > scores["feed-forward"])
            if count == max(args.demos):
                table.add(f"{count} demos: recurrent success", scores["recurrent"], None, ">= 0.95",
                          scores["recurrent"] >= 0.95)
                table.add(f"{count} demos: recurrent training (min)", times["recurrent"] / 60, None,
                          f"<= {args.minutes:g}", times["recurrent"] / 60 <= args.minutes)
                table.add(f"{count} demos: updates/s, recurrent vs ff", args.updates / times["recurrent"],
                          args.updates / times["feed-forward"])
        if not args.skip_dagger:
            run("algorithm=dagger", f"env={ENV}", "model=minigrid", *recurrent, *optimiser,
                f"algorithm.total_steps={args.dagger_steps}", f"algorithm.n_updates={args.updates}",
                f"algorithm.eval_every={args.dagger_steps // 5}", "runner.eval_repeats=100", "hydra.run.dir=dagger",
                cwd=work)
            table.add(f"recurrent DAgger, {args.dagger_steps // 1000}k labels: success",
                      evaluate_run(work / "dagger", args.eval_episodes)["success_rate"], None)
        if not args.skip_cartpole:
            returns = {}
            for name, extra in (("feed-forward", []), ("recurrent", ["model.memory=gru"])):
                # rl-zoo's CartPole settings; a rollout of 8 envs x 32 steps is one minibatch of whole sequences
                run("env=CartPole-v1", "wrappers=mask_velocity", "algorithm=ppo", *extra,
                    f"algorithm.total_steps={args.cartpole_steps}", "algorithm.n_steps=32", "runner.n_envs=8",
                    "algorithm.batch_size=256", "algorithm.n_epochs=20", "algorithm.gamma=0.98",
                    "algorithm.gae_lambda=0.8", "algorithm.ent_coef=0.0", "algorithm.lr=0.001",
                    "algorithm.lr_schedule=linear", "algorithm.clip_schedule=linear", "algorithm.eval_every=50000",
                    f"hydra.run.dir=cartpole_{name}", cwd=work)
                returns[name] = evaluate_run(work / f"cartpole_{name}", 100, "last.pt")["mean_return"]
            table.add(f"CartPole, velocities hidden, PPO {args.cartpole_steps // 1000}k: return", returns["recurrent"],
                      returns["feed-forward"], "> feed-forward", returns["recurrent"] > returns["feed-forward"])
    print(table.render())
    print(f"({load_average()})")
    sys.exit(table.exit_code())


if __name__ == "__main__":
    main()
