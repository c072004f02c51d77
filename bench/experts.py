"""Expert coverage: the planner and the BabyAI bot on every MiniGrid and BabyAI id that minigrid registers.

    python bench/experts.py                      # 200 seeds per id (0..199, as `run` seeds its episodes)
    python bench/experts.py --smoke              # 5 seeds per id
    python bench/experts.py --ids 'BabyAI-Unlock*' 'MiniGrid-DoorKey-*' --seeds 50
    python bench/experts.py --sees agent --ids 'MiniGrid-*'   # the heuristic's planner: on what the agent sees

Per id: the planner's success, the bot's (BabyAI ids only: it reads a level's ``instrs``), the
planner's mean steps and the mean length of its plan at reset. The plan at reset is the number
of actions the planner takes on a copy of the env made right after reset, without the moving
obstacles (Dynamic-Obstacles: the shortest way if they were never in it, so steps above it are
the price of dodging them; every other env is static, and there the plan equals the steps
taken unless replanning goes astray). Means are over the successful episodes. Each episode runs
through mazerun's own env (its time limit) and counts as a success when it terminates with a
positive reward, as `run` counts. An episode that runs past 30 s has hung (the bot loops forever
on a few states): it counts as failed and the row says how many.

``--sees all`` (the default) measures ``policy=planner``, which plans on the full state;
``--sees agent`` the planner of ``policy=heuristic`` and DAgger's default teacher, which plans
on the cells the agent has seen and explores for the rest (its steps above the plan at reset
are the price of looking), alone: the bot's column comes with ``--sees all``.

A seed where the planner reports that no plan exists (``NoPlan``) is listed with the reason and
left out of its success rate; every other seed counts. A row fails when the planner's success
on the seeds with a plan is below 0.99. Ids where no seed can have a plan (no mission, an env
that cannot reset) are listed with the reason and judged on nothing.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import gymnasium as gym
from common import Table, load_average

TARGET_SUCCESS = 0.99
EPISODE_SECONDS = 30
"""An episode that takes longer has hung (minigrid's bot loops forever on a few states): it counts as failed."""


class EpisodeHung(Exception):
    pass


def _hang_up(signum: int, frame: object) -> None:
    raise EpisodeHung


@dataclass
class Coverage:
    """One expert on one id."""

    env_id: str
    expert: str
    successes: int = 0
    episodes: int = 0
    steps: list[int] = field(default_factory=list)
    plan_steps: list[int] = field(default_factory=list)
    no_plan: Counter = field(default_factory=Counter)
    """Why the planner found no plan, and on how many seeds."""
    hung: int = 0
    """Episodes stopped after EPISODE_SECONDS (failed)."""
    errors: Counter = field(default_factory=Counter)
    """Exceptions other than NoPlan that ended an episode (failed), by message."""
    cannot_run: str | None = None
    """Why the env could not be played at all."""
    unplanned_at_reset: Counter = field(default_factory=Counter)
    """Seeds the expert solved where the full-state plan from reset found none, by reason: a planner fault that
    fails the row."""

    @property
    def planned(self) -> int:
        return self.episodes - sum(self.no_plan.values())

    @property
    def success(self) -> float | None:
        return self.successes / self.planned if self.planned else None


def registered_ids() -> list[str]:
    import minigrid  # noqa: F401  (registers the ids)

    return [env_id for env_id in gym.registry if env_id.startswith(("MiniGrid-", "BabyAI-"))]


def play(env: gym.Env, policy, seed: int) -> tuple[bool, int]:
    """One episode of ``policy`` (reset with ``seed``): whether it succeeded, and its steps."""
    observation, _ = env.reset(seed=seed)
    policy.reset(env, seed)
    steps, terminated, truncated, reward = 0, False, False, 0.0
    while not (terminated or truncated):
        observation, reward, terminated, truncated, _ = env.step(policy.act(observation))
        steps += 1
    return bool(terminated and reward > 0), steps


def plan_at_reset(env: gym.Env, seed: int) -> int:
    """Actions the planner takes from the state just after reset, on a copy whose obstacles hold still."""
    from mazerun.acting.policies.planner import read_task

    world = copy.deepcopy(env.unwrapped)
    for obstacle in getattr(world, "obstacles", []):  # Dynamic-Obstacles: its moving balls leave the copy
        world.grid.set(*obstacle.cur_pos, None)
    world.obstacles = []
    task = read_task(world)
    for steps in range(1, world.max_steps + 1):
        _, _, terminated, truncated, _ = world.step(task.next_action())
        if terminated or truncated:
            return steps
    return world.max_steps


def measure(job: tuple[str, str, list[int], str]) -> Coverage:
    """One expert on one id over ``seeds``, the planner planning on what ``sees`` says (runs in a worker process)."""
    env_id, expert, seeds, sees = job
    from mazerun.acting.envs import make_env
    from mazerun.acting.policies.heuristic import BabyAIBotPolicy
    from mazerun.acting.policies.planner import NoPlan, PlannerPolicy

    coverage = Coverage(env_id, expert)
    try:
        env = make_env(env_id)
        env.reset(seed=seeds[0])
    except Exception as error:  # noqa: BLE001 - an id minigrid registers but cannot build is reported, not fatal
        coverage.cannot_run = f"the env cannot reset: {type(error).__name__}: {str(error)[:120]}"
        return coverage
    policy = PlannerPolicy(env_id, sees) if expert == "planner" else BabyAIBotPolicy()
    signal.signal(signal.SIGALRM, _hang_up)
    for seed in seeds:
        coverage.episodes += 1
        signal.alarm(EPISODE_SECONDS)
        try:
            succeeded, steps = play(env, policy, seed)
        except NoPlan as error:
            coverage.no_plan[str(error).split(": ", 1)[1].split("; this state")[0]] += 1
            continue
        except EpisodeHung:
            coverage.hung += 1
            continue
        except Exception as error:  # noqa: BLE001 - the bot raises on states it cannot handle: a failed episode
            coverage.errors[f"{type(error).__name__}: {str(error)[:80]}"] += 1
            continue
        finally:
            signal.alarm(0)
        coverage.successes += succeeded
        if succeeded:
            coverage.steps.append(steps)
        if expert == "planner" and succeeded:
            env.reset(seed=seed)
            try:
                coverage.plan_steps.append(plan_at_reset(env, seed))
            except NoPlan as error:
                coverage.unplanned_at_reset[str(error)[:120]] += 1
    env.close()
    return coverage


def mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200, help="episodes per id and expert: seeds 0, 1, ...")
    parser.add_argument("--smoke", action="store_true", help="5 seeds per id")
    parser.add_argument("--ids", nargs="+", default=["*"], help="shell patterns of the ids to measure")
    parser.add_argument("--sees", choices=("all", "agent"), default="all",
                        help="the planner plans on the full state (policy=planner) or on what the agent has seen "
                             "(policy=heuristic's)")
    parser.add_argument("--workers", type=int, default=2, help="processes (the machine may be shared: keep it small)")
    args = parser.parse_args()
    seeds = list(range(5 if args.smoke else args.seeds))
    ids = [env_id for env_id in registered_ids() if any(fnmatch.fnmatch(env_id, pattern) for pattern in args.ids)]
    jobs = [(env_id, "planner", seeds, args.sees) for env_id in ids]
    if args.sees == "all":  # the bot does not depend on it: measured once, beside the full-state planner
        jobs += [(env_id, "bot", seeds, args.sees) for env_id in ids if env_id.startswith("BabyAI-")]
    print(f"bench/experts.py: {len(ids)} ids, {len(seeds)} seeds, {args.workers} workers, {load_average()}",
          file=sys.stderr)
    started = time.perf_counter()
    results: dict[tuple[str, str], Coverage] = {}
    with multiprocessing.get_context("spawn").Pool(args.workers, initializer=os.nice, initargs=(10,)) as pool:
        for done, coverage in enumerate(pool.imap_unordered(measure, jobs), 1):
            results[coverage.env_id, coverage.expert] = coverage
            print(f"  [{done}/{len(jobs)}] {coverage.env_id} {coverage.expert}: {coverage.successes}/"
                  f"{coverage.planned} in {mean(coverage.steps):.1f} steps, plan {mean(coverage.plan_steps):.1f}, "
                  f"hung {coverage.hung}, errors {dict(coverage.errors)}, no plan {dict(coverage.no_plan)}, "
                  f"no plan at reset {dict(coverage.unplanned_at_reset)} "
                  f"({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)

    table = Table(f"Expert coverage: success over seeds 0..{len(seeds) - 1} with a plan; planner (sees {args.sees}) "
                  "steps / its plan at reset; bot steps", peer_name="bot")
    without_plan = []
    for env_id in ids:
        planner, bot = results[env_id, "planner"], results.get((env_id, "bot"))
        if planner.cannot_run or not planner.planned:
            reason = planner.cannot_run or "; ".join(planner.no_plan)
            without_plan.append(f"{env_id}: {reason}")
            continue
        label = (f"{env_id} steps {mean(planner.steps):.1f}/{mean(planner.plan_steps):.1f}"
                 + (f" bot {mean(bot.steps):.1f}" if bot else ""))
        hung = [f"{coverage.expert} hung {coverage.hung}x" for coverage in (planner, bot) if coverage and coverage.hung]
        hung += [f"{coverage.expert} raised {sum(coverage.errors.values())}x" for coverage in (planner, bot)
                 if coverage and coverage.errors]
        if planner.unplanned_at_reset:
            hung.append(f"no plan at reset on {sum(planner.unplanned_at_reset.values())} solved seeds: "
                        f"{'; '.join(planner.unplanned_at_reset)}")
        if hung:
            label += f" ({', '.join(hung)})"
        if planner.no_plan:
            label += f" ({sum(planner.no_plan.values())} seeds no plan)"
            without_plan += [f"{env_id}: {count} seeds: {reason}" for reason, count in planner.no_plan.items()]
        table.add(label, planner.success, bot.success if bot else None, f">= {TARGET_SUCCESS}",
                  planner.success >= TARGET_SUCCESS and not planner.unplanned_at_reset)
    print(table.render())
    print("\nNo plan exists (the planner's reason):")
    print("\n".join(f"  {line}" for line in without_plan) or "  none")
    print(f"\n{time.perf_counter() - started:.0f} s, {load_average()}")
    sys.exit(table.exit_code())


if __name__ == "__main__":
    main()
