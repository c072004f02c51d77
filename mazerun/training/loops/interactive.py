"""The interactive loop (DAgger): the learner acts in vector envs, an expert beside each copy labels every state.

One iteration steps ``runner.n_envs`` copies ``n_steps`` times. The expert runs inside each
copy (:class:`mazerun.acting.envs.ExpertActions`), so its label of the current state arrives in the
step's ``info`` and the BabyAI bot replans from whatever action was taken. With probability
beta the expert's action is executed (teacher forcing), else the learner's sample. Every
labelled state joins the aggregate (:class:`LabelledStates`); then the policy takes its share
of ``n_updates`` gradient steps on batches drawn from all of it. With ``refit_updates``, once the
last label is in, a network from fresh weights trains on the whole aggregate and is handed over
instead (:meth:`mazerun.algorithms.dagger.DAgger.refit_learner`); the run's last report is its, and with
``refit_eval_every`` its evaluations along the way compete for ``best.pt`` as behavioural cloning's do.

Finished episodes are written to ``trajectory_data/`` as :class:`StateTrajectoryRecord` with
an ``expert_actions`` column, so ``algorithm=bc`` can train on them later. ``last.pt`` is
written at every report and when stopped (between iterations); it holds the aggregate, the
optimiser, the generator and each copy's running episode (and, in the refit, the collecting
network beside the refitted one it saves), so a continued run goes on exactly.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from functools import partial
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch

from mazerun.acting.envs import is_minigrid, make_env
from mazerun.acting.policies import build_expert
from mazerun.acting.vector import VectorSteps
from mazerun.algorithms import build_algorithm
from mazerun.algorithms.protocol import Algorithm
from mazerun.config.schemas import ExpertConfig
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.core.progress import Progress
from mazerun.data.records import NO_LABEL, TRAJECTORY_DIR, EpisodeBuilder, write_record
from mazerun.data.tensors import (
    MISSION_KEY,
    SequenceSampler,
    TransitionBatch,
    TransitionDataset,
    allocate_actions,
    allocate_observations,
    observation_stats,
    store_observations,
)
from mazerun.nn.checkpoint import TRAINING_STATE
from mazerun.nn.models import ModelInput
from mazerun.training.loops.vector import VectorEpisodes, open_vector_env
from mazerun.training.runsetup import RunSetup, TrainResult
from mazerun.training.session import LoopShell

log = logging.getLogger(__name__)


class LabelledStates:
    """Every state the learner visited so far with the expert's label, as tensors of a fixed capacity.

    Rows arrive one env step at a time, ``n_envs`` of them (one per env copy, in copy order), so
    an env copy's consecutive steps lie ``n_envs`` rows apart: that is what lets a network with
    memory train on chunks of them (:meth:`sequences`). States the expert could not label keep
    the ``NO_LABEL`` mark and count for nothing in the loss.
    """

    def __init__(self, capacity: int, observation_space: gym.Space, action_space: gym.Space, stride: int,
                 device: torch.device) -> None:
        self.observations = allocate_observations((capacity,), observation_space, device)
        self.labels = allocate_actions((capacity,), action_space, device)
        self.starts = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.zeros = torch.zeros(capacity, device=device)
        self.stride = stride
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, observations: ModelInput, labels: torch.Tensor, starts: torch.Tensor) -> None:
        rows = slice(self.size, self.size + len(labels))
        self.observations = store_observations(self.observations, rows, observations)
        self.labels[rows] = labels
        self.starts[rows] = starts
        self.size += len(labels)

    def share_beyond(self, steps: int) -> float:
        """The share of the labelled states that lie ``steps`` or more steps into their episode (0 when empty)."""
        if self.size == 0:
            return 0.0
        starts = self.starts[: self.size].view(-1, self.stride).cpu()  # (steps of each copy, copies)
        index = torch.arange(len(starts))[:, None].expand_as(starts)
        last_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values
        return float(((index - last_start) >= steps).double().mean())

    def sample(self, batch_size: int, generator: torch.Generator) -> TransitionBatch:
        return self.rows(torch.randint(self.size, (batch_size,), generator=generator, device=self.labels.device))

    def rows(self, index: torch.Tensor) -> TransitionBatch:
        """The labelled states at ``index``."""
        labels = self.labels.index_select(0, index)
        return TransitionBatch(_rows(self.observations, index), labels, None, None, None, expert_actions=labels)

    def sequences(self, config: Any, generator: torch.Generator) -> SequenceSampler:
        """A sampler of chunks of each env copy's consecutive steps (networks with memory)."""
        size = self.size
        observations = _rows(self.observations, slice(0, size))
        view = TransitionDataset(observations, self.labels[:size], self.zeros[:size], observations, self.zeros[:size],
                                 episode_ids=self.zeros[:size].long(), expert_actions=self.labels[:size])
        return SequenceSampler(view, config.rollout_len, config.nrollouts, config.burn_in, seed=0, stride=self.stride,
                               starts=self.starts[:size], generator=generator)

    def state(self) -> dict[str, Any]:
        """The filled rows only, on the CPU, for ``last.pt``."""
        return {"observations": _to_cpu(_rows(self.observations, slice(0, self.size))),
                "labels": self.labels[: self.size].cpu(), "starts": self.starts[: self.size].cpu()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.size = 0
        device = self.labels.device
        self.add(_to(state["observations"], device), state["labels"].to(device), state["starts"].to(device))


def _rows(observations: ModelInput, index: Any) -> ModelInput:
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def _to_cpu(observations: ModelInput) -> ModelInput:
    return _to(observations, torch.device("cpu"))


def _to(observations: ModelInput, device: torch.device) -> ModelInput:
    if isinstance(observations, dict):
        return {key: value.to(device) for key, value in observations.items()}
    return observations.to(device)


def _copy_row(observations: Any, index: int) -> Any:
    """Env copy ``index``'s observation out of a batched one (whose buffers the vector env reuses)."""
    if isinstance(observations, dict):
        return {key: value[index] if key == MISSION_KEY else np.array(value[index]) for key, value in observations.items()}
    return np.array(observations[index])


def _labelled(labels: np.ndarray) -> np.ndarray:
    """Which envs' current states the expert labelled."""
    if labels.ndim == 1:
        return labels != NO_LABEL
    return ~np.isnan(labels).any(axis=-1)


def train_interactive(setup: RunSetup) -> TrainResult:
    """DAgger as the setup says: collect labels with teacher forcing, train on the aggregate, evaluate."""
    config = setup.algorithm
    runner, device = setup.runner, setup.device
    expert_config = setup.expert or ExpertConfig()
    probe = make_env(setup.env_id, max_episode_steps=runner.max_episode_steps)
    try:
        expert_name = build_expert(expert_config, setup.env_id, probe).name  # a bad expert fails before any env runs
    finally:
        probe.close()
    steps_per_copy = config.total_steps // runner.n_envs
    # burn-in needs no rows of its own: before a copy's first row it repeats that row, an episode start
    if setup.model_config.recurrent and steps_per_copy < config.rollout_len:
        raise MazerunError(
            f"algorithm.rollout_len={config.rollout_len} steps of one env copy make a chunk, but "
            f"algorithm.total_steps={config.total_steps} over runner.n_envs={runner.n_envs} copies labels "
            f"{steps_per_copy} each: nothing could train; raise algorithm.total_steps or lower algorithm.rollout_len")
    generator = torch.Generator(device=device)
    generator.manual_seed(setup.seed)
    algorithm = build_algorithm(config, setup.spec)
    network = algorithm.network
    aggregate = LabelledStates(config.total_steps + runner.n_envs * config.n_steps, setup.observation_space,
                               setup.action_space, runner.n_envs, device)
    beta = config.beta()
    start = setup.start
    state = None
    records_written = 0
    refit_state = None
    if start is not None:
        state = start.checkpoint.extra[TRAINING_STATE] if start.continuing else None
        saved_refit = state.get("refit") if state else None
        # In the refit the checkpoint's network is the refitted one; the collecting network travels beside it.
        algorithm.load_network_state(saved_refit["collector"] if saved_refit else start.checkpoint.model_state)
        if saved_refit is not None and start.step >= config.total_steps:  # a raised budget collects, then refits anew
            refit_state = saved_refit
        if state is not None:
            records_written = int(state["records_written"])
            algorithm.load_training_state(state["algorithm"], start.step)
            generator.set_state(state["generator"])
            aggregate.load_state(state["aggregate"])
        else:
            log.info("DAgger starts from the %s policy of %s", start.checkpoint.algorithm, start.checkpoint.path)
    # A policy learnt here standardises with the aggregate's statistics; a clone it starts from keeps its own.
    normalise = (start is None or start.continuing) and not isinstance(setup.observation_space, gym.spaces.Dict)
    window = ReportWindow.from_state(state["window"] if state else None)
    envs = open_vector_env(setup, make_expert=partial(build_expert, expert_config, setup.env_id))
    try:
        collector = LabelCollector(envs, network, setup, aggregate, generator, greedy=config.learner_actions == "greedy",
                                   takeover=config.expert_takes_over, state=None if state is None else state["envs"])
        episodes = collector.episodes
        recorder = EpisodeRecorder(setup, episodes, f"dagger:{expert_name}", records_written)
        collector.recorder = recorder

        def training_state() -> dict[str, Any]:
            refitting = None
            if refit is not None:
                refitting = {"algorithm": refit.training_state(),
                             "collector": {name: value.detach().cpu() for name, value in network.state_dict().items()}}
            return {
                "algorithm": algorithm.training_state(), "generator": generator.get_state(),
                "aggregate": aggregate.state(), "envs": collector.state(), "records_written": recorder.written,
                "window": window.state(), "next_report": next_report, "refit": refitting,
                "unfinished": algorithm.updates < config.n_updates or refit_owed(),
            }

        def refit_owed() -> bool:
            return config.refit_updates > 0 and (refit is None or refit.updates < config.refit_updates)

        def begin_refit(continuing: bool = False) -> Any:
            """The refit's learner (``DAgger.refit_learner``), whose network the shell evaluates and saves from now on."""
            warmable = config.burn_in > 0 and setup.model_config.recurrent
            deep = aggregate.share_beyond(config.rollout_len) if warmable else 0.0
            learner = algorithm.refit_learner(setup.seed, deep)
            if warmable:
                log.info("refit: %.0f%% of the labels lie %d or more steps into their episode, so its chunks are %s",
                         100 * deep, config.rollout_len,
                         f"warmed by {config.burn_in} steps" if learner.config.burn_in else "not warmed")
            shell.hand_over(learner.network, continuing=continuing)
            return learner

        refit: Any = None  # the refit's learner, once the last label is in
        shell = LoopShell(setup, algorithm, algorithm.selection_metric(False), training_state)
        if refit_state is not None:
            refit = begin_refit(continuing=True)
            refit.load_network_state(start.checkpoint.model_state)
            refit.load_training_state(refit_state["algorithm"], start.step)

        def report(learner: Algorithm) -> None:
            metrics = window.means()
            shell.check_finite(metrics)
            metrics.update(labels=float(len(aggregate)), **learner.report_metrics())
            shell.log(episodes.episode_metrics(is_minigrid(setup.env_id)), "rollout")
            shell.log(metrics, "train")
            shell.evaluate()

        def owed_batches() -> Callable[[], Any] | None:
            """Draws for the updates the labels so far are owed; None when none are owed (or none can be drawn yet)."""
            if algorithm.updates >= due_updates(config, shell.step):
                return None
            return _batches(aggregate, config, generator, setup.model_config.recurrent)

        def check_fast_path(learner: Algorithm) -> None:
            """Hold the learner's fast path against autograd on the first rows: no draw, the batches stay seeded."""
            if setup.model_config.recurrent:  # chunks for a network with memory have no fast path
                return
            first = torch.arange(min(config.batch_size, len(aggregate)), device=aggregate.labels.device)
            problem = learner.check_fast_path(aggregate.rows(first))
            if problem is not None:
                log.warning(problem)

        def pay_updates(batches: Callable[[], Any], updates_bar: Progress) -> None:
            """The owed gradient steps, each after a stop check: a phase can take minutes (recurrent networks)."""
            nonlocal fast_path_checked
            if not fast_path_checked:  # the first labels this process trains on
                fast_path_checked = True
                check_fast_path(algorithm)
            due = due_updates(config, shell.step)
            while algorithm.updates < due:
                interrupts.check()
                batch = batches()
                window.add_update(algorithm.learn(batch))
                updates_bar.update()

        def refit_evaluation_due() -> bool:
            """Every ``refit_eval_every`` refit updates but the last, whose evaluation is the run's last report."""
            every = config.refit_eval_every
            return every > 0 and refit.updates % every == 0 and refit.updates < config.refit_updates

        def refit_on_the_aggregate() -> None:
            """A network from fresh weights trains on every label, is handed over, and makes the last report."""
            nonlocal refit
            if refit is None:
                refit = begin_refit()
                if not isinstance(setup.observation_space, gym.spaces.Dict):  # a policy learnt here: the labels' statistics
                    refit.set_normalization(*observation_stats(aggregate.observations[: len(aggregate)]))
                log.info("refit: a network from fresh weights trains %d updates on all %d labels",
                         config.refit_updates, len(aggregate))
            check_fast_path(refit)
            batches = _batches(aggregate, refit.config, generator, setup.model_config.recurrent)
            with Progress(config.refit_updates, initial=refit.updates, unit="update", desc="refit updates",
                          leave=False) as refit_bar:
                while refit.updates < config.refit_updates:
                    interrupts.check()
                    window.add_update(refit.learn(batches()))
                    refit_bar.update()
                    if refit_evaluation_due():
                        shell.evaluate(logged_as=("refit_eval", refit.updates))
            report(refit)
            shell.save_last()

        fast_path_checked = False
        log.info("DAgger on %s with the %s expert: %d env copies, %d steps each per iteration; %d labels, "
                 "%d updates", setup.env_id, expert_name, runner.n_envs, config.n_steps, config.total_steps,
                 config.n_updates)
        # A continued run reports where the stopped one would have: a stop between the labels and their
        # updates leaves that iteration's report to come.
        first_report = _next_report(config, shell.step)
        next_report = state.get("next_report", first_report) if state else first_report
        with shell.running(config.total_steps), \
                Progress(config.n_updates, initial=algorithm.updates, unit="update", desc=f"{config.name} updates",
                         leave=False) as updates_bar:
            while shell.step < config.total_steps or owed_batches() is not None:
                interrupts.check()
                batches = owed_batches()
                if batches is None:  # the labels so far are trained on: collect more, up to the label budget
                    for _ in range(min(config.n_steps, -(-(config.total_steps - shell.step) // runner.n_envs))):
                        window.add_step(collector.step(beta(shell.step)))
                        shell.advance(runner.n_envs)
                    if normalise and len(aggregate):  # follow the aggregate: early states alone would mis-scale later ones
                        algorithm.set_normalization(*observation_stats(aggregate.observations[: len(aggregate)]))
                    batches = owed_batches()
                if batches is not None:
                    pay_updates(batches, updates_bar)
                labelled_all = shell.step >= config.total_steps
                # The report after the last labels is the refit's, where there is one.
                if (not config.refit_updates) if labelled_all else shell.step >= next_report:
                    report(algorithm)
                    window = ReportWindow()
                    next_report = _next_report(config, shell.step)
                    shell.save_last()
            if refit_owed():
                refit_on_the_aggregate()
    finally:
        envs.close()
    log.info("done: %d labelled steps, %d updates; %d episodes recorded to %s", shell.step, algorithm.updates,
             recorder.written, recorder.directory)
    return shell.finish()


def due_updates(config: Any, step: int) -> int:
    """Gradient steps owed once ``step`` labels are in: ``n_updates`` spread in proportion to the labels."""
    return round(config.n_updates * min(step, config.total_steps) / config.total_steps)


def _next_report(config: Any, step: int) -> int:
    return (step // config.eval_every + 1) * config.eval_every


def _batches(aggregate: LabelledStates, config: Any, generator: torch.Generator,
             recurrent: bool) -> Callable[[], Any] | None:
    """Draws from the aggregate: transitions, or chunks of consecutive steps for a network with memory.

    None while the aggregate is too short for one chunk; the updates it owes are taken later.
    """
    if not recurrent:
        return partial(aggregate.sample, config.batch_size, generator)
    sequences = aggregate.sequences(config, generator)
    return sequences.sample if len(sequences) else None


class LabelCollector:
    """Steps the vector env: the expert labels each state, teacher forcing picks who acts, the aggregate grows.

    A learner with memory acts from one state per env copy, restarted where an episode starts;
    that state travels in ``last.pt`` with the env copies' running episodes, as does which copies the
    expert has taken over (``takeover``: from the learner's first executed mistake to the episode's end).
    """

    recorder: EpisodeRecorder

    def __init__(self, envs: VectorSteps, network: torch.nn.Module, setup: RunSetup,
                 aggregate: LabelledStates, generator: torch.Generator, greedy: bool, takeover: bool,
                 state: dict[str, Any] | None) -> None:
        self.network, self.aggregate, self.generator, self.greedy = network, aggregate, generator, greedy
        self.takeover = takeover
        device = setup.device
        self.episodes = VectorEpisodes(envs, setup.observation_space, setup.vocabulary, device, state)
        self.memory = network.initial_state(envs.num_envs, device)
        self.starts = torch.ones(envs.num_envs, dtype=torch.bool, device=device)
        self.taken_over = np.zeros(envs.num_envs, dtype=bool)
        if state is not None:
            self.memory, self.starts = state["memory"].to(device), state["starts"].to(device)
            if "taken_over" in state:  # absent from a last.pt written before the takeover existed
                self.taken_over = state["taken_over"].numpy().astype(bool)

    def state(self) -> dict[str, Any]:
        return {**self.episodes.state(), "memory": self.memory.cpu(), "starts": self.starts.cpu(),
                "taken_over": torch.as_tensor(self.taken_over)}

    @torch.no_grad()
    def step(self, beta: float) -> dict[str, float]:
        """One step of every env copy: label, choose who acts, step, record; returns the step's metrics."""
        episodes, device = self.episodes, self.generator.device
        observations = episodes.tensor(episodes.observations)
        labels = np.array(episodes.infos["expert_action"])  # a copy: the step below overwrites the shared array
        valid = _labelled(labels)
        learner, self.memory = self.network.act_step(observations, self.memory, self.starts, self.greedy,
                                                     self.generator)
        learner = learner.cpu().numpy()
        forced = torch.rand(len(labels), generator=self.generator, device=device).cpu().numpy() < beta
        forced |= self.taken_over
        executes_expert = (forced & valid).reshape((-1,) + (1,) * (learner.ndim - 1))
        actions = np.where(executes_expert, labels, learner).astype(learner.dtype)
        self.aggregate.add(observations, torch.as_tensor(labels, device=device), self.starts)
        metrics = {"beta": beta}
        if valid.any():
            if learner.ndim == 1:
                metrics["expert_agreement"] = float(np.mean(learner[valid] == labels[valid]))
            else:
                metrics["action_error"] = float(np.mean(np.linalg.norm(learner[valid] - labels[valid], axis=-1)))
        if self.takeover:  # discrete actions (DAggerConfig.check_spaces): a mistake is an action other than the label
            self.taken_over |= valid & (actions != labels)
            metrics["expert_driving"] = float(np.mean(self.taken_over))  # share of copies the expert now drives
        rewards, terminated, truncated, infos = episodes.step(actions)
        self.recorder.add(actions, rewards, terminated, truncated, infos, labels)
        self.starts = torch.as_tensor(terminated | truncated, device=device)
        self.taken_over &= ~(terminated | truncated)
        return metrics


class ReportWindow:
    """Means over a report window: per update (losses) and per env step (beta, agreement)."""

    def __init__(self, sums: dict[str, float] | None = None, counts: dict[str, int] | None = None) -> None:
        self.sums: dict[str, float] = defaultdict(float, sums or {})
        self.counts: dict[str, int] = defaultdict(int, counts or {})

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> ReportWindow:
        return cls() if state is None else cls(state["sums"], state["counts"])

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def add_update(self, metrics: dict[str, torch.Tensor]) -> None:
        self._add({name: float(value) for name, value in metrics.items()})

    def add_step(self, metrics: dict[str, float]) -> None:
        self._add(metrics)

    def _add(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.sums[name] += value
            self.counts[name] += 1

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}


class EpisodeRecorder:
    """Builds each env copy's episode step by step and writes it, with the expert's labels, when it ends."""

    def __init__(self, setup: RunSetup, episodes: VectorEpisodes, policy: str, written: int) -> None:
        self.setup, self.episodes, self.policy, self.written = setup, episodes, policy, written
        self.directory = setup.run_dir / TRAJECTORY_DIR
        n_envs = episodes.envs.num_envs
        replayed = getattr(episodes, "replayed", None)
        self.episode_index = list(episodes.state()["episodes"])
        if replayed is None:
            self.builders = [EpisodeBuilder(_copy_row(episodes.observations, i)) for i in range(n_envs)]
            return
        self.builders = []
        for observations, actions, rewards, infos in replayed:
            builder = EpisodeBuilder(observations[0])
            for t, action in enumerate(actions):
                builder.add(action.item() if action.ndim == 0 else action, rewards[t], observations[t + 1],
                            infos[t]["expert_action"])
            self.builders.append(builder)

    def add(self, actions: np.ndarray, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
            infos: dict, labels: np.ndarray) -> None:
        observations = self.episodes.observations
        for i, builder in enumerate(self.builders):
            done = bool(terminated[i] or truncated[i])
            next_observation = infos["final_obs"][i] if done else _copy_row(observations, i)
            action = actions[i].item() if actions.ndim == 1 else np.array(actions[i])
            builder.add(action, float(rewards[i]), next_observation, labels[i].item() if labels.ndim == 1 else labels[i])
            if done:
                self._write(builder, i, bool(terminated[i]), bool(truncated[i]))
                self.builders[i] = EpisodeBuilder(_copy_row(observations, i))

    def _write(self, builder: EpisodeBuilder, env_index: int, terminated: bool, truncated: bool) -> None:
        runner = self.setup.runner
        seed = runner.seed + env_index + self.episode_index[env_index] * runner.n_envs
        record = builder.build(terminated=terminated, truncated=truncated, env_id=self.setup.env_id, seed=seed,
                               policy=self.policy)
        write_record(record, self.directory, self.written)
        self.written += 1
        self.episode_index[env_index] += 1
