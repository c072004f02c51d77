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
* a BC, DAgger or IQL run (any actor-critic): fine-tune its policy in its env, with its
  vocabulary, model config and observation statistics; the value function starts fresh, and
  ``algorithm.critic_burn_in_epochs`` iterations may train it alone before the policy moves;
* a PPO run: continue it from its ``last.pt``. ``last.pt`` is written after every iteration
  with the optimiser, the schedules, the generator that samples actions and shuffles
  minibatches, and each env copy's running episode (replayed on resume), so the continued
  run is the run that was never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch

from mazerun.acting.vector import VectorSteps, observation_rows, stack_observations
from mazerun.algorithms import build_algorithm
from mazerun.algorithms.rollouts import RolloutBatch, compute_gae
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.data.tensors import (
    BatchSampler,
    SequenceSampler,
    TransitionDataset,
    allocate_actions,
    allocate_observations,
    longest_episode,
    records_to_dataset,
    store_observations,
)
from mazerun.fast.array_actor import ArrayActor
from mazerun.fast.fused import FusedActorCritic
from mazerun.nn.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, TRAINING_STATE
from mazerun.nn.models import ActorCritic, ModelInput, Vocabulary, sample_with_noise
from mazerun.training.loops.vector import VectorEpisodes, open_vector_env
from mazerun.training.runsetup import RunSetup, TrainResult
from mazerun.training.session import LoopShell

log = logging.getLogger(__name__)

SELECTION_METRIC = "eval/mean_return"
DEMONSTRATION_CHUNK = 32
"""Steps per chunk of demonstrations for the imitation term of a network with memory."""
FINITE_METRICS = ("policy_loss", "value_loss", "entropy", "imitation_loss", "approx_kl")
"""Losses that must stay finite; anything else (explained variance of a constant return) may be NaN."""


def train_on_policy(setup: RunSetup) -> TrainResult:
    """Train the setup's on-policy algorithm (PPO); writes best.pt, last.pt, metrics and the learning curve."""
    config = setup.algorithm
    runner = setup.runner
    rollout_size = config.n_steps * runner.n_envs
    total_steps = checked_total_steps(config, runner.n_envs, setup.prefix, setup.model_config.recurrent)
    setup.algorithm = config = dataclasses.replace(config, total_steps=total_steps)
    setup.budget_reached()
    device = setup.device
    generator = torch.Generator(device=device)
    generator.manual_seed(setup.seed)
    algorithm = build_algorithm(config, setup.spec, generator)
    network = algorithm.network

    start = setup.start
    iteration, state = 0, None
    if start is None:
        log.info("training %s from scratch on %s", config.name, setup.env_id)
    elif start.continuing:
        network.load_state_dict(start.checkpoint.model_state)
        state = start.checkpoint.extra[TRAINING_STATE]
        iteration = int(state["iteration"])
        algorithm.load_training_state({"updates": iteration, **state["algorithm"]}, start.step)
        generator.set_state(state["generator"])
    else:
        load_policy_weights(network, start.checkpoint.model_state)
        log.info("fine-tuning the %s policy of %s; the value function starts fresh", start.checkpoint.algorithm,
                 start.checkpoint.path)
    if iteration < config.critic_burn_in_epochs:
        log.info("critic burn-in: iterations %d to %d train the value function only, the policy frozen",
                 iteration + 1, config.critic_burn_in_epochs)
    demonstrations = None
    if setup.records is not None:
        demo_sampler = demonstration_sampler(records_to_dataset(setup.records, setup.vocabulary).to(device), setup)
        if state is not None:
            demo_sampler.generator.set_state(state["demonstrations"])
        algorithm.demonstrations = demonstrations = demo_sampler.sample
        log.info("imitation: %d recorded transitions beside every minibatch, coefficient %g",
                 len(demo_sampler.dataset), config.imitation_coef)

    buffer = RolloutBuffer(config.n_steps, runner.n_envs, setup.observation_space, setup.action_space, device,
                           state_size=network.state_size)
    envs = open_vector_env(setup)
    try:
        collector = RolloutCollector(envs, network, setup.observation_space, setup.vocabulary, device, config.gamma,
                                     generator, state=None if state is None else state["envs"], fused=algorithm.fast_actor)

        def training_state() -> dict[str, Any]:
            return {
                "iteration": iteration, "algorithm": algorithm.training_state(), "generator": generator.get_state(),
                "envs": collector.state(),
                **({"demonstrations": demo_sampler.generator.get_state()} if demonstrations is not None else {}),
            }

        shell = LoopShell(setup, algorithm, (SELECTION_METRIC, "max"), training_state)

        def evaluate() -> None:
            bar.set_postfix(eval_return=f"{shell.evaluate()['mean_return']:.1f}")

        # last.pt is saved after every iteration: a stop inside one (mid-rollout) keeps that one
        with shell.running(total_steps, save_on_stop=False) as bar:
            log.info("%d copies of %s ready to step", runner.n_envs, setup.env_id)
            if not setup.continuing:  # a continued run was evaluated where the last one stopped
                evaluate()
                shell.save_last()
            next_evaluation = (shell.step // config.eval_every + 1) * config.eval_every
            fast_path_checked = False
            while shell.step < total_steps:
                started = time.perf_counter()
                scheduled = algorithm.set_progress(shell.step)
                collector.collect(buffer)
                collected = time.perf_counter()
                batch = buffer.batch(collector.last_values(), config.gamma, config.gae_lambda)
                if not fast_path_checked:  # this process's first rollout
                    fast_path_checked = True
                    problem = algorithm.check_fast_path(batch)
                    if problem is not None:
                        log.warning(problem)
                metrics = algorithm.learn(batch)
                updated = time.perf_counter()
                shell.advance(rollout_size)
                iteration += 1
                shell.check_finite(metrics, FINITE_METRICS)
                metrics.update(scheduled, sps=rollout_size / (updated - started), rollout_seconds=collected - started,
                               update_seconds=updated - collected)
                shell.log(collector.episodes.episode_metrics(), "rollout")
                shell.log(metrics, "train")
                if shell.step >= next_evaluation or shell.step >= total_steps:
                    evaluate()
                    next_evaluation = (shell.step // config.eval_every + 1) * config.eval_every
                shell.save_last()
    finally:
        envs.close()
    log.info("done: %d steps in %d iterations; best %s=%.4g; checkpoints %s and %s in %s", shell.step, iteration,
             shell.keeper.tracker.metric, shell.keeper.tracker.best, BEST_CHECKPOINT, LAST_CHECKPOINT, setup.run_dir)
    return shell.finish()


def demonstration_sampler(data: TransitionDataset, setup: RunSetup) -> BatchSampler | SequenceSampler:
    """``imitation_batch_size`` demonstrated steps per draw: transitions, or chunks for a network with memory."""
    size = setup.algorithm.imitation_batch_size
    if not setup.model_config.recurrent:
        return BatchSampler(data, size, seed=setup.seed)
    rollout_len = min(DEMONSTRATION_CHUNK, longest_episode(data), size)
    return SequenceSampler(data, rollout_len, max(1, size // rollout_len), burn_in=0, seed=setup.seed)


def checked_total_steps(config: Any, n_envs: int, prefix: str = "algorithm", recurrent: bool = False) -> int:
    """``total_steps`` rounded up to whole rollouts; the minibatch size must split a rollout evenly.

    With memory a minibatch is whole env sequences, so ``batch_size`` must be ``n_steps`` times a
    number of envs that divides ``n_envs``; one that is not becomes the nearest such size, said in
    one line (the user cannot know it in advance: the tuned and the default n_steps differ per env).
    """
    rollout_size = config.n_steps * n_envs
    if recurrent:
        config.batch_size = whole_sequence_batch_size(config.batch_size, config.n_steps, n_envs, prefix)
    if rollout_size % config.batch_size:
        divisors = [size for size in range(1, rollout_size + 1) if rollout_size % size == 0]
        below = max(size for size in divisors if size < config.batch_size)
        above = min((size for size in divisors if size > config.batch_size), default=None)
        nearby = f"{below} or {above}" if above is not None else str(below)
        raise MazerunError(
            f"{prefix}.batch_size={config.batch_size} does not divide the rollout of n_steps * n_envs = "
            f"{config.n_steps} * {n_envs} = {rollout_size} steps; use {prefix}.batch_size={nearby}"
        )
    rounded = -(-config.total_steps // rollout_size) * rollout_size
    if rounded != config.total_steps:
        log.info("%s.total_steps=%d is not a multiple of the rollout size %d (n_steps * n_envs); "
                 "training for %d steps", prefix, config.total_steps, rollout_size, rounded)
    return rounded


def whole_sequence_batch_size(batch_size: int, n_steps: int, n_envs: int, prefix: str = "algorithm") -> int:
    """The size ``n_steps * k`` (``k`` a divisor of ``n_envs``) nearest to ``batch_size``; the smaller on a tie."""
    fits = [count * n_steps for count in range(1, n_envs + 1) if n_envs % count == 0]
    nearest = min(fits, key=lambda size: (abs(size - batch_size), size))
    if nearest != batch_size:
        log.info("%s.batch_size=%d becomes %d: with model.memory a minibatch is whole env sequences, n_steps=%d "
                 "times a divisor of runner.n_envs=%d", prefix, batch_size, nearest, n_steps, n_envs)
    return nearest


def load_policy_weights(network: ActorCritic, state: dict[str, torch.Tensor]) -> None:
    """Everything of ``state`` but the value function's parameters (normalisation buffers included)."""
    acting = {id(parameter) for parameter in network.actor_parameters()}
    fresh_critic = {
        name: parameter.detach().clone()
        for name, parameter in network.named_parameters()
        if id(parameter) not in acting
    }
    network.load_state_dict({**state, **fresh_critic})


class RolloutBuffer:
    """One rollout as tensors of shape ``(n_steps, n_envs, ...)``, allocated once and overwritten.

    Observations, actions, log-probabilities and values live on the training device; rewards
    and done flags are numpy arrays (written straight from the env) on the CPU. For a network
    with memory the buffer also keeps which steps begin an episode and each env's state when
    the rollout began, so the update can replay whole env sequences.
    """

    def __init__(
        self, n_steps: int, n_envs: int, observation_space: gym.Space, action_space: gym.Space, device: torch.device,
        state_size: int = 0,
    ) -> None:
        self.n_steps, self.n_envs, self.device = n_steps, n_envs, device
        shape = (n_steps, n_envs)
        self.observations = allocate_observations(shape, observation_space, device)
        self.actions = allocate_actions(shape, action_space, device)
        self.log_probs = torch.zeros(shape, device=device)
        self.values = torch.zeros(shape, device=device)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.dones = np.zeros(shape, dtype=np.float32)
        self.recurrent = state_size > 0
        self.starts = torch.zeros(shape, dtype=torch.bool, device=device) if self.recurrent else None
        self.initial_state = torch.zeros(n_envs, state_size, device=device) if self.recurrent else None

    def store_observations(self, t: int, observations: ModelInput) -> None:
        self.observations = store_observations(self.observations, t, observations)

    def batch(self, last_values: torch.Tensor, gamma: float, gae_lambda: float) -> RolloutBatch:
        """The rollout scored with GAE, flattened to ``n_steps * n_envs`` rows unless the network has memory."""
        rewards = torch.from_numpy(self.rewards).to(self.device)
        dones = torch.from_numpy(self.dones).to(self.device)
        advantages, returns = compute_gae(rewards, self.values, dones, last_values, gamma, gae_lambda)
        if self.recurrent:
            return RolloutBatch(self.observations, self.actions, self.log_probs, self.values, advantages, returns,
                                starts=self.starts, initial_state=self.initial_state)
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


class _ArrayViews(NamedTuple):
    """Numpy views of a CPU :class:`RolloutBuffer`'s tensors, which the numpy actor writes into."""

    observations: np.ndarray
    actions: np.ndarray
    log_probs: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, buffer: RolloutBuffer) -> _ArrayViews:
        return cls(buffer.observations.numpy(), buffer.actions.numpy(), buffer.log_probs.numpy(), buffer.values.numpy())


class RolloutCollector:
    """Steps the vector env with the current policy, sampling actions with noise from the loop's generator.

    The policy acts on the env copies half by half: on half A, whose actions go off to be
    stepped, then on half B while A steps (in a worker process, where the mode has one). A
    rollout draws all its noise at once, a number per copy and step (:meth:`_draw_noise`), so a
    seed gives the same rollout whichever rows the halves hold and whichever mode steps them.

    A network with memory is stepped from one state per env copy, restarted where an episode
    starts; that state and the start flags travel in ``last.pt`` with the envs' episodes. With
    ``fused`` (the learner's view of the same network) on the CPU, actor and critic act in numpy
    (:class:`mazerun.fast.array_actor.ArrayActor`) on the env's own arrays.
    """

    def __init__(
        self,
        envs: VectorSteps,
        network: ActorCritic,
        observation_space: gym.Space,
        vocabulary: Vocabulary | None,
        device: torch.device,
        gamma: float,
        generator: torch.Generator,
        state: dict[str, Any] | None = None,
        fused: FusedActorCritic | None = None,
    ) -> None:
        self.network, self.gamma, self.generator = network, gamma, generator
        action_space = envs.single_action_space
        self.bounds = (action_space.low, action_space.high) if isinstance(action_space, gym.spaces.Box) else None
        self.noise_shape = () if self.bounds is None else action_space.shape
        self.array_actor = ArrayActor(fused) if fused is not None and device.type == "cpu" else None
        self.episodes = VectorEpisodes(envs, observation_space, vocabulary, device, state)
        self.memory = network.initial_state(envs.num_envs, device)
        self.starts = torch.ones(envs.num_envs, dtype=torch.bool, device=device)
        if state is not None and network.recurrent:
            self.memory, self.starts = state["memory"].to(device), state["starts"].to(device)

    def state(self) -> dict[str, Any]:
        state = self.episodes.state()
        if self.network.recurrent:
            state.update(memory=self.memory.cpu(), starts=self.starts.cpu())
        return state

    @torch.no_grad()
    def collect(self, buffer: RolloutBuffer) -> None:
        """Fill ``buffer`` with ``n_steps`` steps of every environment."""
        halves = self.episodes.halves
        if buffer.recurrent:
            buffer.initial_state.copy_(self.memory)
        noise = self._draw_noise(buffer.n_steps)
        act = self._act if self.array_actor is None else partial(self._act_in_arrays, _ArrayViews.of(buffer))
        for t in range(buffer.n_steps):
            interrupts.check()
            for half, rows in enumerate(halves):
                if t:
                    self._receive(buffer, t - 1, half, rows)
                act(buffer, t, half, rows, noise[t, rows])
        for half, rows in enumerate(halves):
            self._receive(buffer, buffer.n_steps - 1, half, rows)

    def _draw_noise(self, n_steps: int) -> torch.Tensor | np.ndarray:
        """The rollout's randomness in one draw: a uniform in ``[0, 1)`` per copy and step for discrete actions, a
        standard normal per action dimension for continuous ones (:func:`mazerun.nn.models.sample_with_noise`)."""
        draw = torch.rand if self.bounds is None else torch.randn
        shape = (n_steps, self.episodes.envs.num_envs, *self.noise_shape)
        noise = draw(shape, generator=self.generator, device=self.generator.device)
        return noise if self.array_actor is None else noise.numpy()

    def _act(self, buffer: RolloutBuffer, t: int, half: int, rows: slice, noise: torch.Tensor) -> None:
        """Sample the actions of the copies in ``rows`` at step ``t`` and send them off to be stepped."""
        episodes, network = self.episodes, self.network
        observations = episodes.tensor(observation_rows(episodes.observations, rows))
        if buffer.recurrent:
            buffer.starts[t, rows] = self.starts[rows]
            distribution, values, self.memory[rows] = network.step(observations, self.starts[rows], self.memory[rows])
        else:
            distribution, values = network.distribution(observations), network.value(observations)
        actions = sample_with_noise(distribution, noise)
        buffer.store_observations((t, rows), observations)
        buffer.actions[t, rows] = actions
        buffer.log_probs[t, rows] = distribution.log_prob(actions)
        buffer.values[t, rows] = values
        self._send(half, actions.cpu().numpy())

    def _act_in_arrays(self, views: _ArrayViews, buffer: RolloutBuffer, t: int, half: int, rows: slice,
                       noise: np.ndarray) -> None:
        """:meth:`_act` in numpy, on the env's observation arrays and the buffer's memory."""
        observations = self.episodes.observations[rows]
        actions, log_probs, values = self.array_actor.act(observations, noise)
        views.observations[t, rows] = observations
        views.actions[t, rows] = actions
        views.log_probs[t, rows] = log_probs
        views.values[t, rows] = values
        self._send(half, actions)

    def _send(self, half: int, actions: np.ndarray) -> None:
        if self.bounds is not None:
            # The env gets actions inside its bounds; the buffer keeps the sample its log-prob belongs to.
            actions = np.clip(actions, *self.bounds)
        self.episodes.send(half, actions)

    def _receive(self, buffer: RolloutBuffer, t: int, half: int, rows: slice) -> None:
        """The step ``t`` of the copies in ``rows``: rewards, episode ends, and the bootstrap of cut episodes."""
        rewards, terminated, truncated = self.episodes.receive(half)
        buffer.rewards[t, rows] = rewards
        done = terminated | truncated
        buffer.dones[t, rows] = done
        cut = truncated & ~terminated
        if cut.any():
            self._bootstrap_cut_episodes(buffer.rewards[t, rows], np.flatnonzero(cut), rows.start)
        if self.network.recurrent:
            self.starts[rows] = torch.as_tensor(done, device=self.starts.device)

    def _bootstrap_cut_episodes(self, rewards: np.ndarray, cut: np.ndarray, first: int) -> None:
        """Add ``gamma * V(final observation)`` to the reward of episodes cut off by the time limit.

        ``cut`` indexes ``rewards``, the rows of copies ``first`` on. With memory the final
        observation is read from the state the episode's last step left.
        """
        indices = cut + first
        final_observations = self.episodes.infos["final_obs"]
        final_observations = self.episodes.tensor(stack_observations([final_observations[i] for i in indices]))
        if self.network.recurrent:
            critic_states = self.network.split_state(self.memory[torch.as_tensor(indices)])[1]
            values = self.network.next_value(_unsqueeze(final_observations), critic_states[None])[0]
        else:
            values = self.network.value(final_observations)
        rewards[cut] += self.gamma * values.cpu().numpy()

    @torch.no_grad()
    def last_values(self) -> torch.Tensor:
        """Values of the observations the next rollout starts from: GAE's bootstrap for unfinished episodes."""
        observations = self.episodes.tensor(self.episodes.observations)
        if self.network.recurrent:
            return self.network.step(observations, self.starts, self.memory)[1]
        return self.network.value(observations)


def _unsqueeze(observations: ModelInput) -> ModelInput:
    if isinstance(observations, dict):
        return {key: value[None] for key, value in observations.items()}
    return observations[None]
