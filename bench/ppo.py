"""PPO against Stable-Baselines3, and fine-tuning a behavioural clone against learning from scratch.

    python bench/ppo.py [--steps 1000000] [--seeds 0] [--parts speed finetune cartpole] [--jobs 1]

Needs the peers: ``pip install -e ".[bench]"`` (stable-baselines3). Three experiments, every
evaluation played by :func:`mazerun.evaluation.evaluate` on the same fixed seeds for both sides:

1. speed: PPO on LunarLander-v3 with rl-zoo's settings (16 envs, n_steps 1024, batch 64,
   4 epochs, gamma 0.999, gae_lambda 0.98, ent_coef 0.01, separate 64x64 tanh actor and critic)
   in mazerun and in SB3, same seeds, ``--steps`` env steps each, one torch thread on each side.
   The target is on the steady state: the median steps/s of one iteration (a rollout and its
   update). End-to-end steps/s (env construction, torch's lazy imports, mazerun's step-0 and
   final evaluations, checkpoints and plot included) is shown too; it approaches the steady
   state only over long runs. The return is the final policy's mean over 100 evaluation episodes.
2. finetune: the seed-004 experiment. 50 heuristic episodes are recorded and cloned with BC
   (mazerun's defaults); PPO then fine-tunes the clone (critic burn-in of 10 iterations, 100
   evaluation episodes every 32768 steps), and PPO from scratch with the same network and
   seeds is the baseline. Both curves go to ``bench/ppo_finetune.png``. Targets: the
   fine-tuned return never below 200, and >= 250 at the last evaluation by 300k steps.
3. cartpole: CartPole-v1 with rl-zoo's CartPole settings (8 envs, n_steps 32, batch 256,
   20 epochs, gamma 0.98, gae_lambda 0.8, no entropy bonus, lr 1e-3 decaying linearly) in both
   libraries for 100k steps, evaluated (10 episodes) every 4096 steps: the first step at which
   the mean return is 500.

One table sums up: ours, the peer (SB3, or PPO from scratch for the fine-tune rows), their
ratio and the target. With ``--jobs N`` the trainings run in N processes at once (one thread
each): only on a machine with cores to spare, or the steps/s of part 1 lose their meaning.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
# Imported up front, as SB3's modules are, so that no side's import time is timed (mazerun
# draws its learning curve with matplotlib at the end of a run).
import matplotlib.figure  # noqa: F401

from mazerun.algorithms.bc import BCConfig
from mazerun.algorithms.ppo import PPOConfig
from mazerun.checkpoint import load_checkpoint
from mazerun.config import DatasetConfig, EnvConfig, PolicyConfig, RunConfig, RunnerConfig
from mazerun.evaluation import evaluate
from mazerun.metrics import read_metrics_csv
from mazerun.onpolicy import plot_curves, train_on_policy
from mazerun.policies.torch_policy import build_network
from mazerun.rollout import rollout
from mazerun.training import train

LUNAR_ENV = "LunarLander-v3"
CARTPOLE_ENV = "CartPole-v1"
FINAL_EVAL_EPISODES = 100
SPEED_TARGET = 2.0
FINETUNE_FLOOR = 200.0
FINETUNE_TARGET = 250.0
FINETUNE_BY_STEP = 300_000
FINETUNE_EVAL_EVERY = 32_768
FINETUNE_DEMOS = 50
CARTPOLE_STEPS = 100_000
CARTPOLE_EVAL_EVERY = 4096
CARTPOLE_EVAL_EPISODES = 10
CARTPOLE_SOLVED = 500.0
PLOT = Path(__file__).resolve().parent / "ppo_finetune.png"

LUNAR = dict(n_envs=16, n_steps=1024, batch_size=64, n_epochs=4, gamma=0.999, gae_lambda=0.98, ent_coef=0.01,
             lr=3e-4, clip_range=0.2, vf_coef=0.5, max_grad_norm=0.5, linear_lr=False)
CARTPOLE = dict(n_envs=8, n_steps=32, batch_size=256, n_epochs=20, gamma=0.98, gae_lambda=0.8, ent_coef=0.0,
                lr=1e-3, clip_range=0.2, vf_coef=0.5, max_grad_norm=0.5, linear_lr=True)
"""rl-zoo's tuned PPO settings; the clip range stays constant on both sides (rl-zoo decays it for CartPole)."""


Curve = list[tuple[int, float]]


@dataclass
class Outcome:
    """What one training job measured."""

    steps: int = 0
    seconds: float = 0.0
    final_return: float = math.nan
    curve: Curve = field(default_factory=list)
    iteration_rates: list[float] = field(default_factory=list)
    """Steps/s of each rollout + update iteration: the steady state, without start-up or evaluations."""

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds


# ----------------------------------------------------------------------------------------------- jobs


@contextlib.contextmanager
def quiet() -> Any:
    """Keep the trainers' metric tables and progress bars out of the benchmark's output."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def ppo_config(settings: dict, total_steps: int, eval_every: int) -> PPOConfig:
    return PPOConfig(
        total_steps=total_steps, n_steps=settings["n_steps"], batch_size=settings["batch_size"],
        n_epochs=settings["n_epochs"], gamma=settings["gamma"], gae_lambda=settings["gae_lambda"],
        ent_coef=settings["ent_coef"], lr=settings["lr"], clip_range=settings["clip_range"],
        vf_coef=settings["vf_coef"], max_grad_norm=settings["max_grad_norm"],
        lr_schedule="linear" if settings["linear_lr"] else "constant", eval_every=eval_every,
    )


def eval_curve(run_dir: Path) -> Curve:
    return [(row["step"], row["value"]) for row in read_metrics_csv(run_dir / "metrics.csv")
            if row["group"] == "eval" and row["metric"] == "mean_return"]


def evaluate_checkpoint(path: Path, env_id: str, episodes: int) -> float:
    """Mean return of a mazerun checkpoint's greedy policy."""
    checkpoint = load_checkpoint(path)
    values = dict(checkpoint.model_config)
    network = build_network(values.pop("network"), values, checkpoint.observation_space, checkpoint.action_space, None)
    network.load_state_dict(checkpoint.model_state)
    return evaluate(lambda obs: network.act(obs, deterministic=True), env_id, episodes,
                    observation_space=checkpoint.observation_space, vocabulary=None, device="cpu").metrics()["mean_return"]


def ours(env_id: str, settings: dict, seed: int, steps: int, eval_every: int, eval_repeats: int,
         hidden_sizes: tuple[int, ...] | None = (64, 64), input_dir: str | None = None, burn_in: int = 0,
         final_episodes: int = 0) -> Outcome:
    """mazerun PPO, called as `run algorithm=ppo ...` would call it."""
    torch.manual_seed(seed)
    config = RunConfig(
        env=EnvConfig(name=None if input_dir else env_id),
        runner=RunnerConfig(n_envs=settings["n_envs"], seed=seed, eval_repeats=eval_repeats,
                            critic_burn_in_epochs=burn_in),
        algorithm=ppo_config(settings, steps, eval_every),
        input_dir=input_dir, device="cpu",
        model=None if hidden_sizes is None else {"hidden_sizes": list(hidden_sizes)},
    )
    with tempfile.TemporaryDirectory(prefix="mazerun-bench-") as directory, quiet():
        run_dir = Path(directory)
        start = time.perf_counter()
        train_on_policy(config, run_dir)
        seconds = time.perf_counter() - start
        last = load_checkpoint(run_dir / "last.pt")
        final = evaluate_checkpoint(run_dir / "last.pt", env_id, final_episodes) if final_episodes else math.nan
        rates = [row["value"] for row in read_metrics_csv(run_dir / "metrics.csv")
                 if row["group"] == "train" and row["metric"] == "sps"]
        return Outcome(int(last.extra["step"]), seconds, final, eval_curve(run_dir), rates)


def sb3(env_id: str, settings: dict, seed: int, steps: int, eval_every: int = 0, eval_repeats: int = 0,
        final_episodes: int = 0) -> Outcome:
    """Stable-Baselines3's PPO with the same settings; evaluations (if any) after each update, like ours."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)
    curve: Curve = []
    rollout_starts: list[tuple[float, int]] = []

    def act_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda obs: torch.as_tensor(model.predict(obs.numpy(), deterministic=True)[0])

    def mean_return(model: Any, episodes: int) -> float:
        space = model.observation_space
        return evaluate(act_fn(model), env_id, episodes, observation_space=space, vocabulary=None,
                        device="cpu").metrics()["mean_return"]

    class EvaluateAfterUpdates(BaseCallback):
        """At the start of a rollout, i.e. after the previous update, as mazerun's loop evaluates."""

        def __init__(self) -> None:
            super().__init__()
            self.next = 0

        def _on_rollout_start(self) -> None:
            rollout_starts.append((time.perf_counter(), self.num_timesteps))
            if eval_every and self.num_timesteps >= self.next:
                curve.append((self.num_timesteps, mean_return(self.model, eval_repeats)))
                self.next = (self.num_timesteps // eval_every + 1) * eval_every

        def _on_step(self) -> bool:
            return True

    lr = settings["lr"]
    with quiet():
        start = time.perf_counter()
        env = make_vec_env(env_id, n_envs=settings["n_envs"], seed=seed)
        model = PPO(
            "MlpPolicy", env, n_steps=settings["n_steps"], batch_size=settings["batch_size"],
            n_epochs=settings["n_epochs"], gamma=settings["gamma"], gae_lambda=settings["gae_lambda"],
            ent_coef=settings["ent_coef"], learning_rate=(lambda progress: lr * progress) if settings["linear_lr"] else lr,
            clip_range=settings["clip_range"], vf_coef=settings["vf_coef"], max_grad_norm=settings["max_grad_norm"],
            seed=seed, device="cpu", verbose=0,
        )
        model.learn(steps, callback=EvaluateAfterUpdates())
        seconds = time.perf_counter() - start
        if eval_every:
            curve.append((model.num_timesteps, mean_return(model, eval_repeats)))
        final = mean_return(model, final_episodes) if final_episodes else math.nan
    # From one rollout start to the next: a rollout and its update (no evaluations in timed runs).
    rates = [(steps - before) / (now - then) for (then, before), (now, steps) in zip(rollout_starts, rollout_starts[1:])]
    return Outcome(model.num_timesteps, seconds, final, curve, rates)


def finetuned(seed: int, steps: int) -> Outcome:
    """Record 50 heuristic episodes, clone them with BC, fine-tune the clone with PPO."""
    with tempfile.TemporaryDirectory(prefix="mazerun-bench-") as directory:
        recordings, clone = Path(directory) / "records", Path(directory) / "bc"
        with quiet():
            rollout(LUNAR_ENV, PolicyConfig(name="heuristic"),
                    RunnerConfig(type="sequential", n_episodes=FINETUNE_DEMOS, seed=seed), recordings,
                    print_fn=lambda _: None)
            torch.manual_seed(seed)
            train(RunConfig(algorithm=BCConfig(), device="cpu", runner=RunnerConfig(
                seed=seed, dataset=DatasetConfig(dir_or_file=str(recordings / "trajectory_data")))), clone)
        return ours(LUNAR_ENV, LUNAR, seed, steps, FINETUNE_EVAL_EVERY, FINAL_EVAL_EPISODES,
                    hidden_sizes=None, input_dir=str(clone), burn_in=10)


JOBS: dict[str, Callable[..., Outcome]] = {
    "ours-lunar": lambda seed, steps: ours(LUNAR_ENV, LUNAR, seed, steps, steps, 1, final_episodes=FINAL_EVAL_EPISODES),
    "sb3-lunar": lambda seed, steps: sb3(LUNAR_ENV, LUNAR, seed, steps, final_episodes=FINAL_EVAL_EPISODES),
    "ours-finetune": finetuned,
    "ours-scratch": lambda seed, steps: ours(LUNAR_ENV, LUNAR, seed, steps, FINETUNE_EVAL_EVERY,
                                             FINAL_EVAL_EPISODES, hidden_sizes=None),
    "ours-cartpole": lambda seed, steps: ours(CARTPOLE_ENV, CARTPOLE, seed, CARTPOLE_STEPS, CARTPOLE_EVAL_EVERY,
                                              CARTPOLE_EVAL_EPISODES),
    "sb3-cartpole": lambda seed, steps: sb3(CARTPOLE_ENV, CARTPOLE, seed, CARTPOLE_STEPS, CARTPOLE_EVAL_EVERY,
                                            CARTPOLE_EVAL_EPISODES),
}
PARTS = {"speed": ("ours-lunar", "sb3-lunar"), "finetune": ("ours-finetune", "ours-scratch"),
         "cartpole": ("ours-cartpole", "sb3-cartpole")}


def run_job(name: str, seed: int, steps: int) -> Outcome:
    torch.set_num_threads(1)
    return JOBS[name](seed, steps)


# ---------------------------------------------------------------------------------------------- table


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def last_at_or_before(curve: Curve, step: int) -> float:
    points = [value for at, value in curve if at <= step]
    return points[-1] if points else math.nan


def slowest(values: list[float]) -> float:
    """The largest step count; NaN (never reached) when any run never got there."""
    return math.nan if any(math.isnan(value) for value in values) else max(values)


def first_reaching(curve: Curve, value: float) -> float:
    return next((float(at) for at, achieved in curve if achieved >= value), math.nan)


def rows_for(results: dict[str, list[Outcome]], steps: int) -> list[list[str]]:
    rows: list[list[str]] = []
    short = f"n/a (--steps < {FINETUNE_BY_STEP // 1000}k)"

    def row(what: str, ours_value: float, peer: float, target: str, verdict: bool | str, digits: int = 1) -> None:
        # A ratio only means something between two positive numbers (rates, or returns above 0).
        ratio = ours_value / peer if ours_value > 0 and peer > 0 else math.nan
        met = verdict if isinstance(verdict, str) else ("PASS" if verdict else "FAIL")
        rows.append([what, fmt(ours_value, digits), fmt(peer, digits), fmt(ratio, 2), target, met])

    if "ours-lunar" in results:
        ours_runs, peer_runs = results["ours-lunar"], results["sb3-lunar"]
        ours_rate = statistics.median([rate for run in ours_runs for rate in run.iteration_rates])
        peer_rate = statistics.median([rate for run in peer_runs for rate in run.iteration_rates])
        row(f"{LUNAR_ENV} steps/s, rollout+update (vs SB3)", ours_rate, peer_rate, f">= {SPEED_TARGET:g}x SB3",
            ours_rate >= SPEED_TARGET * peer_rate, 0)
        row(f"{LUNAR_ENV} steps/s, end to end (vs SB3)", mean([run.steps_per_second for run in ours_runs]),
            mean([run.steps_per_second for run in peer_runs]), "-", "-", 0)
        ours_return = mean([run.final_return for run in ours_runs])
        row(f"{LUNAR_ENV} return, {FINAL_EVAL_EPISODES} ep. after {ours_runs[0].steps:,} steps (vs SB3)",
            ours_return, mean([run.final_return for run in peer_runs]), ">= 200 at 1M steps",
            ours_return >= 200 if steps >= 1_000_000 else "n/a (--steps < 1M)")
    if "ours-finetune" in results:
        tuned, scratch = results["ours-finetune"], results["ours-scratch"]
        row("fine-tune: first eval = the BC clone (vs scratch)", mean([run.curve[0][1] for run in tuned]),
            mean([run.curve[0][1] for run in scratch]), "-", "-")
        lowest = min(value for run in tuned for _, value in run.curve)
        row("fine-tune: lowest eval return (vs scratch)", lowest,
            min(value for run in scratch for _, value in run.curve), f"never < {FINETUNE_FLOOR:g}",
            lowest >= FINETUNE_FLOOR)
        by_target = mean([last_at_or_before(run.curve, FINETUNE_BY_STEP) for run in tuned])
        row(f"fine-tune: eval return by {FINETUNE_BY_STEP // 1000}k steps (vs scratch)", by_target,
            mean([last_at_or_before(run.curve, FINETUNE_BY_STEP) for run in scratch]),
            f">= {FINETUNE_TARGET:g}", by_target >= FINETUNE_TARGET if steps >= FINETUNE_BY_STEP else short)
        row(f"fine-tune: eval return at {tuned[0].steps:,} steps (vs scratch)",
            mean([run.curve[-1][1] for run in tuned]), mean([run.curve[-1][1] for run in scratch]), "-", "-")
    if "ours-cartpole" in results:
        ours_first = slowest([first_reaching(run.curve, CARTPOLE_SOLVED) for run in results["ours-cartpole"]])
        peer_first = slowest([first_reaching(run.curve, CARTPOLE_SOLVED) for run in results["sb3-cartpole"]])
        row(f"{CARTPOLE_ENV}: first step with eval return 500 (vs SB3)", ours_first, peer_first,
            f"<= {CARTPOLE_STEPS // 1000}k", not math.isnan(ours_first) and ours_first <= CARTPOLE_STEPS, 0)
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([line(header), "-+-".join("-" * width for width in widths), *map(line, rows)])


def plot_finetune(results: dict[str, list[Outcome]]) -> None:
    curves = {}
    for name, label in (("ours-finetune", "PPO fine-tuning the BC clone"), ("ours-scratch", "PPO from scratch")):
        for index, run in enumerate(results[name]):
            steps, returns = zip(*run.curve)
            curves[f"{label} (seed {index})" if len(results[name]) > 1 else label] = (list(steps), list(returns))
    plot_curves(PLOT, curves, f"{LUNAR_ENV}: fine-tuning a clone of {FINETUNE_DEMOS} heuristic episodes vs scratch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000, help="env steps of parts 1 and 2 (default 1M)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, one process and thread each")
    args = parser.parse_args()
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        sys.exit('stable-baselines3 is missing: pip install -e ".[bench]"')

    tasks = [(name, seed) for part in args.parts for name in PARTS[part] for seed in args.seeds]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {task: pool.submit(run_job, task[0], task[1], args.steps) for task in tasks}
        results: dict[str, list[Outcome]] = {}
        for (name, seed), future in futures.items():
            outcome = future.result()
            print(f"  {name} seed {seed}: {outcome.steps:,} steps in {outcome.seconds:.0f} s", file=sys.stderr, flush=True)
            results.setdefault(name, []).append(outcome)
    if "finetune" in args.parts:
        plot_finetune(results)
    rows = rows_for(results, args.steps)
    print(format_table(["measure", "ours", "peer", "ratio", "target", "met"], rows))
    print(f"seeds {args.seeds}, {args.jobs} job(s) at once, {time.perf_counter() - started:.0f} s in all"
          + (f"; curves in {PLOT}" if "finetune" in args.parts else ""))
    if any(row[-1] == "FAIL" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
