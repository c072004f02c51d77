"""The dagger_ppo pipeline against PPO from scratch on LunarLander-v3: return curves on one plot.

    python bench/pipeline.py                                   # 20k DAgger labels, then PPO to 300k steps
    python bench/pipeline.py --dagger-steps 10000 --ppo-steps 100000 --eval-every 25000   # a quick look

Both runs go through the real `run` command with rl-zoo's PPO settings; the pipeline's counter
counts DAgger's env steps too, so both curves are against all environment steps taken.
Targets: after its DAgger stage the pipeline's evaluation return never drops below 200, and it
is ahead of PPO from scratch at every evaluation up to 300k steps. Writes
`bench/pipeline_vs_scratch.svg` and exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import Table, load_average, run

from mazerun.training.metrics import evaluation_curve, plot_curves

PLOT = Path(__file__).resolve().parent / "pipeline_vs_scratch.svg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dagger-steps", type=int, default=20000)
    parser.add_argument("--ppo-steps", type=int, default=300000, help="PPO env steps after DAgger (scratch: the total)")
    parser.add_argument("--eval-every", type=int, default=25000)
    parser.add_argument("--eval-episodes", type=int, default=30)
    parser.add_argument("--floor", type=float, default=200.0)
    args = parser.parse_args()
    print(f"bench/pipeline.py, {load_average()}", file=sys.stderr)
    common = [f"runner.eval_repeats={args.eval_episodes}"]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        pipeline_time = run("pipeline=dagger_ppo", f"pipeline.stages.dagger.total_steps={args.dagger_steps}",
                            f"pipeline.stages.dagger.eval_every={args.dagger_steps}",
                            f"pipeline.stages.ppo.total_steps={args.ppo_steps}",
                            f"pipeline.stages.ppo.eval_every={args.eval_every}", *common, "hydra.run.dir=pipeline",
                            cwd=work)
        scratch_time = run("algorithm=ppo", f"algorithm.total_steps={args.dagger_steps + args.ppo_steps}",
                           f"algorithm.eval_every={args.eval_every}", *common, "hydra.run.dir=scratch", cwd=work)
        dagger = evaluation_curve(work / "pipeline" / "dagger")
        ppo = evaluation_curve(work / "pipeline" / "ppo")
        scratch_curve = evaluation_curve(work / "scratch")
    curves = {"dagger_ppo: DAgger stage": dagger, "dagger_ppo: PPO stage": ppo, "PPO from scratch": scratch_curve}
    plot_curves(PLOT, curves, "LunarLander-v3: DAgger then PPO vs PPO from scratch", xlabel="environment steps")

    lowest = min(ppo[1])
    # Scratch's return at the pipeline's evaluation steps, between its own evaluations by interpolation.
    scratch_at = np.interp(ppo[0], *scratch_curve)
    behind = [step for step, value, other in zip(ppo[0], ppo[1], scratch_at) if value <= other]
    table = Table(f"dagger_ppo vs PPO from scratch, LunarLander-v3, {args.eval_episodes} episodes per evaluation",
                  peer_name="scratch")
    table.add("lowest return after the DAgger stage", lowest, min(scratch_curve[1]), f">= {args.floor:g}",
              lowest >= args.floor)
    table.add("evaluations where the pipeline leads", float(len(ppo[0]) - len(behind)), float(len(ppo[0])),
              "all of them", not behind)
    table.add("final return", ppo[1][-1], scratch_curve[1][-1])
    table.add("wall time (s)", pipeline_time, scratch_time)
    print(table.render())
    for step, value, other in zip(ppo[0], ppo[1], scratch_at):
        print(f"  step {step:>7}: pipeline {value:8.1f}   scratch {other:8.1f}")
    print(f"plot: {PLOT}  ({load_average()})")
    sys.exit(table.exit_code())


if __name__ == "__main__":
    main()
