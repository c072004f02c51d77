"""Offline RL on noisy LunarLander data: our CQL vs d3rlpy's DiscreteCQL, with our IQL and BC alongside.

    python bench/offline.py [--updates 20000] [--episodes 200] [--eval-episodes 100] [--device auto] [--threads 1]

1. Data: ``--episodes`` episodes of gymnasium's LunarLander heuristic with 30 % random actions
   (epsilon = 0.3), recorded by mazerun's own rollout (episode i seeded i) into a temporary directory.
2. Every learner gets exactly the same transitions (a truncated episode's last step bootstraps
   from its final observation in both libraries), ``--updates`` gradient steps of batch 256,
   256x256 ReLU networks, observations standardised with the dataset's statistics, seed 0:

   * ours:   mazerun's CQL, IQL and BC, their updates driven the way ``mazerun.training`` drives them
             (sample a batch, ``update``, add the detached metrics to the report window);
   * peer:   d3rlpy's ``DiscreteCQL`` (double DQN + the same conservative term, Huber TD loss) with
             our CQL's settings: lr 3e-4, gamma 0.99, alpha 1, hard target copy every 1000 updates,
             trained by its own ``fit`` (logging off, no evaluators).
3. updates/s = ``--updates`` / wall seconds of that training loop (model construction excluded).
   Eval return = mean return of the final weights' greedy actions over ``--eval-episodes`` episodes
   on mazerun's fixed evaluation seeds, through the same ``mazerun.evaluation.evaluate`` for all.

Targets: our CQL reaches >= 3x d3rlpy's updates/s and an eval return >= d3rlpy's; the command
exits 1 when one fails. IQL and BC are shown for what value learning buys over cloning noisy data
(there is no discrete IQL in d3rlpy). ``--threads`` sets torch's intra-op threads for both
libraries alike: these networks are small, and on a shared 2-core machine a second thread mostly
waits for the other jobs. d3rlpy 2.8 pins gymnasium==1.0.0; install it next to gymnasium 1.x with
``pip install --no-deps d3rlpy`` plus its other requirements (it then runs as usual).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mazerun.algorithms import bc, cql, iql
from mazerun.algorithms.base import OfflineAlgorithm, OfflineConfig
from mazerun.config import PolicyConfig, RunnerConfig
from mazerun.data import BatchSampler, TransitionDataset, observation_stats, records_to_dataset
from mazerun.envs import make_env
from mazerun.evaluation import evaluate
from mazerun.models import ModelConfig
from mazerun.records import StateTrajectoryRecord, load_records
from mazerun.rollout import TRAJECTORY_DIR, rollout

ENV_ID = "LunarLander-v3"
EPSILON = 0.3
BATCH_SIZE = 256
HIDDEN_SIZES = (256, 256)
ACTIVATION = "relu"
"""d3rlpy's default encoder activation; ours is set to match."""
LEARNING_RATE = 3e-4
GAMMA = 0.99
ALPHA = 1.0
TARGET_UPDATE_INTERVAL = 1000
SEED = 0
SPEED_TARGET = 3.0
"""Our CQL's updates/s must be at least this multiple of d3rlpy's DiscreteCQL's."""


@dataclass
class Result:
    name: str
    updates_per_second: float
    eval_return: float


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Hide progress bars and import chatter; show them again on error."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def record_dataset(episodes: int, run_dir: Path) -> list[StateTrajectoryRecord]:
    runner = RunnerConfig(type="parallel", n_episodes=episodes, seed=SEED, record_trajectory=True)
    with quiet_stderr():
        rollout(ENV_ID, PolicyConfig(name="heuristic", epsilon=EPSILON), runner, run_dir, print_fn=lambda _: None)
    return load_records(run_dir / TRAJECTORY_DIR)


def greedy_return(act: Callable[[torch.Tensor], torch.Tensor], episodes: int, device: torch.device) -> float:
    env = make_env(ENV_ID)
    env.close()
    result = evaluate(act, ENV_ID, episodes, observation_space=env.observation_space, vocabulary=None, device=device)
    return result.metrics()["mean_return"]


# -- ours -----------------------------------------------------------------------------------------


def train_ours(
    name: str, module: Any, config: OfflineConfig, data: TransitionDataset, eval_episodes: int, device: torch.device
) -> Result:
    """Train one of our algorithms with the shared loop's per-update steps, then evaluate it."""
    torch.manual_seed(SEED)
    env = make_env(ENV_ID)
    env.close()
    model_config = ModelConfig(kind="vector_obs", hidden_sizes=HIDDEN_SIZES, activation=ACTIVATION)
    algorithm: OfflineAlgorithm = module.Algorithm(config, model_config, env.observation_space, env.action_space, None, device)
    algorithm.set_normalization(*observation_stats(data))
    sampler = BatchSampler(data, config.batch_size, seed=SEED)

    window: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    start = time.perf_counter()
    for _ in range(config.n_updates):
        for metric, value in algorithm.update(sampler.sample()).items():
            window[metric] += value
    float(sum(window.values()))  # waits for the device to finish every update
    seconds = time.perf_counter() - start
    eval_return = greedy_return(lambda observations: algorithm.act(observations, deterministic=True), eval_episodes, device)
    return Result(name, config.n_updates / seconds, eval_return)


# -- d3rlpy ---------------------------------------------------------------------------------------


def d3rlpy_dataset(records: list[StateTrajectoryRecord]) -> Any:
    """The same transitions as an ``MDPDataset``.

    d3rlpy stores T observations per episode and never samples the last step of a timed-out
    episode (it has no next observation). A truncated episode therefore gets its final
    observation appended as one extra, never-sampled step, so its real last step bootstraps from
    it exactly as in mazerun; a terminated one keeps its T steps with the terminal flag.
    """
    import d3rlpy

    observations, actions, rewards, terminals, timeouts = [], [], [], [], []
    for record in records:
        steps = len(record)
        extra = 0 if record.terminated else 1
        observations.append(np.asarray(record.observations[: steps + extra], dtype=np.float32))
        actions.append(np.concatenate([record.actions, np.zeros(extra, dtype=np.int64)]))
        rewards.append(np.concatenate([record.rewards, np.zeros(extra)]).astype(np.float32))
        end = np.zeros(steps + extra, dtype=np.float32)
        end[-1] = 1.0
        terminals.append(end if record.terminated else np.zeros_like(end))
        timeouts.append(np.zeros_like(end) if record.terminated else end)
    return d3rlpy.dataset.MDPDataset(
        np.concatenate(observations), np.concatenate(actions), np.concatenate(rewards)[:, None],
        np.concatenate(terminals), np.concatenate(timeouts),
        action_space=d3rlpy.constants.ActionSpace.DISCRETE, action_size=4,
    )


def train_d3rlpy_cql(records: list[StateTrajectoryRecord], updates: int, eval_episodes: int, device: torch.device) -> Result:
    import d3rlpy

    d3rlpy.seed(SEED)
    with contextlib.redirect_stdout(io.StringIO()):  # d3rlpy logs through structlog to stdout
        dataset = d3rlpy_dataset(records)
    algorithm = d3rlpy.algos.DiscreteCQLConfig(
        batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        gamma=GAMMA,
        alpha=ALPHA,
        target_update_interval=TARGET_UPDATE_INTERVAL,
        encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=list(HIDDEN_SIZES), activation=ACTIVATION),
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
    ).create(device=f"{device.type}:{device.index or 0}" if device.type == "cuda" else False)
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):
        algorithm.build_with_dataset(dataset)
        start = time.perf_counter()
        algorithm.fit(
            dataset, n_steps=updates, n_steps_per_epoch=updates, show_progress=False,
            logger_adapter=d3rlpy.logging.NoopAdapterFactory(), save_interval=updates + 1,
        )
        seconds = time.perf_counter() - start

    def act(observations: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(algorithm.predict(observations.cpu().numpy()))

    return Result("d3rlpy DiscreteCQL", updates / seconds, greedy_return(act, eval_episodes, device))


def import_d3rlpy() -> str | None:
    """d3rlpy's version, or None with the reason printed when it cannot be used here."""
    try:
        with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):
            import d3rlpy
    except Exception as error:  # an ImportError, or a failure inside d3rlpy's own imports
        say(f"d3rlpy unavailable ({type(error).__name__}: {error}); the peer column is left empty")
        return None
    return d3rlpy.__version__


# -- the table ------------------------------------------------------------------------------------


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([line(header), "-+-".join("-" * width for width in widths), *map(line, rows)])


def table(ours: dict[str, Result], peer: Result | None, peer_name: str, data_return: float) -> tuple[str, bool]:
    """The printed table, and whether both checked targets passed (True when there is no peer)."""
    cql_result = ours["CQL"]
    header = ["learner", "metric", "ours", peer_name, "ours vs peer", "target", "result"]
    rows: list[list[str]] = []
    passed = True
    if peer is not None:
        speed = cql_result.updates_per_second / peer.updates_per_second
        speed_ok = speed >= SPEED_TARGET
        return_ok = cql_result.eval_return >= peer.eval_return
        passed = speed_ok and return_ok
        rows += [
            ["CQL", "updates/s", f"{cql_result.updates_per_second:,.0f}", f"{peer.updates_per_second:,.0f}",
             f"{speed:.2f}x", f">= {SPEED_TARGET:.1f}x", "PASS" if speed_ok else "FAIL"],
            ["CQL", "eval return", f"{cql_result.eval_return:.1f}", f"{peer.eval_return:.1f}",
             f"{cql_result.eval_return - peer.eval_return:+.1f}", ">= peer", "PASS" if return_ok else "FAIL"],
        ]
    else:
        rows += [
            ["CQL", "updates/s", f"{cql_result.updates_per_second:,.0f}", "n/a", "n/a", f">= {SPEED_TARGET:.1f}x", "n/a"],
            ["CQL", "eval return", f"{cql_result.eval_return:.1f}", "n/a", "n/a", ">= peer", "n/a"],
        ]
    for name in ("IQL", "BC"):
        result = ours[name]
        rows += [
            [name, "updates/s", f"{result.updates_per_second:,.0f}", "-", "-", "-", "-"],
            [name, "eval return", f"{result.eval_return:.1f}", "-", "-", "-", "-"],
        ]
    rows.append(["data (heuristic, eps 0.3)", "episode return", f"{data_return:.1f}", "-", "-", "-", "-"])
    return format_table(header, rows), passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20_000, help="gradient steps per learner (default 20000)")
    parser.add_argument("--episodes", type=int, default=200, help="recorded episodes (default 200)")
    parser.add_argument("--eval-episodes", type=int, default=100, help="evaluation episodes per learner (default 100)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto: the GPU when there is one)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both libraries (default 1)")
    parser.add_argument("--skip-peer", action="store_true", help="run ours only")
    args = parser.parse_args(argv)
    if min(args.updates, args.episodes, args.eval_episodes, args.threads) < 1:
        parser.error("--updates, --episodes, --eval-episodes and --threads must be at least 1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="mazerun-offline-bench-") as run_dir:
        say(f"recording {args.episodes} episodes of the heuristic with epsilon={EPSILON} ...")
        records = record_dataset(args.episodes, Path(run_dir))
    data = records_to_dataset(records).to(device)
    data_return = float(np.mean([record.episode_return for record in records]))
    say(f"dataset: {len(records)} episodes, {len(data):,} transitions, mean return {data_return:.1f}")

    common = dict(n_updates=args.updates, batch_size=BATCH_SIZE, lr=LEARNING_RATE, eval_every=args.updates)
    learners = {
        "CQL": (cql, cql.CQLConfig(**common, gamma=GAMMA, alpha=ALPHA, tau=1.0, target_update_interval=TARGET_UPDATE_INTERVAL)),
        "IQL": (iql, iql.IQLConfig(**common, gamma=GAMMA)),
        "BC": (bc, bc.BCConfig(**common, validation_percentage=0.0)),
    }
    ours: dict[str, Result] = {}
    for name, (module, config) in learners.items():
        say(f"ours {name}: {args.updates} updates on {device} ...")
        ours[name] = train_ours(name, module, config, data, args.eval_episodes, device)
        say(f"  {ours[name].updates_per_second:,.0f} updates/s, eval return {ours[name].eval_return:.1f}")

    peer: Result | None = None
    version = None if args.skip_peer else import_d3rlpy()
    if version is not None:
        say(f"d3rlpy {version} DiscreteCQL: {args.updates} updates on {device} ...")
        peer = train_d3rlpy_cql(records, args.updates, args.eval_episodes, device)
        say(f"  {peer.updates_per_second:,.0f} updates/s, eval return {peer.eval_return:.1f}")
    peer_name = f"d3rlpy {version} DiscreteCQL" if version else "d3rlpy (not run)"

    text, passed = table(ours, peer, peer_name, data_return)
    print(f"\n{ENV_ID}: {len(records)} episodes of the heuristic with epsilon={EPSILON} ({len(data):,} transitions), "
          f"{args.updates:,} updates of batch {BATCH_SIZE}, {'x'.join(map(str, HIDDEN_SIZES))} {ACTIVATION} networks, "
          f"{device}, {args.threads} thread(s); eval return over {args.eval_episodes} greedy episodes\n")
    print(text)
    bc_return = ours["BC"].eval_return
    print(f"\nvalue learning vs cloning the noisy data: CQL {ours['CQL'].eval_return - bc_return:+.1f}, "
          f"IQL {ours['IQL'].eval_return - bc_return:+.1f} eval return over BC")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
