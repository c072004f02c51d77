"""The on-policy training loop (PPO): vectorised environments, a rollout buffer, evaluation, checkpoints.

One iteration steps ``runner.n_envs`` environments ``n_steps`` times with one batched forward
pass per step, writes everything into tensors allocated once (``(n_steps, n_envs, ...)``),
scores the steps with GAE and hands the flattened rollout to the algorithm's update.

Episode boundaries: the vector env resets a finished environment within the same step
(``AutoresetMode.SAME_STEP``), so the observation it returns is already the next episode's
first one and the finished episode's last observation is in ``infos["final_obs"]``. A step
that ends an episode is marked done (GAE stops there); when the episode was cut off by a time
limit rather than terminated, ``gamma * V(final_obs)`` is added to that step's reward, the
value of the future the cut hid.

Where the run starts from (``input_dir``):

* nothing: a fresh network for ``env.name`` (default LunarLander-v3), observations left
  unnormalised (mean 0, std 1), as rl-zoo trains LunarLander;
* a BC (or any actor-critic) run: fine-tune its policy in its env, with its vocabulary, model
  config and observation statistics; the value function starts fresh, and
  ``runner.critic_burn_in_epochs`` iterations may train it alone before the policy moves;
* a PPO run: continue it from its ``last.pt`` with the optimiser state, step and iteration
  counters and the evaluation history of that run.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from mazerun.algorithms.ppo import CRITIC_PREFIXES, PPO, PPOConfig, RolloutBatch, compute_gae
from mazerun.checkpoint import Checkpoint, load_checkpoint
from mazerun.config import DEFAULT_ENV_ID, RunConfig
from mazerun.envs import is_minigrid, make_env, resolve_env_id
from mazerun.errors import MazerunError
from mazerun.evaluation import evaluate, stack_observations
from mazerun.metrics import MetricsLogger
from mazerun.models import ActorCritic, ModelInput, Vocabulary, build_actor_critic, obs_to_tensor
from mazerun.records import atomic_write_bytes
from mazerun.training import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    BestTracker,
    choose_env_id,
    model_config_from_checkpoint,
    resolve_device,
    resolve_model_config,
    save_run_checkpoint,
)

log = logging.getLogger(__name__)

LEARNING_CURVE = "learning_curve.png"
SELECTION_METRIC = "eval/mean_return"
MISSION_SAMPLES = 500
"""Seeded resets whose missions make the vocabulary of a MiniGrid/BabyAI run started from scratch."""
TORCH_THREADS = 1
"""Intra-op threads on the CPU: the networks are small and every op in the loop is tiny, so more
threads only add synchronisation (and spin on a busy machine)."""


def train_on_policy(config: RunConfig, run_dir: Path) -> None:
    """Train PPO as ``config`` says; writes best.pt, last.pt, metrics and the learning curve to ``run_dir``."""
    ppo_config: PPOConfig = config.algorithm
    runner = config.runner
    rollout_size = ppo_config.n_steps * runner.n_envs
    total_steps = checked_total_steps(ppo_config, runner.n_envs)
    device = resolve_device(config.device)
    start = load_start_checkpoint(config.input_dir) if config.input_dir else None
    continuing = start is not None and start.algorithm == ppo_config.name

    env_id, observation_space, action_space, vocabulary = _environment(config, start)
    if start is not None:
        _, model_config = model_config_from_checkpoint(start)
    else:
        model_config = resolve_model_config(config.model, observation_space)
    network = build_actor_critic(model_config, observation_space, action_space, vocabulary).to(device)
    algorithm = PPO(dataclasses.replace(ppo_config, total_steps=total_steps), network)

    step, iteration, history = 0, 0, []
    if start is None:
        log.info("training %s from scratch on %s", ppo_config.name, env_id)
    elif continuing:
        network.load_state_dict(start.model_state)
        algorithm.load_training_state(start.extra)
        step, iteration = int(start.extra["step"]), int(start.extra["iteration"])
        history = [tuple(point) for point in start.extra["eval_history"]]
        log.info("continuing %s at step %d (iteration %d)", start.path, step, iteration)
    else:
        load_policy_weights(network, start.model_state)
        log.info("fine-tuning the %s policy of %s; the value function starts fresh", start.algorithm, start.path)
    if step >= total_steps:
        raise MazerunError(
            f"{start.path} already trained for {step} steps >= algorithm.total_steps={total_steps}; "
            "raise algorithm.total_steps to train longer"
        )
    if iteration < runner.critic_burn_in_epochs:
        log.info("critic burn-in: iterations %d to %d train the value function only, the policy frozen",
                 iteration + 1, runner.critic_burn_in_epochs)

    if device.type == "cpu":
        torch.set_num_threads(TORCH_THREADS)
    # Argument checks of torch.distributions cost a few ops per call, thousands of calls per
    # iteration; the actions and log-probs they would check come from the distributions themselves.
    torch.distributions.Distribution.set_default_validate_args(False)
    envs = make_vector_env(env_id, runner.n_envs, runner.vector, runner.max_episode_steps)
    best = BestTracker(SELECTION_METRIC, "max")

    def save(path: Path) -> None:
        save_run_checkpoint(
            path, network, algorithm.network_type, model_config, env_id, observation_space, action_space,
            ppo_config.name, vocabulary,
            extra={"step": step, "iteration": iteration, "eval_history": [list(point) for point in history],
                   "best": {best.metric: best.best}, **algorithm.training_state()},
        )

    def evaluate_and_save(logger: MetricsLogger) -> float:
        result = evaluate(
            lambda observations: network.act(observations, deterministic=True), env_id, runner.eval_repeats,
            observation_space=observation_space, vocabulary=vocabulary, device=device,
            max_episode_steps=runner.max_episode_steps,
        ).metrics()
        logger.log(step, result, "eval")
        if not history or history[-1][0] != step:  # a continued run re-evaluates where the last one ended
            history.append((step, result["mean_return"]))
        if best.improved({SELECTION_METRIC: result["mean_return"]}):
            log.info("-> new best model %s=%.3f, saved %s", best.metric, best.best, BEST_CHECKPOINT)
            save(run_dir / BEST_CHECKPOINT)
        save(run_dir / LAST_CHECKPOINT)
        return result["mean_return"]

    buffer = RolloutBuffer(ppo_config.n_steps, runner.n_envs, observation_space, action_space, device)
    collector = RolloutCollector(envs, network, observation_space, vocabulary, device, ppo_config.gamma,
                                 seed=runner.seed + step)
    try:
        with MetricsLogger(run_dir, print_fn=tqdm.write) as logger, tqdm(
            total=total_steps, initial=step, unit="step", desc=ppo_config.name, disable=None
        ) as bar:
            try:
                bar.set_postfix(eval_return=f"{evaluate_and_save(logger):.1f}")
                next_evaluation = (step // ppo_config.eval_every + 1) * ppo_config.eval_every
                while step < total_steps:
                    started = time.perf_counter()
                    learning_rate = algorithm.learning_rate(step)
                    for group in algorithm.optimizer.param_groups:
                        group["lr"] = learning_rate
                    collector.collect(buffer)
                    metrics = algorithm.update(
                        buffer.batch(collector.last_values(), ppo_config.gamma, ppo_config.gae_lambda),
                        train_policy=iteration >= runner.critic_burn_in_epochs,
                    )
                    step += rollout_size
                    iteration += 1
                    metrics.update(learning_rate=learning_rate, sps=rollout_size / (time.perf_counter() - started))
                    logger.log(step, collector.episode_metrics(), "rollout")
                    logger.log(step, metrics, "train")
                    bar.update(rollout_size)
                    if step >= next_evaluation or step >= total_steps:
                        bar.set_postfix(eval_return=f"{evaluate_and_save(logger):.1f}")
                        next_evaluation = (step // ppo_config.eval_every + 1) * ppo_config.eval_every
            except KeyboardInterrupt:
                save(run_dir / LAST_CHECKPOINT)
                write_learning_curve(run_dir / LEARNING_CURVE, history, env_id)
                raise KeyboardInterrupt(
                    f"stopped at step {step}; saved {run_dir / LAST_CHECKPOINT} "
                    f"(continue with input_dir={run_dir})"
                ) from None
    finally:
        envs.close()
    write_learning_curve(run_dir / LEARNING_CURVE, history, env_id)
    log.info("done: %d steps in %d iterations; best %s=%.3f; checkpoints %s and %s in %s",
             step, iteration, best.metric, best.best, BEST_CHECKPOINT, LAST_CHECKPOINT, run_dir)


def checked_total_steps(config: PPOConfig, n_envs: int) -> int:
    """``total_steps`` rounded up to whole rollouts; the minibatch size must split a rollout evenly."""
    rollout_size = config.n_steps * n_envs
    if rollout_size % config.batch_size:
        divisors = [size for size in range(1, rollout_size + 1) if rollout_size % size == 0]
        below = max(size for size in divisors if size < config.batch_size)
        above = min((size for size in divisors if size > config.batch_size), default=None)
        nearby = f"{below} or {above}" if above is not None else str(below)
        raise MazerunError(
            f"algorithm.batch_size={config.batch_size} does not divide the rollout of n_steps * n_envs = "
            f"{config.n_steps} * {n_envs} = {rollout_size} steps; use algorithm.batch_size={nearby}"
        )
    rounded = -(-config.total_steps // rollout_size) * rollout_size
    if rounded != config.total_steps:
        log.info("algorithm.total_steps=%d is not a multiple of the rollout size %d (n_steps * n_envs); "
                 "training for %d steps", config.total_steps, rollout_size, rounded)
    return rounded


def load_start_checkpoint(input_dir: str) -> Checkpoint:
    """The checkpoint a run starts from: a PPO run continues from its ``last.pt``, anything else from ``best.pt``."""
    checkpoint = load_checkpoint(input_dir)
    last = Path(input_dir) / LAST_CHECKPOINT
    if checkpoint.algorithm == "ppo" and Path(input_dir).is_dir() and last.is_file():
        checkpoint = load_checkpoint(last)
    network_type = checkpoint.model_config.get("network")
    if network_type != PPO.network_type:
        raise MazerunError(
            f"input_dir {input_dir} holds a {network_type} ({checkpoint.algorithm}); PPO fine-tunes an "
            "actor_critic: pass a bc or ppo run, or drop input_dir to train from scratch"
        )
    return checkpoint


def _environment(config: RunConfig, start: Checkpoint | None) -> tuple[str, gym.Space, gym.Space, Vocabulary | None]:
    """The env id, its spaces and the mission vocabulary, checked against the checkpoint started from."""
    explicit = config.env.name
    env_id = resolve_env_id(explicit or (start.env_id if start is not None else DEFAULT_ENV_ID))
    env = make_env(env_id, max_episode_steps=config.runner.max_episode_steps)
    try:
        observation_space, action_space = env.observation_space, env.action_space
        if start is not None:
            _check_action_kind(start, action_space, env_id, config.input_dir)
            env_id = choose_env_id(explicit, start.env_id, f"input_dir {config.input_dir}")
            vocabulary = Vocabulary.from_list(start.vocabulary) if start.vocabulary is not None else None
        elif isinstance(observation_space, gym.spaces.Dict) and "mission" in observation_space.spaces:
            vocabulary = sample_mission_vocabulary(env, config.runner.seed)
        else:
            vocabulary = None
    finally:
        env.close()
    return env_id, observation_space, action_space, vocabulary


def _check_action_kind(start: Checkpoint, action_space: gym.Space, env_id: str, input_dir: str | None) -> None:
    def kind(space: gym.Space) -> str:
        return "discrete" if isinstance(space, gym.spaces.Discrete) else "continuous"

    if kind(start.action_space) != kind(action_space):
        raise MazerunError(
            f"input_dir {input_dir} holds a policy for {kind(start.action_space)} actions ({start.env_id}) and "
            f"{env_id} has {kind(action_space)} actions; clone an expert of {env_id} first, or drop the env override"
        )


def sample_mission_vocabulary(env: gym.Env, seed: int) -> Vocabulary:
    """The words of the missions of a few hundred seeded resets; a word never seen maps to 'unknown'."""
    missions = [env.reset(seed=seed + index)[0]["mission"] for index in range(MISSION_SAMPLES)]
    return Vocabulary.build(missions)


def load_policy_weights(network: ActorCritic, state: dict[str, torch.Tensor]) -> None:
    """Everything of ``state`` but the value function's parameters (normalisation buffers included)."""
    fresh_critic = {
        name: parameter.detach().clone()
        for name, parameter in network.named_parameters()
        if name.startswith(CRITIC_PREFIXES)
    }
    network.load_state_dict({**state, **fresh_critic})


def make_vector_env(env_id: str, n_envs: int, vector: str, max_episode_steps: int | None) -> gym.vector.VectorEnv:
    """``n_envs`` copies of ``env_id`` that reset a finished episode within the step that ends it."""
    thunks = [partial(make_env, env_id, max_episode_steps=max_episode_steps) for _ in range(n_envs)]
    same_step = gym.vector.AutoresetMode.SAME_STEP
    if vector == "async":
        # MiniGrid's mission strings do not fit in shared memory.
        return gym.vector.AsyncVectorEnv(thunks, shared_memory=not is_minigrid(env_id), copy=False,
                                         autoreset_mode=same_step)
    return gym.vector.SyncVectorEnv(thunks, copy=False, autoreset_mode=same_step)


class RolloutBuffer:
    """One rollout as tensors of shape ``(n_steps, n_envs, ...)``, allocated once and overwritten.

    Observations, actions, log-probabilities and values live on the training device; rewards
    and done flags are numpy arrays (written straight from the env) on the CPU.
    """

    def __init__(
        self, n_steps: int, n_envs: int, observation_space: gym.Space, action_space: gym.Space, device: torch.device
    ) -> None:
        self.n_steps, self.n_envs, self.device = n_steps, n_envs, device
        shape = (n_steps, n_envs)
        if isinstance(observation_space, gym.spaces.Dict):
            self.observations: ModelInput = {
                "image": torch.zeros(shape + observation_space["image"].shape, dtype=torch.uint8, device=device),
                "direction": torch.zeros(shape, dtype=torch.long, device=device),
                # Token ids, right-padded; widened when a longer mission comes along.
                "mission": torch.zeros(shape + (1,), dtype=torch.long, device=device),
            }
        else:
            self.observations = torch.zeros(shape + observation_space.shape, device=device)
        if isinstance(action_space, gym.spaces.Discrete):
            self.actions = torch.zeros(shape, dtype=torch.long, device=device)
        else:
            self.actions = torch.zeros(shape + action_space.shape, device=device)
        self.log_probs = torch.zeros(shape, device=device)
        self.values = torch.zeros(shape, device=device)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.dones = np.zeros(shape, dtype=np.float32)

    def store_observations(self, t: int, observations: ModelInput) -> None:
        if not isinstance(observations, dict):
            self.observations[t] = observations
            return
        stored = self.observations
        tokens = observations["mission"]
        width = tokens.shape[1]
        if width > stored["mission"].shape[2]:
            stored["mission"] = torch.nn.functional.pad(stored["mission"], (0, width - stored["mission"].shape[2]))
        stored["image"][t] = observations["image"]
        stored["direction"][t] = observations["direction"]
        stored["mission"][t].zero_()
        stored["mission"][t, :, :width] = tokens

    def batch(self, last_values: torch.Tensor, gamma: float, gae_lambda: float) -> RolloutBatch:
        """The rollout scored with GAE and flattened to ``n_steps * n_envs`` rows."""
        rewards = torch.from_numpy(self.rewards).to(self.device)
        dones = torch.from_numpy(self.dones).to(self.device)
        advantages, returns = compute_gae(rewards, self.values, dones, last_values, gamma, gae_lambda)
        if isinstance(self.observations, dict):
            observations: ModelInput = {key: value.flatten(0, 1) for key, value in self.observations.items()}
        else:
            observations = self.observations.flatten(0, 1)
        return RolloutBatch(
            observations=observations,
            actions=self.actions.flatten(0, 1),
            log_probs=self.log_probs.flatten(),
            values=self.values.flatten(),
            advantages=advantages.flatten(),
            returns=returns.flatten(),
        )


class RolloutCollector:
    """Steps the vector env with the current policy and keeps episode statistics across rollouts."""

    def __init__(
        self,
        envs: gym.vector.VectorEnv,
        network: ActorCritic,
        observation_space: gym.Space,
        vocabulary: Vocabulary | None,
        device: torch.device,
        gamma: float,
        seed: int,
    ) -> None:
        self.envs, self.network = envs, network
        self.observation_space, self.vocabulary, self.device, self.gamma = observation_space, vocabulary, device, gamma
        action_space = envs.single_action_space
        self.bounds = (action_space.low, action_space.high) if isinstance(action_space, gym.spaces.Box) else None
        self.observations, _ = envs.reset(seed=seed)
        self.episode_returns = np.zeros(envs.num_envs)
        self.episode_lengths = np.zeros(envs.num_envs, dtype=np.int64)
        self.finished_returns: list[float] = []
        self.finished_lengths: list[int] = []

    def _tensor(self, observations: Any) -> ModelInput:
        return obs_to_tensor(observations, self.observation_space, self.vocabulary, self.device)

    @torch.no_grad()
    def collect(self, buffer: RolloutBuffer) -> None:
        """Fill ``buffer`` with ``n_steps`` steps of every environment."""
        for t in range(buffer.n_steps):
            observations = self._tensor(self.observations)
            distribution = self.network.distribution(observations)
            actions = distribution.sample()
            buffer.store_observations(t, observations)
            buffer.actions[t] = actions
            buffer.log_probs[t] = distribution.log_prob(actions)
            buffer.values[t] = self.network.value(observations)

            env_actions = actions.cpu().numpy()
            if self.bounds is not None:
                # The env gets actions inside its bounds; the buffer keeps the sample its log-prob belongs to.
                env_actions = np.clip(env_actions, *self.bounds)
            self.observations, rewards, terminated, truncated, infos = self.envs.step(env_actions)
            done = terminated | truncated
            buffer.rewards[t] = rewards
            buffer.dones[t] = done
            self.episode_returns += rewards
            self.episode_lengths += 1
            if done.any():
                self._finish_episodes(buffer.rewards[t], done, truncated & ~terminated, infos)

    def _finish_episodes(self, rewards: np.ndarray, done: np.ndarray, cut: np.ndarray, infos: dict) -> None:
        """Record finished episodes; bootstrap the reward of those cut off by the time limit."""
        finished = np.flatnonzero(done)
        self.finished_returns.extend(self.episode_returns[finished].tolist())
        self.finished_lengths.extend(self.episode_lengths[finished].tolist())
        self.episode_returns[finished] = 0.0
        self.episode_lengths[finished] = 0
        if cut.any():
            indices = np.flatnonzero(cut)
            final_observations = self._tensor(stack_observations([infos["final_obs"][i] for i in indices]))
            rewards[indices] += self.gamma * self.network.value(final_observations).cpu().numpy()

    @torch.no_grad()
    def last_values(self) -> torch.Tensor:
        """Values of the observations the next rollout starts from: GAE's bootstrap for unfinished episodes."""
        return self.network.value(self._tensor(self.observations))

    def episode_metrics(self) -> dict[str, float]:
        """Mean return and length of the episodes finished since the last call (none: empty)."""
        if not self.finished_returns:
            return {}
        metrics = {
            "episode_return": float(np.mean(self.finished_returns)),
            "episode_length": float(np.mean(self.finished_lengths)),
            "episodes": float(len(self.finished_returns)),
        }
        self.finished_returns, self.finished_lengths = [], []
        return metrics


def write_learning_curve(path: Path, history: list[tuple[int, float]], env_id: str) -> None:
    """Evaluation return against env steps, as a PNG written atomically."""
    steps, returns = zip(*history) if history else ((), ())
    plot_curves(path, {"eval mean return": (list(steps), list(returns))}, f"PPO on {env_id}")


def plot_curves(path: Path, curves: dict[str, tuple[list[int], list[float]]], title: str) -> None:
    """Line plots of return against env steps (one per label) with the Agg backend, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (steps, returns) in curves.items():
        axes.plot(steps, returns, marker="o", markersize=3, label=label)
    axes.set_xlabel("environment steps")
    axes.set_ylabel("evaluation return")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    atomic_write_bytes(Path(path), image.getvalue())
