"""Evolutionary search: mazerun's population (hpo=evolution, CQL) vs AgileRL's (CQN), same data and budget.

    python bench/evolution.py [--episodes 200] [--population 4] [--max-steps 20000] [--evo-steps 2000]
                              [--eval-loop 10] [--test-episodes 100] [--agilerl-python /work/agilerl-venv/bin/python]
    python bench/evolution.py --smoke     # a tiny budget: checks the wiring, not the targets

1. Data: ``--episodes`` episodes of gymnasium's LunarLander heuristic with 30 % random actions
   (epsilon = 0.3), recorded by mazerun's rollout (episode i seeded i) and exported to HDF5 with
   ``mazerun.datasets.write_hdf5`` (observations, next_observations, actions, rewards, terminals).
   Both libraries read that one file, so they learn from exactly the same transitions.
2. The same search for both: ``--population`` agents, ``--max-steps`` learn steps per agent,
   evolution every ``--evo-steps``, ``--eval-loop`` evaluation episodes per agent, tournament of 2
   with elitism, mutations none 0.4 / architecture 0.2 / parameters 0.2 / hyper-parameters 0.2
   (sd 0.1), batch 256, lr 3e-4, gamma 0.99, ReLU networks of equal compute (ours 8-256-256-4;
   AgileRL's Q-network needs an encoder, latent and head: 8-256-128-256-4, the same multiply-adds).

   * ours: ``algorithm=cql hpo=evolution`` (double DQN + conservative term, Huber TD loss, hard
     target copy every 1000 updates), run in this process through ``train_population``, with float32
     products, then (on a CPU that has them natively) with ``algorithm.matmul_dtype=bfloat16`` (hidden
     layers multiply in bfloat16 with float32 accumulation; weights, gradients and Adam stay float32);
   * peer: AgileRL 2.58's CQN population (double Q, CQL term, soft target tau 1e-3), driven by
     bench/agilerl_offline_peer.py in AgileRL's own interpreter (``--agilerl-python``).
3. Wall time: from opening the dataset to the end of the search (training, evaluations, selection,
   mutation, checkpoints for ours); interpreter start-up and imports are left out on both sides.
   Both run with ``--threads`` torch threads (1 by default: on a shared 2-core machine a second
   OpenMP thread mostly spins waiting for the other jobs, and can cost either side 10x).
   Elite return: the best agent ever evaluated, played greedily on ``--test-episodes`` episodes
   seeded 2,000,000 + i, seeds no search has seen.
4. One CQL agent with default hyper-parameters trained for the population's whole budget
   (population x max-steps updates, evaluated every evo-steps on the same episodes, its best kept):
   what evolution adds over spending the same compute on one agent.

Targets (BENCHMARKS.md): AgileRL's wall time >= 3x ours with bfloat16 products (float32's ratio is
shown beside it), and each of our elites' return >= AgileRL's. On a CPU without AVX512-BF16 or AMX
bfloat16 is emulated (~20x slower), so the bfloat16 run is left out and float32 carries the target.
The table has one row per measure; the command exits 1 when a target is missed or AgileRL is
missing. AgileRL pins torch and numpy differently from mazerun, so it lives in its own venv:
``python3 -m venv /work/agilerl-venv && /work/agilerl-venv/bin/pip install agilerl==2.58.0 peft box2d==2.3.10``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from mazerun.acting.evaluation import evaluate
from mazerun.acting.rollout import rollout
from mazerun.compose.population import train_population
from mazerun.compose.validation import validate
from mazerun.config.schemas import PolicyConfig, RunnerConfig
from mazerun.data.formats import write_hdf5
from mazerun.data.records import TRAJECTORY_DIR, load_records
from mazerun.fast.fused import native_low_precision
from mazerun.nn.checkpoint import BEST_CHECKPOINT, load_checkpoint, network_from_checkpoint
from mazerun.training.train import train

ENV_ID = "LunarLander-v3"
EPSILON = 0.3
UNSEEN_SEED_OFFSET = 2_000_000
PEER_SCRIPT = Path(__file__).resolve().parent / "agilerl_offline_peer.py"
DEFAULT_PEER_PYTHON = "/work/agilerl-venv/bin/python"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide the population's per-generation tables and progress bars; the bench prints its own."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def record_dataset(episodes: int, directory: Path, max_episode_steps: int | None) -> Path:
    runner = RunnerConfig(type="parallel", n_episodes=episodes, seed=0, max_episode_steps=max_episode_steps)
    with quiet():
        rollout(ENV_ID, PolicyConfig(name="heuristic", epsilon=EPSILON), runner, directory, print_fn=lambda _: None)
    path = directory / "lunar_noisy.h5"
    write_hdf5(load_records(directory / TRAJECTORY_DIR), path)
    return path


def run_config(dataset: Path, algorithm: dict, args: argparse.Namespace, hpo: dict | None = None) -> object:
    return validate({
        "algorithm": {"name": "cql", "batch_size": 256, "lr": 3e-4, **algorithm},
        "hpo": hpo,
        "model": {"kind": None, "hidden_sizes": [256, 256], "activation": "relu"},
        "runner": {"dataset": {"dir_or_file": str(dataset)}, "eval_repeats": args.eval_loop,
                   "max_episode_steps": args.max_episode_steps},
        "device": "cpu",
    })


def unseen_return(run_dir: Path, episodes: int, max_episode_steps: int | None) -> float:
    """The mean greedy return of a run's best.pt on seeds no search evaluated on."""
    checkpoint = load_checkpoint(run_dir / BEST_CHECKPOINT)
    result = evaluate(network_from_checkpoint(checkpoint), ENV_ID, episodes,
                      observation_space=checkpoint.observation_space, vocabulary=None, device="cpu",
                      max_episode_steps=max_episode_steps, seed_offset=UNSEEN_SEED_OFFSET)
    return float(sum(result.returns) / len(result.returns))


def warm_up() -> None:
    """The first optimiser torch builds imports torch._dynamo (about 1.5 s): do that before any clock runs,
    as the peer's imports happen before its clock starts."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def run_ours(dataset: Path, args: argparse.Namespace, run_dir: Path, matmul_dtype: str) -> dict:
    hpo = {"name": "evolution", "population_size": args.population, "max_steps": args.max_steps,
           "evo_steps": args.evo_steps, "eval_loop": args.eval_loop, "seed": 0}
    config = run_config(dataset, {"matmul_dtype": matmul_dtype}, args, hpo)
    start = time.perf_counter()
    with quiet():
        result = train_population(config, run_dir)
    wall = time.perf_counter() - start
    return {"wall": wall, "elite_fitness": result.best,
            "elite_return": unseen_return(run_dir, args.test_episodes, args.max_episode_steps)}


def run_single(dataset: Path, args: argparse.Namespace, run_dir: Path) -> dict:
    config = run_config(dataset, {"n_updates": args.population * args.max_steps, "eval_every": args.evo_steps},
                        args)
    start = time.perf_counter()
    with quiet():
        train(config, run_dir)
    wall = time.perf_counter() - start
    return {"wall": wall, "elite_return": unseen_return(run_dir, args.test_episodes, args.max_episode_steps)}


def run_peer(dataset: Path, args: argparse.Namespace) -> dict | None:
    python = args.agilerl_python
    if not Path(python).is_file():
        say(f"AgileRL's interpreter {python} is missing; install it (see this file's docstring)")
        return None
    command = [python, str(PEER_SCRIPT), "--dataset", str(dataset), "--population", str(args.population),
               "--max-steps", str(args.max_steps), "--evo-steps", str(args.evo_steps), "--eval-loop",
               str(args.eval_loop), "--test-episodes", str(args.test_episodes),
               "--seed-offset", str(UNSEEN_SEED_OFFSET)]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if completed.returncode != 0:
        say(f"AgileRL's run failed:\n{completed.stderr[-3000:]}")
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=20000, help="learn steps per agent")
    parser.add_argument("--evo-steps", type=int, default=2000)
    parser.add_argument("--eval-loop", type=int, default=10)
    parser.add_argument("--test-episodes", type=int, default=100)
    parser.add_argument("--max-episode-steps", type=int, default=None)
    parser.add_argument("--agilerl-python", default=os.environ.get("AGILERL_PYTHON", DEFAULT_PEER_PYTHON))
    parser.add_argument("--skip-single", action="store_true", help="leave out the single-agent comparison")
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 4 episodes, 40 learn steps per agent")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both libraries (OMP_NUM_THREADS); 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads and os.environ.get("OMP_NUM_THREADS") != str(args.threads):
        # torch reads the thread count once, at import: start again with it set, for us and the peer alike.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if args.smoke:
        args.episodes, args.max_steps, args.evo_steps = 4, 40, 20
        args.eval_loop, args.test_episodes, args.max_episode_steps = 1, 3, 200

    # bfloat16 where the CPU multiplies it natively; elsewhere it is emulated, ~20x slower, and float32 is our best.
    dtypes = ["float32"] + (["bfloat16"] if native_low_precision(torch.bfloat16, torch.device("cpu")) else [])
    if len(dtypes) == 1:
        say("bfloat16 products left out: this CPU has no AVX512-BF16 or AMX, so float32 carries the speed target")
    with tempfile.TemporaryDirectory(prefix="bench_evolution_") as scratch:
        root = Path(scratch)
        say(f"recording {args.episodes} noisy LunarLander episodes (epsilon {EPSILON}) ...")
        dataset = record_dataset(args.episodes, root / "data", args.max_episode_steps)
        warm_up()
        ours = {}
        for matmul_dtype in dtypes:
            say(f"mazerun: {args.population} CQL agents x {args.max_steps} learn steps, {matmul_dtype} products ...")
            ours[matmul_dtype] = run_ours(dataset, args, root / f"ours_{matmul_dtype}", matmul_dtype)
        say(f"AgileRL: {args.population} CQN agents x {args.max_steps} learn steps ...")
        peer = run_peer(dataset, args)
        single = None
        if not args.skip_single:
            say(f"mazerun: one CQL agent x {args.population * args.max_steps} updates ...")
            single = run_single(dataset, args, root / "single")

    rows = []
    for matmul_dtype in dtypes:
        mine, target = ours[matmul_dtype], matmul_dtype == dtypes[-1]
        speedup = peer["wall"] / mine["wall"] if peer else None
        rows += [(f"search wall time (s), {matmul_dtype}", f"{mine['wall']:.1f}",
                  f"{peer['wall']:.1f}" if peer else "missing", f"{speedup:.2f}x" if peer else "-",
                  ">= 3x" if target else "(shown)", bool(peer) and (not target or speedup >= 3)),
                 (f"elite return, {args.test_episodes} unseen seeds, {matmul_dtype}", f"{mine['elite_return']:.1f}",
                  f"{peer['elite_return']:.1f}" if peer else "missing",
                  f"{mine['elite_return'] - peer['elite_return']:+.1f}" if peer else "-", ">= +0",
                  bool(peer) and mine["elite_return"] >= peer["elite_return"])]
    if single is not None:
        elite = ours["float32"]["elite_return"]
        rows.append((f"one agent, {args.population * args.max_steps} updates, float32", f"{single['elite_return']:.1f}",
                     "-", f"{elite - single['elite_return']:+.1f}", "(float32 elite - one agent)", True))
    header = ("measure", "mazerun", "AgileRL", "ratio/diff", "target", "met")
    table = [header, *((*row[:5], "yes" if row[5] else "NO") for row in rows)]
    widths = [max(len(str(line[index])) for line in table) for index in range(len(header))]
    print(f"evolution: {args.population} agents x {args.max_steps} learn steps, evolving every {args.evo_steps}, "
          f"{args.eval_loop} evaluation episodes; {args.episodes} episodes of data; torch threads "
          f"{torch.get_num_threads()}")
    for line in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
    return 0 if all(row[5] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
