"""Rollout throughput: a bare gymnasium loop vs mazerun's sequential and parallel runners.

    python bench/rollout.py [--episodes N] [--repeats R]

On LunarLander-v3 with gymnasium's heuristic, every variant plays the same episodes (episode
``i`` seeded ``i``) and is timed end to end, env construction and record writing included:

1. bare loop   ``gymnasium.make`` + ``lunar_lander.heuristic`` + ``env.step``, one process, nothing recorded;
2. sequential  ``mazerun.acting.rollout.rollout`` with ``runner.type=sequential``, trajectories recorded;
3. parallel    ``mazerun.acting.rollout.rollout`` with ``runner.type=parallel`` (one worker per core), recorded.

Throughput is total env steps / wall seconds. Each of ``--repeats`` rounds runs every variant
once, in turn, so that a change in the machine's load hits all of them alike; the table shows the
median over the rounds and the ratio to the bare loop, and checks two targets:

* sequential with recording reaches at least 0.8x the bare loop's steps/s;
* parallel is faster than sequential (checked for 200 episodes or more; below that, pool start-up
  dominates and the row says n/a). The command exits 1 when a checked target fails.

Under the table, a CPU check (run each round) says how much more work one busy process per
core gets done than a single process on this machine at the time: the bound on the parallel
runner's speed-up.

Two more rows, for information, roll out the BabyAI bot on BabyAI-GoToLocal-v0 (200 episodes)
with both runners: success rate and steps/s. Records go to temporary directories, removed after
each repeat. On a shared machine the numbers are noisy: compare the ratios, not the absolute rates.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gymnasium
from common import Table, load_average
from gymnasium.envs.box2d.lunar_lander import heuristic

from mazerun.acting.rollout import rollout
from mazerun.config.schemas import PolicyConfig, RunnerConfig, worker_count

LUNAR_ENV = "LunarLander-v3"
BABYAI_ENV = "BabyAI-GoToLocal-v0"
BABYAI_EPISODES = 200
SEQUENTIAL_TARGET = 0.8
"""Sequential-with-recording must reach this share of the bare loop's steps/s."""
PARALLEL_MIN_EPISODES = 200
"""The parallel-beats-sequential target is only checked from this many episodes on."""


@dataclass
class Timing:
    """One timed run of one variant."""

    steps: int
    seconds: float
    success_rate: float | None = None

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds


@dataclass
class Measured:
    """All timed repeats of one variant."""

    name: str
    episodes: int
    timings: list[Timing]

    @property
    def steps(self) -> int:
        return self.timings[0].steps

    @property
    def median_rate(self) -> float:
        return statistics.median(timing.steps_per_second for timing in self.timings)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Hide rollout()'s progress bars (tqdm turns itself off on a non-terminal); show them again on error."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


def bare_loop(episodes: int) -> Timing:
    """gymnasium alone: one env, the heuristic called directly, nothing kept."""
    start = time.perf_counter()
    env = gymnasium.make(LUNAR_ENV)
    lander = env.unwrapped
    steps = 0
    for index in range(episodes):
        observation, _ = env.reset(seed=index)
        terminated = truncated = False
        while not (terminated or truncated):
            observation, _, terminated, truncated, _ = env.step(heuristic(lander, observation))
            steps += 1
    env.close()
    return Timing(steps, time.perf_counter() - start)


def mazerun_rollout(env_id: str, policy: str, runner_type: str, episodes: int) -> Timing:
    """mazerun's runner with trajectory recording on, into a fresh temporary directory."""
    runner = RunnerConfig(type=runner_type, n_episodes=episodes, seed=0, record_trajectory=True)
    with tempfile.TemporaryDirectory(prefix="mazerun-bench-") as run_dir:
        with quiet_stderr():
            start = time.perf_counter()
            stats = rollout(env_id, PolicyConfig(name=policy), runner, Path(run_dir), print_fn=lambda _: None)
            seconds = time.perf_counter() - start
        recorded = len(list((Path(run_dir) / "trajectory_data").glob("*.pkl")))
    if recorded != episodes:
        raise SystemExit(f"{runner_type} runner recorded {recorded} of {episodes} episodes")
    return Timing(int(stats["total_step_count"]), seconds, stats.get("success_rate"))


def _burn(loops: int) -> int:
    total = 0
    for i in range(loops):
        total += i * i
    return total


def cpu_scaling(workers: int, loops: int = 3_000_000) -> float:
    """How much more pure-Python work ``workers`` processes get done at once than one (ideal: ``workers``).

    On a machine shared with other jobs this is what bounds the parallel runner's speed-up.
    """
    start = time.perf_counter()
    _burn(loops)
    one = time.perf_counter() - start
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        start = time.perf_counter()
        pool.map(_burn, [loops] * workers)
        many = time.perf_counter() - start
    return workers * one / many


@dataclass
class Variant:
    """One way of playing the episodes, timed by calling ``run_once``."""

    name: str
    episodes: int
    run_once: Callable[[], Timing]


def measure_interleaved(
    label: str, variants: list[Variant], repeats: int, between: Callable[[], None] = lambda: None
) -> list[Measured]:
    """Time every variant ``repeats`` times, round-robin, so that a change in the machine's load
    hits all variants alike instead of one block of repeats; ``between`` runs once per round."""
    timings: list[list[Timing]] = [[] for _ in variants]
    for round_number in range(1, repeats + 1):
        print(f"  {label}: round {round_number}/{repeats}", file=sys.stderr, flush=True)
        between()
        for variant, kept in zip(variants, timings):
            kept.append(variant.run_once())
    for variant, kept in zip(variants, timings):
        if len({timing.steps for timing in kept}) != 1:
            raise SystemExit(f"{variant.name}: step counts differ between repeats: {[t.steps for t in kept]}")
    return [Measured(variant.name, variant.episodes, kept) for variant, kept in zip(variants, timings)]


def lunar_rows(bare: Measured, sequential: Measured, parallel: Measured, table: Table) -> None:
    """The checked rows: sequential with recording against the bare loop, parallel against sequential."""
    table.add(f"{LUNAR_ENV} bare loop steps/s (reference)", bare.median_rate, "-")
    table.add("sequential + recording vs bare loop, steps/s", sequential.median_rate, bare.median_rate,
              f">= {SEQUENTIAL_TARGET:.2f}x", sequential.median_rate >= SEQUENTIAL_TARGET * bare.median_rate)
    checked = parallel.episodes >= PARALLEL_MIN_EPISODES
    table.add(f"{parallel.name.replace('mazerun ', '')} vs sequential", parallel.median_rate,
              sequential.median_rate, "> 1x" if checked else f"- (< {PARALLEL_MIN_EPISODES} episodes)",
              parallel.median_rate > sequential.median_rate if checked else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200, help="LunarLander episodes per variant (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each timing every variant once; medians are shown (default 3)")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.repeats < 1:
        parser.error("--episodes and --repeats must be at least 1")

    episodes, repeats = args.episodes, args.repeats
    workers = worker_count(RunnerConfig(n_episodes=episodes))
    scalings: list[float] = []
    print(f"measuring ({repeats} rounds, {os.cpu_count()} cores):", file=sys.stderr)
    bare, sequential, parallel = measure_interleaved(
        LUNAR_ENV,
        [
            Variant("bare loop (gymnasium, no recording)", episodes, lambda: bare_loop(episodes)),
            Variant("mazerun sequential + recording", episodes,
                    lambda: mazerun_rollout(LUNAR_ENV, "heuristic", "sequential", episodes)),
            Variant(f"mazerun parallel ({workers} workers) + recording", episodes,
                    lambda: mazerun_rollout(LUNAR_ENV, "heuristic", "parallel", episodes)),
        ],
        repeats,
        between=lambda: scalings.append(cpu_scaling(workers)),
    )
    for measured in (sequential, parallel):
        if measured.steps != bare.steps:
            raise SystemExit(f"{measured.name} played {measured.steps} steps, the bare loop {bare.steps}: "
                             "the same seeds should give the same episodes")

    babyai_workers = worker_count(RunnerConfig(n_episodes=BABYAI_EPISODES))
    babyai_sequential, babyai_parallel = measure_interleaved(
        BABYAI_ENV,
        [
            Variant("mazerun sequential + recording", BABYAI_EPISODES,
                    lambda: mazerun_rollout(BABYAI_ENV, "bot", "sequential", BABYAI_EPISODES)),
            Variant(f"mazerun parallel ({babyai_workers} workers) + recording", BABYAI_EPISODES,
                    lambda: mazerun_rollout(BABYAI_ENV, "bot", "parallel", BABYAI_EPISODES)),
        ],
        repeats,
    )

    table = Table(f"{LUNAR_ENV}, heuristic, episode i seeded i, {bare.steps:,} steps per run, median of {repeats}; "
                  "the peer is the bare loop or the sequential runner", peer_name="reference")
    lunar_rows(bare, sequential, parallel, table)
    for measured in (babyai_sequential, babyai_parallel):
        success = measured.timings[0].success_rate or 0.0
        table.add(f"BabyAI {measured.name.split(' + ')[0].replace('mazerun ', '')} steps/s, success {success:.2f}",
                  measured.median_rate, babyai_sequential.median_rate)
    print(table.render())
    print(f"\nCPU check (median over rounds): {workers} busy processes got {statistics.median(scalings):.2f}x "
          f"the work of one done (ideal {workers}.00x); the parallel runner's speed-up is bounded by that. "
          f"({load_average()})")
    return table.exit_code()


if __name__ == "__main__":
    sys.exit(main())
