"""Continuous control on Hopper-v5 against the peers: SAC against SB3, TD3+BC, IQL and CQL against d3rlpy on
datasets of our own, DAgger with a SAC teacher, and SAC's memory at a 1M-transition buffer.

    python bench/continuous.py                          # every part (hours on 2 cores)
    python bench/continuous.py --parts sac              # SAC against SB3 only
    python bench/continuous.py --work DIR               # keep the runs in DIR; a second call resumes there
    python bench/continuous.py --parts offline --offline-seeds 0 --offline-updates 2000   # a quick look
    python bench/continuous.py --smoke                  # tiny budgets: checks the wiring, not the targets

Needs the mujoco and bench extras and d3rlpy (see README). Peers run in a spawned worker process with
torch's default thread count, as our command does. Every score is the mean greedy return of a final
policy (our ``last.pt``; the peer's model after its training call) over ``--eval-episodes`` episodes on
seeds no run has seen (2,000,000 + i), the same seeds for every learner.

1. ``sac``: ``run env=Hopper-v5 algorithm=sac algorithm.total_steps=100000 runner.seed=S`` (SB3's defaults,
   the whole command, its 10 evaluations and checkpoints included) against SB3's ``SAC("MlpPolicy", env,
   seed=S).learn(100000)`` alone, for each of ``--seeds``. Targets: mean return >= SB3's; wall time of
   the median >= 2x faster.
2. ``offline``: ``python -m mazerun.datasets d4rl`` on the best of part 1's runs (the bench's expert: a
   100k-step one, where the README's pipeline trains 1M) gives Hopper ``medium`` and ``medium-replay``.
   On each, ``run -cn conf_train env=Hopper-v5 algorithm=td3_bc|iql|cql algorithm.n_updates=N`` against
   d3rlpy's TD3PlusBC, IQL and CQL ``fit()`` for the same N updates, each library with its own defaults,
   which give both the same 256-256 ReLU networks and observations standardised by the dataset. Targets: return >= d3rlpy's (mean over seeds); whole
   command >= 3x faster (median).
3. ``dagger``: ``run algorithm=dagger env=Hopper-v5 expert=torch_policy expert.input_dir=<the expert>
   algorithm.total_steps=25000``; target >= 0.9x the teacher's return. BC on 25k of the teacher's own
   labels (whole greedy episodes, the last cut) is shown beside it.
4. ``memory``: peak resident memory of ``run env=Hopper-v5 algorithm=sac`` filling a 1M-transition
   buffer (``algorithm.learning_starts`` = ``total_steps`` = 1M: collection alone, then last.pt with the
   buffer), and of SB3 collecting as many. Shown; no target.

The command exits 1 when a target is missed or a peer is missing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

from common import (
    D3RLPY_INSTALL,
    Table,
    d3rlpy_fit,
    evaluate_run,
    labelled_subset,
    load_average,
    peer_return,
    peer_version,
    run,
)

from mazerun.data.records import load_records

ENV_ID = "Hopper-v5"
SB3_INSTALL = 'pip install -e ".[bench,mujoco]"'
OFFLINE_ALGORITHMS = {"td3_bc": "TD3PlusBC", "iql": "IQL", "cql": "CQL"}
DATASETS = ("medium", "medium-replay")


def cached(path: Path, measure: Callable[[], dict[str, Any]], runs: tuple[str, ...] = ()) -> dict[str, Any]:
    """``measure()``'s result, kept as JSON at ``path`` so that a second call with the same ``--work`` resumes
    (``runs``, the run directories it makes beside ``path``, are removed first: an interrupted measurement's)."""
    if path.exists():
        return json.loads(path.read_text())
    for run_dir in runs:
        shutil.rmtree(path.parent / run_dir, ignore_errors=True)
    result = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def sb3_sac(steps: int, seed: int, eval_episodes: int, learning_starts: int = 100) -> dict[str, float]:
    """SB3's SAC with its defaults: the seconds ``learn()`` alone takes, the final policy's return and the
    process's peak resident memory (run it in a fresh worker)."""
    import gymnasium as gym
    from stable_baselines3 import SAC

    model = SAC("MlpPolicy", gym.make(ENV_ID), seed=seed, learning_starts=learning_starts, verbose=0)
    started = time.perf_counter()
    model.learn(total_timesteps=steps)
    seconds = time.perf_counter() - started
    score = peer_return(lambda obs: model.predict(obs, deterministic=True)[0], ENV_ID, eval_episodes)
    return {"seconds": seconds, "return": score, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def d3rlpy_box(algorithm: str, data_dir: str, updates: int, seed: int, eval_episodes: int) -> dict[str, float]:
    """d3rlpy's Box-action ``algorithm`` with its defaults (256-256 ReLU, standardised observations): the
    seconds ``fit()`` alone takes for ``updates`` steps and the final policy's return (run it in a fresh worker)."""
    import d3rlpy

    d3rlpy.seed(seed)
    config = getattr(d3rlpy.algos, f"{OFFLINE_ALGORITHMS[algorithm]}Config")(
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler())
    seconds, score = d3rlpy_fit(config, Path(data_dir), [updates], env_id=ENV_ID, eval_episodes=eval_episodes)[updates]
    return {"seconds": seconds, "return": score}


def peak_rss_mb(*overrides: str, cwd: Path) -> float:
    """The peak resident memory of the real `run <overrides>`, in MB (its process alone, read by ``time``)."""
    cwd.mkdir(parents=True, exist_ok=True)
    report = cwd / "rusage.txt"
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), sys.executable, "-m", "mazerun", *overrides],
                   cwd=cwd, check=True, capture_output=True)
    return int(report.read_text().split()[-1]) / 1024


def sac_part(args: argparse.Namespace, work: Path, pool: ProcessPoolExecutor, table: Table) -> Path:
    """Part 1; returns the best of our runs, the expert of the parts after."""
    ours, peer = [], []
    for seed in args.seeds:
        directory = work / "sac" / f"seed{seed}"

        def measure_ours() -> dict[str, float]:
            directory.mkdir(parents=True, exist_ok=True)
            seconds = run(f"env={ENV_ID}", "algorithm=sac", f"algorithm.total_steps={args.sac_steps}",
                          f"runner.seed={seed}", "hydra.run.dir=ours", cwd=directory)
            return {"seconds": seconds, "return": evaluate_run(directory / "ours", args.eval_episodes, "last.pt")[
                "mean_return"]}

        ours.append(cached(directory / "ours.json", measure_ours, runs=("ours",)))
        peer.append(cached(directory / "sb3.json", lambda: pool.submit(sb3_sac, args.sac_steps, seed,
                                                                       args.eval_episodes).result()))
        print(f"  SAC seed {seed}: ours {ours[-1]['return']:.0f} in {ours[-1]['seconds']:.0f} s, SB3 "
              f"{peer[-1]['return']:.0f} in {peer[-1]['seconds']:.0f} s  ({load_average()})", file=sys.stderr)
    steps = f"{args.sac_steps:,} steps"
    our_return, peer_return = (statistics.mean(result["return"] for result in side) for side in (ours, peer))
    table.add(f"SAC {steps}: return, mean of {len(args.seeds)} seeds", our_return, peer_return, ">= SB3",
              our_return >= peer_return)
    our_rate, peer_rate = (args.sac_steps / statistics.median(result["seconds"] for result in side)
                           for side in (ours, peer))
    table.add(f"SAC {steps}: steps/s, whole run vs learn()", our_rate, peer_rate, ">= 2x",
              our_rate >= 2 * peer_rate)
    best = max(range(len(args.seeds)), key=lambda index: ours[index]["return"])
    return work / "sac" / f"seed{args.seeds[best]}" / "ours"


def offline_part(args: argparse.Namespace, work: Path, expert: Path, pool: ProcessPoolExecutor, table: Table) -> None:
    datasets = work / "hopper"
    if not (datasets / "references.json").exists():
        shutil.rmtree(datasets, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mazerun.datasets", "d4rl", str(expert), "--out", str(datasets),
                        "--episodes", str(args.dataset_episodes)], check=True, capture_output=True)
    references = json.loads((datasets / "references.json").read_text())
    print(f"  datasets of {expert}: {json.dumps(references)}", file=sys.stderr)
    for dataset in DATASETS:
        for algorithm in args.offline_algorithms:
            ours, peer = [], []
            for seed in args.offline_seeds or args.seeds:
                directory = work / "offline" / dataset / f"{algorithm}-{args.offline_updates}" / f"seed{seed}"

                def measure_ours() -> dict[str, float]:
                    directory.mkdir(parents=True, exist_ok=True)
                    seconds = run("-cn", "conf_train", f"env={ENV_ID}", f"algorithm={algorithm}",
                                  f"algorithm.n_updates={args.offline_updates}", f"runner.seed={seed}",
                                  f"runner.dataset.dir_or_file={datasets / dataset}", "hydra.run.dir=ours",
                                  cwd=directory)
                    return {"seconds": seconds, "return": evaluate_run(directory / "ours", args.eval_episodes,
                                                                       "last.pt")["mean_return"]}

                ours.append(cached(directory / "ours.json", measure_ours, runs=("ours",)))
                peer.append(cached(directory / "d3rlpy.json", lambda: pool.submit(
                    d3rlpy_box, algorithm, str(datasets / dataset / "trajectory_data"), args.offline_updates, seed,
                    args.eval_episodes).result()))
                print(f"  {algorithm} on {dataset}, seed {seed}: ours {ours[-1]['return']:.0f} in "
                      f"{ours[-1]['seconds']:.0f} s, d3rlpy {peer[-1]['return']:.0f} in {peer[-1]['seconds']:.0f} s",
                      file=sys.stderr)
            name = f"{algorithm} {dataset} {args.offline_updates:,} updates"
            our_return, peer_return = (statistics.mean(result["return"] for result in side) for side in (ours, peer))
            table.add(f"{name}: return", our_return, peer_return, ">= d3rlpy", our_return >= peer_return)
            our_rate, peer_rate = (args.offline_updates / statistics.median(result["seconds"] for result in side)
                                   for side in (ours, peer))
            table.add(f"{name}: updates/s, whole run vs fit()", our_rate, peer_rate, ">= 3x",
                      our_rate >= 3 * peer_rate)


def dagger_part(args: argparse.Namespace, work: Path, expert: Path, table: Table) -> None:
    teacher = cached(work / "dagger" / "teacher.json",
                     lambda: {"return": evaluate_run(expert, args.eval_episodes, "best.pt")["mean_return"]})["return"]
    demos = work / "dagger" / "demos" / "record" / "trajectory_data"
    episodes = max(args.labels // 1000, 1)  # Hopper episodes last at most 1000 steps: at least enough of them
    while not (demos.parent / "enough").exists():  # a weaker teacher falls sooner: more episodes, until they hold --labels
        shutil.rmtree(demos.parent.parent, ignore_errors=True)
        demos.parent.parent.mkdir(parents=True)
        run(f"env={ENV_ID}", "policy=torch_policy", f"input_dir={expert}", f"runner.n_episodes={episodes}",
            "runner.seed=0", "hydra.run.dir=record", cwd=demos.parent.parent)
        if sum(len(record) for record in load_records(demos)) >= args.labels:
            (demos.parent / "enough").touch()
        episodes *= 4
    dagger_scores, bc_scores = [], []
    for seed in args.dagger_seeds or args.seeds:
        directory = work / "dagger" / f"seed{seed}"

        def measure() -> dict[str, float]:
            directory.mkdir(parents=True, exist_ok=True)
            data = labelled_subset(demos, args.labels, directory / "bc_data")
            run(f"env={ENV_ID}", "algorithm=dagger", "expert=torch_policy", f"expert.input_dir={expert}",
                f"algorithm.total_steps={args.labels}", f"runner.seed={seed}", "hydra.run.dir=dagger", cwd=directory)
            run("-cn", "conf_train", f"env={ENV_ID}", "algorithm=bc", f"runner.dataset.dir_or_file={data}",
                f"runner.seed={seed}", "hydra.run.dir=bc", cwd=directory)
            return {name: evaluate_run(directory / name, args.eval_episodes)["mean_return"] for name in ("dagger", "bc")}

        scores = cached(directory / "scores.json", measure, runs=("dagger", "bc", "bc_data"))
        dagger_scores.append(scores["dagger"])
        bc_scores.append(scores["bc"])
        print(f"  DAgger seed {seed}: {scores['dagger']:.0f}, BC {scores['bc']:.0f}, teacher {teacher:.0f}",
              file=sys.stderr)
    dagger, bc = statistics.mean(dagger_scores), statistics.mean(bc_scores)
    labels = f"{args.labels:,} labels"
    table.add(f"DAgger {labels}: return vs the SAC teacher's", dagger, teacher, ">= 0.9x", dagger >= 0.9 * teacher)
    table.add(f"BC {labels}: return vs the SAC teacher's (shown)", bc, teacher)


def memory_part(args: argparse.Namespace, work: Path, pool: ProcessPoolExecutor, table: Table) -> None:
    size = args.memory_transitions
    ours = cached(work / "memory" / "ours.json", lambda: {"peak_rss_mb": peak_rss_mb(
        f"env={ENV_ID}", "algorithm=sac", f"algorithm.total_steps={size}", f"algorithm.learning_starts={size}",
        f"algorithm.buffer_size={size}", f"algorithm.eval_every={size}", "hydra.run.dir=ours",
        cwd=work / "memory")})
    peer = cached(work / "memory" / "sb3.json",
                  lambda: pool.submit(sb3_sac, size, 0, 0, learning_starts=size).result())
    table.add(f"SAC peak resident memory (MB), {size:,}-transition buffer", ours["peak_rss_mb"], peer["peak_rss_mb"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["sac", "offline", "dagger", "memory"],
                        choices=["sac", "offline", "dagger", "memory"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--offline-seeds", type=int, nargs="+", help="the offline part's seeds (default: --seeds)")
    parser.add_argument("--dagger-seeds", type=int, nargs="+", help="the DAgger part's seeds (default: --seeds)")
    parser.add_argument("--sac-steps", type=int, default=100_000)
    parser.add_argument("--offline-updates", type=int, default=10_000)
    parser.add_argument("--offline-algorithms", nargs="+", default=list(OFFLINE_ALGORITHMS),
                        choices=list(OFFLINE_ALGORITHMS), help="the offline part's algorithms (default: all)")
    parser.add_argument("--dataset-episodes", type=int, default=100, help="episodes of medium (and expert, random)")
    parser.add_argument("--labels", type=int, default=25_000)
    parser.add_argument("--memory-transitions", type=int, default=1_000_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--work", type=Path, help="where the runs go (default: a new directory under /tmp)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: the wiring, not the targets")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.offline_seeds, args.dagger_seeds = [0], None, None
        args.sac_steps, args.offline_updates, args.dataset_episodes = 3000, 300, 3
        args.labels, args.memory_transitions, args.eval_episodes = 2000, 5000, 2
    versions = {name: peer_version(name, install) for name, install in
                (("stable_baselines3", SB3_INSTALL), ("d3rlpy", D3RLPY_INSTALL))}
    work = args.work or Path(f"/tmp/bench-continuous-{int(time.time())}")
    work.mkdir(parents=True, exist_ok=True)
    print(f"runs in {work}; {load_average()}", file=sys.stderr)
    table = Table(f"Continuous control on {ENV_ID} (peers: SB3 {versions['stable_baselines3']}, "
                  f"d3rlpy {versions['d3rlpy']}); {load_average()} at the start", peer_name="peer")
    expert: Path | None = None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        if "sac" in args.parts or {"offline", "dagger"} & set(args.parts):
            if versions["stable_baselines3"] is None:
                table.add("SAC against SB3", "-", "missing", ">= SB3")
            else:
                expert = sac_part(args, work, pool, table)
        if expert is not None and "offline" in args.parts:
            if versions["d3rlpy"] is None:
                table.add("TD3+BC, IQL, CQL against d3rlpy", "-", "missing", ">= d3rlpy")
            else:
                offline_part(args, work, expert, pool, table)
        if expert is not None and "dagger" in args.parts:
            dagger_part(args, work, expert, table)
        if "memory" in args.parts and versions["stable_baselines3"] is not None:
            memory_part(args, work, pool, table)
    print(table.render())
    print(f"{load_average()} at the end")
    return table.exit_code()


if __name__ == "__main__":
    sys.exit(main())
