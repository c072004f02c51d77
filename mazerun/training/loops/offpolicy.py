"""The off-policy training loop (SAC): vectorised environments, a replay buffer, evaluation, checkpoints.

Each iteration steps ``runner.n_envs`` env copies once: uniformly random actions until
``learning_starts`` transitions are in, then the policy's samples. Every transition goes into
the replay buffer (:class:`~mazerun.data.replay.ReplayBuffer`: in memory, or where ``buffer_store``
says so in memory-mapped files under ``<run dir>/replay_buffer/``, removed when the loop ends).
Every ``train_freq`` iterations the algorithm takes ``gradient_steps`` updates (-1: one per
transition collected since), each on a batch drawn from the buffer, as Stable-Baselines3's
off-policy loop does.

Episode boundaries: the vector env resets a finished copy within the step that ends it, so the
observation it returns is already the next episode's first; the transition keeps the finished
episode's last observation (``infos["final_obs"]``) as its next observation, and is marked done
only where the episode terminated: a time limit's cut bootstraps from that final observation.

Each step that ends episodes logs their returns (``rollout``); every ``eval_every`` steps the
loop reports (train metrics averaged since the last report, an evaluation, the policy's snapshot
in ``snapshots/step_<N>.pt``) and writes ``last.pt``: the policy, the algorithm's training state (critics, targets, temperature,
optimisers), the loop's generator, the replay buffer, each env copy's running episode and the
report window in progress. A stop (Ctrl-C, SIGTERM) between two iterations writes it too, so
``input_dir=<this run>`` with a larger ``total_steps`` continues as the run that was never
stopped. ``input_dir`` of another algorithm's run (a BC clone, a TD3+BC policy) lends its
policy's weights where they fit (``Algorithm.load_network_state``). The first batch a process draws is
also handed to ``Algorithm.check_fast_path``: a hand-written gradient that no longer matches autograd
of the readable loss is dropped, and the run says so in one line.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from mazerun.acting.evaluation import stack_observations
from mazerun.algorithms import build_algorithm
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.data.replay import ReplayBuffer, buffer_bytes, choose_store
from mazerun.nn.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, TRAINING_STATE
from mazerun.training.loops.vector import VectorEpisodes, open_vector_env
from mazerun.training.runsetup import RunSetup, TrainResult
from mazerun.training.session import LoopShell

log = logging.getLogger(__name__)


REPLAY_DIR = "replay_buffer"
"""In a run directory, while the run trains: the disk store's column files (scratch: last.pt holds the buffer)."""


def train_off_policy(setup: RunSetup) -> TrainResult:
    """Train the setup's off-policy algorithm (SAC) up to ``total_steps`` env steps; writes best.pt, last.pt and
    the metrics."""
    with open_replay_buffer(setup) as buffer:
        return _train(setup, buffer)


def open_replay_buffer(setup: RunSetup) -> ReplayBuffer:
    """The replay buffer, in the store ``buffer_store`` picks, with one line that says which and why."""
    config, key = setup.algorithm, f"{setup.prefix}.buffer_store"
    nbytes = buffer_bytes(config.buffer_size, setup.observation_space, setup.action_space)
    on_disk, reason = choose_store(config.buffer_store, nbytes, setup.device, key)
    directory = setup.run_dir / REPLAY_DIR if on_disk else None
    log.info("a replay buffer of %s transitions (%.1f MiB) %s: %s", f"{config.buffer_size:,}", nbytes / 2**20,
             f"on disk in {directory}" if on_disk else "in memory", reason)
    return ReplayBuffer(config.buffer_size, setup.observation_space, setup.action_space, setup.device, directory)


def _train(setup: RunSetup, buffer: ReplayBuffer) -> TrainResult:
    """:func:`train_off_policy` into ``buffer``, which the caller closes however this ends."""
    config, runner, device = setup.algorithm, setup.runner, setup.device
    n_envs = runner.n_envs
    updates_per_training = config.gradient_steps if config.gradient_steps > 0 else config.train_freq * n_envs
    total_steps = -(-config.total_steps // n_envs) * n_envs
    if total_steps != config.total_steps:
        log.info("%s.total_steps=%d is not a multiple of runner.n_envs=%d; training for %d steps", setup.prefix,
                 config.total_steps, n_envs, total_steps)
    generator = torch.Generator(device=device)
    generator.manual_seed(setup.seed)
    algorithm = build_algorithm(config, setup.spec, generator)
    window: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    window_updates = 0

    start, state = setup.start, None
    if start is None:
        log.info("training %s from scratch on %s", config.name, setup.env_id)
    elif start.continuing:
        state = start.checkpoint.extra[TRAINING_STATE]
        check_continuable(state, buffer.capacity, setup.prefix, start.checkpoint.path)
        algorithm.network.load_state_dict(start.checkpoint.model_state)
        algorithm.load_training_state(state["algorithm"], start.step)
        generator.set_state(state["generator"])
        buffer.load_state(state["buffer"])
        window.update({name: value.to(device) for name, value in state["window"].items()})
        window_updates = int(state["window_updates"])
    else:
        algorithm.load_network_state(start.checkpoint.model_state)
        log.info("fine-tuning the %s policy of %s; the critics start fresh", start.checkpoint.algorithm,
                 start.checkpoint.path)

    envs = open_vector_env(setup)
    try:
        episodes = VectorEpisodes(envs, setup.observation_space, setup.vocabulary, device,
                                  None if state is None else state["envs"])
        collector = TransitionCollector(episodes, algorithm.network, buffer, setup.action_space, generator)

        def training_state() -> dict[str, Any]:
            return {"algorithm": algorithm.training_state(), "generator": generator.get_state(),
                    "buffer": buffer.state(), "envs": episodes.state(),
                    "window": {name: value.cpu() for name, value in window.items()}, "window_updates": window_updates}

        shell = LoopShell(setup, algorithm, algorithm.selection_metric(False), training_state)

        def evaluate() -> None:
            bar.set_postfix(eval_return=f"{shell.evaluate()['mean_return']:.1f}")
            shell.keeper.save_snapshot(shell.step)  # a dataset of a medium policy picks one of these

        with shell.running(total_steps) as bar:
            log.info("%d copies of %s ready to step", n_envs, setup.env_id)
            if not setup.continuing:  # a continued run was evaluated where the last one stopped
                evaluate()
                shell.save_last()
            next_report = (shell.step // config.eval_every + 1) * config.eval_every
            started, started_step = time.perf_counter(), shell.step
            fast_path_checked = False
            while shell.step < total_steps:
                interrupts.check()
                episodes_ended = collector.step(random_actions=shell.step < config.learning_starts)
                shell.advance(n_envs)
                if episodes_ended:
                    shell.log(episodes.episode_metrics(), "rollout")
                if shell.step >= config.learning_starts and (shell.step // n_envs) % config.train_freq == 0:
                    for _ in range(updates_per_training):
                        batch = buffer.sample(config.batch_size, generator)
                        if not fast_path_checked:  # this process's first batch
                            fast_path_checked = True
                            problem = algorithm.check_fast_path(batch)
                            if problem is not None:
                                log.warning(problem)
                        metrics = algorithm.learn(batch)
                        for name, value in metrics.items():
                            window[name] += value
                        window_updates += 1
                if shell.step >= next_report or shell.step >= total_steps:
                    metrics = {name: float(value) / window_updates for name, value in window.items()}
                    shell.check_finite(metrics)
                    metrics["sps"] = (shell.step - started_step) / (time.perf_counter() - started)
                    shell.log(metrics, "train")
                    window.clear()
                    window_updates = 0
                    evaluate()
                    shell.save_last()
                    next_report = (shell.step // config.eval_every + 1) * config.eval_every
                    started, started_step = time.perf_counter(), shell.step
    finally:
        envs.close()
    log.info("done: %d steps, %d updates; best %s=%.4g; checkpoints %s and %s in %s", shell.step, algorithm.updates,
             shell.keeper.tracker.metric, shell.keeper.tracker.best, BEST_CHECKPOINT, LAST_CHECKPOINT, setup.run_dir)
    return shell.finish()


def check_continuable(state: dict[str, Any], capacity: int, prefix: str, path: Path) -> None:
    """A continued run steps into a buffer as large (the env copies are :func:`open_vector_env`'s to check)."""
    saved = int(state["buffer"]["capacity"])
    if saved != capacity:
        raise MazerunError(f"{prefix}.buffer_size={capacity} differs from the {saved} of {path}; continue with "
                           f"{prefix}.buffer_size={saved}")


class TransitionCollector:
    """Steps every env copy once per call and writes each copy's transition into the replay buffer.

    Actions are uniform in the box (before learning starts) or the policy's samples, both drawn
    from the loop's generator. A copy whose episode ended is reset within the step; its
    transition keeps the episode's final observation as the next one.
    """

    def __init__(self, episodes: VectorEpisodes, policy: torch.nn.Module, buffer: ReplayBuffer,
                 action_space: gym.spaces.Box, generator: torch.Generator) -> None:
        self.episodes, self.policy, self.buffer, self.generator = episodes, policy, buffer, generator
        device = buffer.device
        self.low, self.high = (torch.as_tensor(bound, dtype=torch.float32, device=device)
                               for bound in (action_space.low, action_space.high))

    def step(self, random_actions: bool) -> bool:
        """One step of every copy into the buffer; whether any episode ended."""
        episodes, device = self.episodes, self.buffer.device
        observations = episodes.tensor(episodes.observations).clone()  # the env reuses its arrays
        if random_actions:
            uniform = torch.rand((len(observations), *self.low.shape), generator=self.generator, device=device)
            actions = self.low + (self.high - self.low) * uniform
        else:
            actions = self.policy.act(observations, deterministic=False, generator=self.generator)
        rewards, terminated, truncated, infos = episodes.step(actions.cpu().numpy())
        next_observations = episodes.tensor(episodes.observations).clone()
        ended = np.flatnonzero(terminated | truncated)
        if len(ended):
            next_observations[torch.as_tensor(ended, device=device)] = episodes.tensor(
                stack_observations([infos["final_obs"][index] for index in ended]))
        self.buffer.add(observations, actions, torch.as_tensor(rewards, dtype=torch.float32, device=device),
                        next_observations, torch.as_tensor(terminated, device=device))
        return len(ended) > 0
