"""PPO against Stable-Baselines3: whole runs, each phase, the return; fine-tuning a clone; CartPole.

    python bench/ppo.py [--steps 1000000] [--speed-steps 65536] [--repeats 3] [--seeds 0]
                        [--parts speed return finetune cartpole] [--jobs 1]
    python bench/ppo.py --smoke      # tiny budgets: checks the wiring, not the targets

The peer comes from the bench extra (``pip install -e ".[bench]"``: stable-baselines3). Both sides
run rl-zoo's LunarLander-v3 PPO: 16 envs, n_steps 1024, batch 64, 4 epochs, gamma 0.999,
gae_lambda 0.98, ent_coef 0.01, lr 3e-4, clip 0.2, and SB3's default policy for it, separate
64x64 tanh actor and critic (``model.hidden_sizes=[64,64]`` on our side); one torch thread each.
Ours is always the real ``run`` command in a subprocess; SB3 runs in a spawned worker process.

1. speed: ``--repeats`` rounds, each one run of ours then one of SB3, ``--speed-steps`` env steps;
   the table shows medians.
   * whole run: our ``run env=LunarLander-v3 algorithm=ppo`` from launch to exit (imports, Hydra,
     the evaluations at step 0 and at the end, a ``last.pt`` per iteration, the learning curve)
     against SB3's ``learn()`` alone, as steps/s. Target: >= 3x.
   * iteration (rollout and update) as steps/s, ours from the run's own timers
     (``train/rollout_seconds``, ``train/update_seconds``) against the raw env rate: two processes
     stepping 8 LunarLander copies each with random actions, side by side, nothing else. Target:
     >= 0.6x. The rollout and update phases are shown against SB3's (a callback at the start and
     end of each rollout); target for the update: >= 2x.
   * start-up: seconds from launching ``run`` to its envs being ready to step. Target: <= 1 s.
     Beside it, ``python -c "import torch"`` alone: the floor any torch program starts from.
   * CartPole-v1 with rl-zoo's settings (below) for ``--cartpole-steps``: whole run against
     SB3's ``learn()``, shown. A CartPole step costs microseconds, so the overhead shows.
2. return: both trained for ``--steps`` on the same seeds; the final policy (``last.pt``, SB3's
   model) plays 100 greedy episodes on seeds no run has seen. Target at 1M steps: ours >= SB3.
   The long runs' steps/s is shown, not judged: SB3's rollouts slow down as its policy fires the
   engines more (LunarLander adds a Box2D particle per firing), so it is not implementation speed.
   ``--jobs 2`` trains two of these runs at a time (a 1M-step SB3 run takes about 18 minutes here).
3. finetune (seed 004): 50 heuristic episodes are recorded and cloned with BC (defaults); PPO
   fine-tunes the clone (critic burn-in of 10 iterations, 100 evaluation episodes every 32768
   steps), and PPO from scratch with the same (256x256) network is the baseline. Both curves go
   to ``bench/ppo_finetune.svg``. Targets: the fine-tuned return never below 200, >= 250 by 300k.
4. cartpole: rl-zoo's CartPole-v1 settings (8 envs, n_steps 32, batch 256, 20 epochs, gamma 0.98,
   gae_lambda 0.8, no entropy bonus, lr 1e-3 decaying linearly) for 100k steps in both, 10
   evaluation episodes every 4096 steps: the first step with a mean return of 500.

The command exits 1 when a target is missed or stable-baselines3 is missing.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import UNSEEN_SEED_OFFSET, Table, evaluate_run, load_average, peer_version, run, seconds_to_log_line

from mazerun.training.metrics import plot_curves, read_metrics_csv

LUNAR_ENV = "LunarLander-v3"
CARTPOLE_ENV = "CartPole-v1"
SPEED_TARGET = 3.0
UPDATE_TARGET = 2.0
RAW_RATE_TARGET = 0.6
STARTUP_TARGET = 1.0
RAW_COPIES = 8
"""Env copies per process of the raw env rate: the 16 copies of the timed runs, in two processes."""
RAW_SECONDS = 3.0
FINAL_EVAL_EPISODES = 100
FINETUNE_FLOOR = 200.0
FINETUNE_TARGET = 250.0
FINETUNE_BY_STEP = 300_000
FINETUNE_EVAL_EVERY = 32_768
FINETUNE_DEMOS = 50
CARTPOLE_STEPS = 100_000
CARTPOLE_EVAL_EVERY = 4096
CARTPOLE_EVAL_EPISODES = 10
CARTPOLE_SOLVED = 500.0
READY_LINE = "ready to step"
"""What the on-policy loop logs once its envs are open: the end of start-up."""
PLOT = Path(__file__).resolve().parent / "ppo_finetune.svg"
SB3_INSTALL = 'pip install -e ".[bench]"'

LUNAR = dict(n_envs=16, n_steps=1024, batch_size=64, n_epochs=4, gamma=0.999, gae_lambda=0.98, ent_coef=0.01,
             lr=3e-4, clip_range=0.2, vf_coef=0.5, max_grad_norm=0.5, linear_lr=False)
CARTPOLE = dict(n_envs=8, n_steps=32, batch_size=256, n_epochs=20, gamma=0.98, gae_lambda=0.8, ent_coef=0.0,
                lr=1e-3, clip_range=0.2, vf_coef=0.5, max_grad_norm=0.5, linear_lr=True)
"""rl-zoo's tuned PPO settings; the clip range stays constant on both sides (rl-zoo decays it for CartPole)."""

Curve = list[tuple[int, float]]


@dataclass
class Outcome:
    """What one training run measured."""

    steps: int = 0
    seconds: float = 0.0
    """Ours: the whole command; SB3: ``learn()``."""
    rollout_seconds: list[float] = field(default_factory=list)
    update_seconds: list[float] = field(default_factory=list)
    startup_seconds: float = math.nan
    final_return: float = math.nan
    curve: Curve = field(default_factory=list)


def overrides_for(settings: dict, env_id: str, steps: int, seed: int) -> list[str]:
    """The `run` overrides that train ``settings`` on ``env_id``."""
    return [
        f"env={env_id}", "algorithm=ppo", f"algorithm.total_steps={steps}", f"runner.n_envs={settings['n_envs']}",
        f"algorithm.n_steps={settings['n_steps']}", f"algorithm.batch_size={settings['batch_size']}",
        f"algorithm.n_epochs={settings['n_epochs']}", f"algorithm.gamma={settings['gamma']}",
        f"algorithm.gae_lambda={settings['gae_lambda']}", f"algorithm.ent_coef={settings['ent_coef']}",
        f"algorithm.lr={settings['lr']}", f"algorithm.clip_range={settings['clip_range']}",
        f"algorithm.vf_coef={settings['vf_coef']}", f"algorithm.max_grad_norm={settings['max_grad_norm']}",
        f"algorithm.lr_schedule={'linear' if settings['linear_lr'] else 'constant'}", f"runner.seed={seed}",
    ]


def ours(work: Path, name: str, *overrides: str, final_episodes: int = 0) -> Outcome:
    """Our `run` command in ``work/name``: wall time, phases and curve from its files."""
    launched = time.time()
    seconds = run(*overrides, f"hydra.run.dir={name}", cwd=work)
    run_dir = work / name
    rows = read_metrics_csv(run_dir / "metrics.csv")

    def series(group: str, metric: str) -> list[tuple[int, float]]:
        return [(row["step"], row["value"]) for row in rows if row["group"] == group and row["metric"] == metric]

    return Outcome(
        steps=max(step for step, _ in series("eval", "mean_return")), seconds=seconds,
        rollout_seconds=[value for _, value in series("train", "rollout_seconds")],
        update_seconds=[value for _, value in series("train", "update_seconds")],
        startup_seconds=seconds_to_log_line(run_dir, READY_LINE, launched),
        final_return=evaluate_run(run_dir, final_episodes, "last.pt")["mean_return"] if final_episodes else math.nan,
        curve=series("eval", "mean_return"),
    )


def sb3(env_id: str, settings: dict, seed: int, steps: int, eval_every: int = 0, eval_repeats: int = 0,
        final_episodes: int = 0) -> Outcome:
    """Stable-Baselines3's PPO with the same settings (in a worker process); evaluations, if any, between updates."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from mazerun.acting.evaluation import evaluate

    torch.set_num_threads(1)
    outcome = Outcome()

    def mean_return(model: Any, episodes: int, seed_offset: int | None = None) -> float:
        def act(observations: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(model.predict(observations.numpy(), deterministic=True)[0])

        extra = {} if seed_offset is None else {"seed_offset": seed_offset}
        return evaluate(act, env_id, episodes, observation_space=model.observation_space, vocabulary=None,
                        device="cpu", **extra).metrics()["mean_return"]

    class Timing(BaseCallback):
        """Rollout phases from rollout start to end; update phases from a rollout's end to the next one's start."""

        def __init__(self) -> None:
            super().__init__()
            self.next_evaluation, self.rollout_started, self.rollout_ended = 0, 0.0, None

        def _on_rollout_start(self) -> None:
            if self.rollout_ended is not None:
                outcome.update_seconds.append(time.perf_counter() - self.rollout_ended)
            if eval_every and self.num_timesteps >= self.next_evaluation:  # not timed: no phase is running
                outcome.curve.append((self.num_timesteps, mean_return(self.model, eval_repeats)))
                self.next_evaluation = (self.num_timesteps // eval_every + 1) * eval_every
            self.rollout_started = time.perf_counter()

        def _on_rollout_end(self) -> None:
            self.rollout_ended = time.perf_counter()
            outcome.rollout_seconds.append(self.rollout_ended - self.rollout_started)

        def _on_training_end(self) -> None:
            outcome.update_seconds.append(time.perf_counter() - self.rollout_ended)

        def _on_step(self) -> bool:
            return True

    lr = settings["lr"]
    env = make_vec_env(env_id, n_envs=settings["n_envs"], seed=seed)
    model = PPO(
        "MlpPolicy", env, n_steps=settings["n_steps"], batch_size=settings["batch_size"],
        n_epochs=settings["n_epochs"], gamma=settings["gamma"], gae_lambda=settings["gae_lambda"],
        ent_coef=settings["ent_coef"], learning_rate=(lambda progress: lr * progress) if settings["linear_lr"] else lr,
        clip_range=settings["clip_range"], vf_coef=settings["vf_coef"], max_grad_norm=settings["max_grad_norm"],
        seed=seed, device="cpu", verbose=0,
    )
    started = time.perf_counter()
    model.learn(steps, callback=Timing())
    outcome.seconds = time.perf_counter() - started
    outcome.steps = model.num_timesteps
    if eval_every:
        outcome.curve.append((model.num_timesteps, mean_return(model, eval_repeats)))
    if final_episodes:
        outcome.final_return = mean_return(model, final_episodes, UNSEEN_SEED_OFFSET)
    env.close()
    return outcome


def random_steps(env_id: str, copies: int, seconds: float, seed: int) -> float:
    """Steps/s of ``copies`` copies of ``env_id`` stepped one after another with random actions for ``seconds``."""
    import gymnasium as gym

    envs = [gym.make(env_id) for _ in range(copies)]
    for index, env in enumerate(envs):
        env.reset(seed=seed + index)
        env.action_space.seed(seed + index)
    actions = [[int(env.action_space.sample()) for _ in range(4096)] for env in envs]
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for index, env in enumerate(envs):
            _, _, terminated, truncated, _ = env.step(actions[index][steps % 4096])
            if terminated or truncated:
                env.reset()
        steps += 1
    rate = steps * copies / (time.perf_counter() - started)
    for env in envs:
        env.close()
    return rate


def raw_env_rate(env_id: str, seconds: float = RAW_SECONDS) -> float:
    """Steps/s of two processes stepping :data:`RAW_COPIES` copies each at the same time: the envs' ceiling."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        list(pool.map(random_steps, [env_id] * 2, [RAW_COPIES] * 2, [0.2] * 2, [0, 100]))  # both started
        return sum(pool.map(random_steps, [env_id] * 2, [RAW_COPIES] * 2, [seconds] * 2, [0, 100]))


def torch_import_seconds() -> float:
    """Seconds a fresh interpreter takes to ``import torch``."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def speed(args: argparse.Namespace, work: Path, pool: ProcessPoolExecutor | None, table: Table) -> None:
    """Whole runs and phases, ours and SB3's in turn, ``--repeats`` times; the raw env rate; CartPole's whole runs."""
    steps, seed = args.speed_steps, args.seeds[0]
    runs: dict[str, list[Outcome]] = {"ours": [], "sb3": [], "ours_cartpole": [], "sb3_cartpole": []}
    raw_rates, torch_imports = [], []
    for round_number in range(args.repeats):
        print(f"  speed round {round_number + 1}/{args.repeats} ({load_average()})", file=sys.stderr, flush=True)
        runs["ours"].append(ours(work, f"speed{round_number}", *overrides_for(LUNAR, LUNAR_ENV, steps, seed),
                                 "model.hidden_sizes=[64,64]"))
        raw_rates.append(raw_env_rate(LUNAR_ENV))
        torch_imports.append(torch_import_seconds())
        runs["ours_cartpole"].append(ours(work, f"speed_cartpole{round_number}", *overrides_for(
            CARTPOLE, CARTPOLE_ENV, args.cartpole_steps, seed), "model.hidden_sizes=[64,64]"))
        if pool is not None:
            runs["sb3"].append(pool.submit(sb3, LUNAR_ENV, LUNAR, seed, steps).result())
            runs["sb3_cartpole"].append(pool.submit(sb3, CARTPOLE_ENV, CARTPOLE, seed, args.cartpole_steps).result())
    rollout_size = LUNAR["n_envs"] * LUNAR["n_steps"]

    def rates(name: str, attribute: str) -> float | str:
        if not runs[name]:
            return "missing"
        if attribute == "seconds":
            return median([outcome.steps / outcome.seconds for outcome in runs[name]])
        if attribute == "iteration":
            return median([rollout_size / (rollout + update) for outcome in runs[name]
                           for rollout, update in zip(outcome.rollout_seconds, outcome.update_seconds)])
        return median([rollout_size / seconds for outcome in runs[name] for seconds in getattr(outcome, attribute)])

    def at_least(ours_value: float | str, peer: float | str, target: float) -> bool:
        return isinstance(ours_value, float) and isinstance(peer, float) and ours_value >= target * peer

    whole, peer_whole = rates("ours", "seconds"), rates("sb3", "seconds")
    iteration, raw = rates("ours", "iteration"), median(raw_rates)
    update, peer_update = rates("ours", "update_seconds"), rates("sb3", "update_seconds")
    startup = median([outcome.startup_seconds for outcome in runs["ours"]])
    table.add(f"whole run, {steps:,} steps: steps/s (vs learn())", whole, peer_whole, f">= {SPEED_TARGET:g}x",
              at_least(whole, peer_whole, SPEED_TARGET))
    table.add(f"iteration steps/s (vs 2 processes x {RAW_COPIES} random)", iteration, raw,
              f">= {RAW_RATE_TARGET:g}x", at_least(iteration, raw, RAW_RATE_TARGET))
    table.add("rollout phase: steps/s per iteration", rates("ours", "rollout_seconds"), rates("sb3", "rollout_seconds"))
    table.add("update phase: steps/s per iteration", update, peer_update, f">= {UPDATE_TARGET:g}x",
              at_least(update, peer_update, UPDATE_TARGET))
    table.add("start-up to envs ready to step (s)", startup, None, f"<= {STARTUP_TARGET:g} s",
              startup <= STARTUP_TARGET)
    table.add("python -c 'import torch' alone (s)", median(torch_imports), None)
    table.add(f"{CARTPOLE_ENV} whole run, {args.cartpole_steps:,} steps: steps/s", rates("ours_cartpole", "seconds"),
              rates("sb3_cartpole", "seconds"))
    for name, outcomes in runs.items():
        for outcome in outcomes:
            print(f"  {name}: {outcome.seconds:.2f} s for {outcome.steps:,} steps; {len(outcome.rollout_seconds)} "
                  f"rollouts {sum(outcome.rollout_seconds):.2f} s, updates {sum(outcome.update_seconds):.2f} s; "
                  f"start-up {outcome.startup_seconds:.2f} s", file=sys.stderr)
    print(f"  raw env rates: {', '.join(f'{rate:,.0f}' for rate in raw_rates)} steps/s; import torch: "
          f"{', '.join(f'{seconds:.2f}' for seconds in torch_imports)} s", file=sys.stderr)


def final_return(args: argparse.Namespace, work: Path, peer: bool, table: Table) -> None:
    """Both trained for ``--steps`` on each seed; the final policies on unseen seeds.

    With ``--jobs N`` the runs share N worker processes: a return does not depend on the load, so
    seeds can run side by side; their steps/s then does, and that row says so.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as jobs:
        print(f"  return: {len(args.seeds)} seeds, {args.steps:,} steps, {args.jobs} at a time ({load_average()})",
              file=sys.stderr, flush=True)
        # The peer's runs are the long ones: submitted first, so that no worker is left with one at the end.
        theirs_pending = [jobs.submit(sb3, LUNAR_ENV, LUNAR, seed, args.steps, final_episodes=args.final_episodes)
                          for seed in args.seeds] if peer else []
        mine_pending = [jobs.submit(ours, work, f"return{seed}", *overrides_for(LUNAR, LUNAR_ENV, args.steps, seed),
                                    "model.hidden_sizes=[64,64]", final_episodes=args.final_episodes)
                        for seed in args.seeds]
        mine = [future.result() for future in mine_pending]
        theirs = [future.result() for future in theirs_pending]
    for index, seed in enumerate(args.seeds):
        print(f"  return, seed {seed}: ours {mine[index].final_return:.2f}"
              + (f", SB3 {theirs[index].final_return:.2f}" if theirs else ""), file=sys.stderr)
    ours_return = statistics.fmean(outcome.final_return for outcome in mine)
    peer_return: float | str = statistics.fmean(o.final_return for o in theirs) if theirs else "missing"
    checked = args.steps >= 1_000_000
    table.add(f"return after {mine[0].steps:,} steps, {args.final_episodes} ep.", ours_return, peer_return,
              ">= SB3 (at 1M steps)" if checked else "- (checked at 1M)",
              (isinstance(peer_return, float) and ours_return >= peer_return) if checked else None)
    shared = f" ({args.jobs} runs at once)" if args.jobs > 1 else ""
    table.add(f"whole run, {args.steps:,} steps: steps/s{shared}", statistics.fmean(o.steps / o.seconds for o in mine),
              statistics.fmean(o.steps / o.seconds for o in theirs) if theirs else "missing")


def finetune(args: argparse.Namespace, work: Path, table: Table) -> None:
    """Seed 004: record, clone, fine-tune; PPO from scratch as the baseline."""
    seed = args.seeds[0]
    run(f"env={LUNAR_ENV}", "policy=heuristic", f"runner.n_episodes={FINETUNE_DEMOS}", f"runner.seed={seed}",
        "hydra.run.dir=demos", cwd=work)
    run("-cn", "conf_train", f"runner.dataset.dir_or_file={work / 'demos' / 'trajectory_data'}", f"runner.seed={seed}",
        "hydra.run.dir=clone", cwd=work)
    schedule = [f"algorithm.eval_every={FINETUNE_EVAL_EVERY}", f"runner.eval_repeats={FINAL_EVAL_EPISODES}"]
    print(f"  finetune: {args.steps:,} steps from the clone and from scratch ({load_average()})", file=sys.stderr)
    tuned = ours(work, "finetune", *overrides_for(LUNAR, LUNAR_ENV, args.steps, seed), *schedule,
                 f"input_dir={work / 'clone'}", "algorithm.critic_burn_in_epochs=10")
    scratch = ours(work, "scratch", *overrides_for(LUNAR, LUNAR_ENV, args.steps, seed), *schedule)

    def at(curve: Curve, step: int) -> float:
        points = [value for at_step, value in curve if at_step <= step]
        return points[-1] if points else math.nan

    table.add("fine-tune: first eval = the BC clone (vs scratch)", tuned.curve[0][1], scratch.curve[0][1])
    lowest = min(value for _, value in tuned.curve)
    table.add("fine-tune: lowest eval return (vs scratch)", lowest, min(value for _, value in scratch.curve),
              f"never < {FINETUNE_FLOOR:g}", lowest >= FINETUNE_FLOOR)
    by_target = at(tuned.curve, FINETUNE_BY_STEP)
    reached = args.steps >= FINETUNE_BY_STEP
    table.add(f"fine-tune: eval return by {FINETUNE_BY_STEP // 1000}k (vs scratch)", by_target,
              at(scratch.curve, FINETUNE_BY_STEP), f">= {FINETUNE_TARGET:g}" if reached else "- (needs 300k)",
              by_target >= FINETUNE_TARGET if reached else None)
    table.add(f"fine-tune: eval return at {tuned.steps:,} (vs scratch)", tuned.curve[-1][1], scratch.curve[-1][1])
    curves = {"PPO fine-tuning the BC clone": tuned.curve, "PPO from scratch": scratch.curve}
    plot_curves(PLOT, {label: ([s for s, _ in curve], [v for _, v in curve]) for label, curve in curves.items()},
                f"{LUNAR_ENV}: fine-tuning a clone of {FINETUNE_DEMOS} heuristic episodes vs scratch")


def cartpole(args: argparse.Namespace, work: Path, pool: ProcessPoolExecutor | None, table: Table) -> None:
    seed = args.seeds[0]
    mine = ours(work, "cartpole", *overrides_for(CARTPOLE, CARTPOLE_ENV, args.cartpole_steps, seed),
                "model.hidden_sizes=[64,64]", f"algorithm.eval_every={CARTPOLE_EVAL_EVERY}",
                f"runner.eval_repeats={CARTPOLE_EVAL_EPISODES}")
    theirs = (pool.submit(sb3, CARTPOLE_ENV, CARTPOLE, seed, args.cartpole_steps, CARTPOLE_EVAL_EVERY,
                          CARTPOLE_EVAL_EPISODES).result() if pool is not None else None)

    def first_solved(curve: Curve) -> float:
        return next((float(step) for step, value in curve if value >= CARTPOLE_SOLVED), math.nan)

    solved = first_solved(mine.curve)
    table.add(f"{CARTPOLE_ENV}: first step with eval return 500", solved,
              first_solved(theirs.curve) if theirs else "missing", f"<= {args.cartpole_steps // 1000}k",
              not math.isnan(solved) and solved <= args.cartpole_steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000, help="env steps of the return and finetune parts")
    parser.add_argument("--speed-steps", type=int, default=65_536, help="env steps of each timed run (default 65536)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the speed part (median)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs of the return part at once (default 1)")
    parser.add_argument("--final-episodes", type=int, default=FINAL_EVAL_EPISODES)
    parser.add_argument("--cartpole-steps", type=int, default=CARTPOLE_STEPS)
    parser.add_argument("--parts", nargs="+", choices=("speed", "return", "finetune", "cartpole"),
                        default=["speed", "return", "finetune", "cartpole"])
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: checks the wiring, not the targets")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: use 1 or more runs at a time")
    if args.smoke:
        args.steps, args.speed_steps, args.repeats, args.final_episodes, args.cartpole_steps = 32_768, 16_384, 1, 3, 4096

    version = peer_version("stable_baselines3", SB3_INSTALL)
    print(f"bench/ppo.py: {', '.join(args.parts)}; {load_average()}", file=sys.stderr)
    table = Table(f"PPO vs Stable-Baselines3 {version or '(missing)'}, rl-zoo settings, 1 torch thread, "
                  f"seeds {args.seeds}; the peer is SB3, or PPO from scratch in fine-tune rows")
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as scratch, \
            ProcessPoolExecutor(1, mp_context=context) as pool:
        work = Path(scratch)
        peer_pool = pool if version else None
        if "speed" in args.parts:
            speed(args, work, peer_pool, table)
        if "return" in args.parts:
            final_return(args, work, peer_pool is not None, table)
        if "finetune" in args.parts:
            finetune(args, work, table)
        if "cartpole" in args.parts:
            cartpole(args, work, peer_pool, table)
    print(table.render())
    print(f"({load_average()}; {time.perf_counter() - started:.0f} s in all"
          + (f"; curves in {PLOT}" if "finetune" in args.parts else "") + ")")
    return table.exit_code()


if __name__ == "__main__":
    sys.exit(main())
