"""Beyond one machine: a store larger than RAM, parallel sweeps, data-parallel training.

    python bench/scale.py                                  # all three parts, figures as medians
    python bench/scale.py --parts memory --transitions 20000000 --repeats 3
    python bench/scale.py --parts ddp --processes 2 --device cuda     # on a node with 2+ GPUs (NCCL)

1. **Memory.** A synthetic LunarLander store (8 float32 features, 4 actions, episodes of 150-600
   steps; values are random, which costs sampling nothing different) of ``--transitions``
   transitions is written once under ``--workdir``. BC and CQL then train on it with the real
   `run -cn conf_train ...` command while this script samples the run's resident *anonymous*
   memory (RssAnon in /proc/<pid>/status: what the process allocated, not the page cache of the
   memory map) every 20 ms: the peak must stay under 500 MB. Their update speed is measured in a
   child process on the path `run` takes (the store split into StoreDatasets, the loop's sampler,
   ``Algorithm.update``) and compared with the in-memory path (records -> tensors, the same
   sampler) on a dataset of ``--fits`` transitions: target >= 0.8x.
2. **Sweeps.** The same 4 jobs as one `run -m` sweep, one after another (Hydra's basic launcher)
   and with ``hydra/launcher=joblib hydra.launcher.n_jobs=2``: target <= 0.6x the time. The jobs
   are short PPO runs, whose loop is single-threaded; the issue's rollout sweep (the parallel
   runner already spreads one job's episodes over both cores) is shown beside, without a target.
   Speed rows use ``--threads`` torch threads (1 by default) in every single-process run.
3. **Data-parallel.** BC (MLP 256x256, global batch 256) by 1 process and by ``--processes``
   processes under torchrun: updates/s (each process takes every update in lockstep) and samples/s
   per process and in total, from the runs' own ``done: ... updates/s`` log line. On this 2-core
   CPU two processes share the cores one process already uses; the figure that matters is on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Table, load_average  # noqa: E402

from mazerun.acting.envs import env_spaces  # noqa: E402
from mazerun.data.records import StateTrajectoryRecord  # noqa: E402
from mazerun.data.store import INDEX_FILE, StoreWriter  # noqa: E402

ENV_ID = "LunarLander-v3"
MEMORY_LIMIT_MB = 500
TRAIN = ["model.hidden_sizes=[256,256]", "algorithm.batch_size=256", "algorithm.validation_percentage=0",
         "runner.eval_repeats=1", "runner.max_episode_steps=200", "device=cpu"]


# -- data -------------------------------------------------------------------------------------


def synthetic_store(path: Path, transitions: int, seed: int = 0) -> Path:
    """A store of random LunarLander-shaped episodes, written once and reused while its size matches."""
    index = path / INDEX_FILE
    if index.is_file() and json.loads(index.read_text())["transitions"] == transitions:
        return path
    if path.exists():
        import shutil

        shutil.rmtree(path)
    rng = np.random.default_rng(seed)
    written = 0
    started = time.perf_counter()
    with StoreWriter(path, env_spaces) as writer:
        number = 0
        while written < transitions:
            steps = int(min(rng.integers(150, 601), transitions - written))
            writer.add(StateTrajectoryRecord(
                observations=rng.standard_normal((steps + 1, 8), dtype=np.float32),
                actions=rng.integers(0, 4, steps), rewards=rng.standard_normal(steps),
                terminated=bool(rng.random() < 0.7), truncated=False, env_id=ENV_ID, seed=number, policy="synthetic",
            ))
            written += steps
            number += 1
    print(f"wrote a {transitions:,}-transition store in {time.perf_counter() - started:.0f} s: {path}", flush=True)
    return path


# -- 1. memory and update speed -----------------------------------------------------------------


def threads_env(threads: int) -> dict[str, str]:
    """torch reads OMP_NUM_THREADS when `run` starts (torchrun sets 1 for each of its processes)."""
    return {"OMP_NUM_THREADS": str(threads)}


def peak_anonymous_mb(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``command``; its peak RssAnon (MB, sampled every 20 ms) and its wall seconds."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    peak = 0
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
    reader.start()
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(peak, int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)))
        except (OSError, AttributeError):
            pass
        time.sleep(0.02)
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(stderr)[-3000:]}")
    return peak / 1024, time.perf_counter() - started


SPEED_CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from mazerun.algorithms import algorithm_module
from mazerun.config.schemas import DatasetConfig, RunConfig, RunnerConfig
from mazerun.training.loops.offline import _datasets, make_sampler
from mazerun.nn.models import ModelConfig
from mazerun.training.runsetup import prepare
from mazerun.data.store import ColumnarStore

source, kind, name, updates = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(int(sys.argv[6]))
torch.manual_seed(0)
module = algorithm_module(name)
algorithm_config = module.Config(name=name, n_updates=updates, batch_size=256, validation_percentage=0)
config = RunConfig(runner=RunnerConfig(dataset=DatasetConfig(dir_or_file=source)), model={"hidden_sizes": [256, 256]},
                   device="cpu")
setup = prepare(config, algorithm_config, Path(sys.argv[5]), dataset=source, stream=kind == "store")
if kind == "memory":  # the store's episodes read whole, as pickles are: the path of a dataset that fits
    assert setup.records is not None and setup.store is None
train_data, _ = _datasets(setup)
algorithm = module.Algorithm(algorithm_config, setup.spec)
sampler = make_sampler(train_data, setup)
for _ in range(100):  # warm the allocator and the page cache of the rows drawn so far
    algorithm.update(sampler.sample())
started = time.perf_counter()
for _ in range(updates):
    algorithm.update(sampler.sample())
print(json.dumps({"updates_per_second": updates / (time.perf_counter() - started)}))
"""


def update_speed(source: Path, kind: str, algorithm: str, updates: int, workdir: Path, threads: int) -> float:
    result = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(source), kind, algorithm, str(updates),
                             str(workdir), str(threads)], capture_output=True, text=True, cwd=workdir)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["updates_per_second"]


def memory_part(table: Table, args: argparse.Namespace, workdir: Path) -> None:
    big = synthetic_store(workdir / f"lunar-{args.transitions}.store", args.transitions)
    small = synthetic_store(workdir / f"lunar-{args.fits}.store", args.fits)
    for algorithm in ("bc", "cql"):
        peaks = []
        for repeat in range(args.repeats):
            command = [sys.executable, "-m", "mazerun", "-cn", "conf_train", f"algorithm={algorithm}",
                       f"runner.dataset.dir_or_file={big}", f"algorithm.n_updates={args.updates}",
                       f"algorithm.eval_every={args.updates}", *TRAIN, f"hydra.run.dir=runs/{algorithm}-memory-{repeat}-{time.time_ns()}"]
            peaks.append(peak_anonymous_mb(command, workdir, threads_env(args.threads))[0])
        peak = max(peaks)
        table.add(f"{algorithm} `run` on {args.transitions / 1e6:g}M store: peak RssAnon MB", round(peak, 1),
                  float(MEMORY_LIMIT_MB), f"< {MEMORY_LIMIT_MB} MB", peak < MEMORY_LIMIT_MB)
        stored, in_memory = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same load
            stored.append(update_speed(big, "store", algorithm, args.updates, workdir, args.threads))
            in_memory.append(update_speed(small, "memory", algorithm, args.updates, workdir, args.threads))
        ours, peer = statistics.median(stored), statistics.median(in_memory)
        table.add(f"{algorithm} updates/s: {args.transitions / 1e6:g}M store vs {args.fits / 1e6:g}M in RAM",
                  round(ours, 1), round(peer, 1), ">= 0.8x", ours >= 0.8 * peer)


# -- 2. sweeps --------------------------------------------------------------------------------


def idle_share(seconds: float = 2.0) -> float:
    """The share of all CPUs left idle over ``seconds`` (from /proc/stat)."""
    def totals() -> tuple[int, int]:
        values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, all

    idle, total = totals()
    time.sleep(seconds)
    idle_after, total_after = totals()
    return (idle_after - idle) / max(1, total_after - total)


def wait_for_quiet(limit: float) -> float:
    """Wait (up to ``limit`` seconds) until others leave the CPUs >= 90 % idle: a parallel sweep needs the
    cores a serial one leaves free, which another user's job takes. Returns the idle share last seen."""
    deadline = time.monotonic() + limit
    while True:
        share = idle_share()
        if share >= 0.9 or time.monotonic() >= deadline:
            return share
        time.sleep(5)


def sweep_seconds(overrides: list[str], workdir: Path, sweep_dir: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mazerun", "-m", *overrides,
                             f"hydra.sweep.dir={sweep_dir}-{time.time_ns()}"],
                            cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return time.perf_counter() - started


def sweeps_part(table: Table, args: argparse.Namespace, workdir: Path) -> None:
    workloads = {
        f"PPO {args.ppo_steps} steps": (["algorithm=ppo", f"algorithm.total_steps={args.ppo_steps}",
                                         "runner.eval_repeats=2", "device=cpu"], "<= 0.6x"),
        "heuristic rollout, parallel runner (issue's)": (["policy=heuristic"], ""),
    }
    for number, (name, (overrides, target)) in enumerate(workloads.items()):
        jobs = [*overrides, "runner.seed=0,1,2,3"]
        joblib, sequential, idle = [], [], []
        for repeat in range(args.sweep_repeats):
            idle.append(wait_for_quiet(args.quiet_wait))
            sequential.append(sweep_seconds(jobs, workdir, f"sweeps/{number}-sequential-{repeat}"))
            joblib.append(sweep_seconds(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *jobs], workdir,
                                        f"sweeps/{number}-joblib-{repeat}"))
        ours, peer = statistics.median(joblib), statistics.median(sequential)
        table.add(f"4-job sweep s, joblib(2) vs one by one: {name} (idle before: "
                  f"{', '.join(f'{share:.0%}' for share in idle)})", round(ours, 1), round(peer, 1), target,
                  ours <= 0.6 * peer if target else None)


# -- 3. data-parallel -------------------------------------------------------------------------


def logged_rate(run_dir: Path) -> float:
    match = re.search(r"done: \d+ updates \((\d+) updates/s", (run_dir / "run.log").read_text())
    if match is None:
        raise RuntimeError(f"{run_dir}/run.log has no 'done:' line")
    return float(match.group(1))


def ddp_part(table: Table, args: argparse.Namespace, workdir: Path) -> None:
    data = synthetic_store(workdir / f"lunar-{args.fits}.store", args.fits)
    common = ["-cn", "conf_train", "algorithm=bc", f"runner.dataset.dir_or_file={data}",
              f"algorithm.n_updates={args.updates}", f"algorithm.eval_every={args.updates}",
              *[override for override in TRAIN if not override.startswith("device=")], f"device={args.device}"]
    single, parallel = [], []
    for repeat in range(args.repeats):
        run_dir = workdir / "runs" / f"ddp-1-{repeat}-{time.time_ns()}"
        subprocess.run([sys.executable, "-m", "mazerun", *common, f"hydra.run.dir={run_dir}"], cwd=workdir,
                       check=True, capture_output=True, env={**os.environ, **threads_env(args.threads)})
        single.append(logged_rate(run_dir))
        run_dir = workdir / "runs" / f"ddp-{args.processes}-{repeat}-{time.time_ns()}"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.processes}", "-m", "mazerun", *common, f"hydra.run.dir={run_dir}"],
                       cwd=workdir, check=True, capture_output=True)
        parallel.append(logged_rate(run_dir))
    one, many = statistics.median(single), statistics.median(parallel)
    share = 256 // args.processes
    table.add(f"BC updates/s, {args.processes} procs x 1 thread vs 1 x {args.threads}", round(many, 1), round(one, 1))
    table.add(f"  samples/s per process ({share} rows each)", round(many * share, 0), round(one * 256, 0))
    table.add("  samples/s in total", round(many * 256, 0), round(one * 256, 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["memory", "sweeps", "ddp"], choices=["memory", "sweeps", "ddp"])
    parser.add_argument("--transitions", type=int, default=20_000_000, help="size of the store larger than needed")
    parser.add_argument("--fits", type=int, default=1_000_000, help="size of the dataset trained in memory")
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--ppo-steps", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep-repeats", type=int, default=2, help="each is two 4-job sweeps of a minute or so")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="seconds to wait for idle CPUs before each pair of sweeps (shared machines)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the single-process runs (torchrun gives each of its processes 1); "
                             "1 by default: on a shared 2-core machine a second thread mostly spins")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mazerun-bench-scale",
                        help="where the stores (reused between runs) and the runs go")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    table = Table(f"mazerun beyond one machine ({load_average()} at the start, {os.cpu_count()} CPUs)",
                  peer_name="baseline")
    if "memory" in args.parts:
        memory_part(table, args, args.workdir)
    if "sweeps" in args.parts:
        sweeps_part(table, args, args.workdir)
    if "ddp" in args.parts:
        ddp_part(table, args, args.workdir)
    print(table.render())
    print(f"\n{load_average()} at the end")
    return table.exit_code()


if __name__ == "__main__":
    sys.exit(main())
