"""A ladder of clones: BC from 1k, 3k and 10k expert demos and DAgger at equal labels, on 8 MiniGrid/BabyAI tasks.

    python bench/ladder.py                                    # the 8 tasks, 500 unseen seeds per score
    python bench/ladder.py --tasks MiniGrid-DoorKey-8x8-v0 --demos 100 300 --seeds 0 --eval-episodes 50   # a look
    python bench/ladder.py --work ladder_work                 # keep every run's result; a rerun skips them

Per task, ``policy=heuristic`` (the better of the planner and the bot for the id, by
bench/experts.py; the planner plans on what the agent has seen, so its demos can be imitated)
records the largest number of demos once, on seeds 0, 1, ... Then, through
the real `run` command with each algorithm's default settings (on these grids: a GRU, and BC's and
DAgger's ``kind_defaults`` for minigrid observations, which run.log lists):

* BC (``run -cn conf_train algorithm=bc``) on the first 1k, 3k and 10k of those demos;
* DAgger (``run algorithm=dagger``, the same expert labelling every state its learner visits) with
  ``algorithm.total_steps`` equal to the labels those demos hold: the same number of expert labels.

Every clone's ``best.pt`` is scored greedily on ``--eval-episodes`` seeds neither recorded nor
used to pick ``best.pt`` (from 2,000,000). Wall times are each command's, end to end.

Each row is trained once per ``--seeds`` (``runner.seed``; BC's demos stay the same) and compared
by the median. One seed is not enough near the ceiling: BC from GoToLocal's 10k demos scored 0.998,
0.978 and 0.988 on seeds 0, 1 and 2, so a single seed's gap of 0.02 between BC and DAgger there says
nothing. ``--seeds 0`` is a quicker look, not the check.

Targets (issue 29): the 10k-demo clone >= 0.95 success on at least 6 of the 8 tasks, and DAgger
>= BC at equal labels on every task and rung (medians over the seeds). Exits non-zero when one is missed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import Table, evaluate_run, load_average, record, run

from mazerun.core.rundir import is_locked
from mazerun.data.records import load_records

TASKS = ("BabyAI-GoToRedBallGrey-v0", "BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0", "BabyAI-PutNextLocal-v0",
         "MiniGrid-DoorKey-8x8-v0", "MiniGrid-KeyCorridorS3R3-v0", "MiniGrid-LavaCrossingS9N1-v0",
         "MiniGrid-MultiRoom-N4-S5-v0")
CLONE_TARGET = 0.95
TASKS_AT_TARGET = 6
ALGORITHMS = ("bc", "dagger")
MEASURED = "ladder.json"
CONF_ENV = Path(__file__).resolve().parents[1] / "conf" / "env"


def env_overrides(env_id: str) -> list[str]:
    """The env option where one exists (its tuned defaults come with it), else the id on the generic option."""
    return [f"env={env_id}"] if (CONF_ENV / f"{env_id}.yaml").is_file() else [f"env.name={env_id}"]


def measured(name: str, overrides: list[str], eval_episodes: int, work: Path) -> dict:
    """One clone trained by ``run <overrides>`` into ``work/name``, its success and wall time.

    Kept in ``work/name/ladder.json``, so a ladder stopped part-way goes on from the next run (another
    ``eval_episodes`` scores the kept clone again); a run that left no such file starts again from nothing.
    """
    run_dir, saved = work / name, work / name / MEASURED
    if saved.is_file():
        score = json.loads(saved.read_text())
        if score["episodes"] == eval_episodes:
            return score
        score["success"] = evaluate_run(run_dir, eval_episodes)["success_rate"]
    else:
        if is_locked(run_dir):  # a second ladder on this task: its rmtree would pull the directory from under the run
            sys.exit(f"error: {run_dir} is being trained by another run (a second ladder on this task?); "
                     "let it finish, or stop it, and run the ladder again")
        shutil.rmtree(run_dir, ignore_errors=True)
        seconds = run(*overrides, f"hydra.run.dir={name}", cwd=work)
        score = {"success": evaluate_run(run_dir, eval_episodes)["success_rate"], "seconds": seconds}
    score["episodes"] = eval_episodes
    saved.write_text(json.dumps(score))
    return score


def over_seeds(algorithm: str, count: int, overrides: list[str], seeds: list[int], eval_episodes: int,
               work: Path) -> dict:
    """One row trained once per seed: the median success and wall time, and each seed's success.

    Seed 0 runs in ``work/<algorithm>_<count>``, seed S in ``work/<algorithm>_<count>_seed<S>``, so a
    ladder measured with one seed keeps its runs when more seeds are asked for.
    """
    scores = {seed: measured(f"{algorithm}_{count}" + (f"_seed{seed}" if seed else ""),
                             [*overrides, f"runner.seed={seed}"], eval_episodes, work) for seed in seeds}
    return {"success": statistics.median(score["success"] for score in scores.values()),
            "seconds": statistics.median(score["seconds"] for score in scores.values()),
            "seeds": {str(seed): score["success"] for seed, score in scores.items()}}


def climb(env_id: str, demos: list[int], algorithms: list[str], seeds: list[int], eval_episodes: int,
          work: Path) -> dict:
    """One task's ladder: the recording, then BC and DAgger (those of ``algorithms``) at each rung; every score
    and wall time."""
    records_dir, recorded = work / "demos" / "trajectory_data", work / "demos" / MEASURED
    if not recorded.is_file():
        shutil.rmtree(work / "demos", ignore_errors=True)
        started = time.perf_counter()
        record(env_id, max(demos), work / "demos")
        recorded.write_text(json.dumps({"seconds": time.perf_counter() - started}))
    result = {"env_id": env_id, "record_seconds": json.loads(recorded.read_text())["seconds"], "rungs": {}}
    lengths = [len(episode) for episode in load_records(records_dir)]
    env = env_overrides(env_id)
    for count in demos:
        labels = sum(lengths[:count])
        commands = {"bc": ["-cn", "conf_train", "algorithm=bc", *env, f"runner.dataset.dir_or_file={records_dir}",
                           f"runner.dataset.max_episodes={count}"],
                    "dagger": ["algorithm=dagger", *env, f"algorithm.total_steps={labels}"]}
        rung = {name: over_seeds(name, count, commands[name], seeds, eval_episodes, work) for name in algorithms}
        result["rungs"][str(count)] = {"labels": labels, **rung}
        print(f"  {env_id} {count} demos ({labels} labels): {rung} ({load_average()})", file=sys.stderr, flush=True)
    return result


def spread(row: dict) -> str:
    """Each seed's success and the median wall time, for a row's label."""
    seeds = " ".join(f"{success:.3f}" for success in row["seeds"].values())
    return f"seeds {seeds}; {row['seconds']:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--demos", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS),
                        help="which rows to train: a ladder without DAgger is a look, not the check")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds per row, compared by the median: one is a look, not the check")
    parser.add_argument("--eval-episodes", type=int, default=500, help="unseen seeds per score")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the runs here, each with its score in ladder.json: a rerun skips what is measured")
    args = parser.parse_args()
    demos, seeds = sorted(args.demos), sorted(set(args.seeds))
    results = []
    with tempfile.TemporaryDirectory(prefix="mazerun-ladder-") as scratch:
        for env_id in args.tasks:
            work = (args.work or Path(scratch)) / env_id
            work.mkdir(parents=True, exist_ok=True)
            results.append(climb(env_id, demos, args.algorithms, seeds, args.eval_episodes, work))
            (work / "result.json").write_text(json.dumps(results[-1], indent=2))

    top = str(demos[-1])
    table = Table(f"Ladder of clones: median success over training seeds {seeds}, each on {args.eval_episodes} "
                  "unseen seeds; BC from k demos, DAgger at the labels they hold; the peer is BC at the same labels",
                  peer_name="BC")
    at_target = 0
    for result in results:
        env_id = result["env_id"]
        table.add(f"{env_id}: record {demos[-1]} demos (s)", result["record_seconds"], None)
        for count, rung in result["rungs"].items():
            bc, dagger = rung.get("bc"), rung.get("dagger")
            checked = count == top
            if bc:
                table.add(f"{env_id}: BC {count} demos ({spread(bc)})", bc["success"], None,
                          f">= {CLONE_TARGET}" if checked else "", bc["success"] >= CLONE_TARGET if checked else None)
            if dagger:
                table.add(f"{env_id}: DAgger {rung['labels']} labels ({spread(dagger)})", dagger["success"],
                          bc and bc["success"], ">= BC" if bc else "", dagger["success"] >= bc["success"] if bc else None)
        at_target += result["rungs"][top].get("bc", {}).get("success", 0.0) >= CLONE_TARGET
    table.add(f"tasks whose {top}-demo clone reaches {CLONE_TARGET}", at_target, None,
              f">= {TASKS_AT_TARGET} of {len(TASKS)}",
              at_target >= TASKS_AT_TARGET if len(results) == len(TASKS) and "bc" in args.algorithms else None)
    print(table.render())
    print(f"({load_average()})")
    sys.exit(table.exit_code())


if __name__ == "__main__":
    main()
