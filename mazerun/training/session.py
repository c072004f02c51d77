"""The shell every training loop runs its updates in, written once.

The offline, on-policy and interactive loops differ in where their batches come from and when
they report. Around that they do the same things, and :class:`LoopShell` does them:

* the metrics logger (TensorBoard, ``metrics.csv``, console), on the rank that writes;
* ``best.pt`` (the best evaluation so far) and ``last.pt`` (everything a continued run needs),
  through :class:`CheckpointKeeper`;
* evaluation: greedy episodes on the fixed seeds, logged and held against the best;
* a progress bar with periodic log lines;
* stopping cleanly: Ctrl-C, SIGTERM or SIGHUP between two updates saves ``last.pt`` and ends
  with one line that says how to go on; a diverged loss ends with one that says what was kept;
* the learning curve (a PNG, where the loop asks for one) and ``result.json`` at the end.

A loop keeps its counter in ``shell.step`` and says what its resume state is (``training_state``);
it calls :meth:`LoopShell.evaluate`, :meth:`LoopShell.log` and :meth:`LoopShell.save_last` on its
own schedule.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from mazerun.acting.workers import EnvWorkerDied
from mazerun.algorithms.protocol import Algorithm
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.core.progress import Progress
from mazerun.nn.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, TRAINING_STATE, save_checkpoint, snapshot_path
from mazerun.training.distributed import NullLogger
from mazerun.training.metrics import MetricsLogger, write_learning_curve
from mazerun.training.runsetup import RunSetup, TrainResult, model_config_dict

log = logging.getLogger(__name__)


class LoopShell:
    """Logger, checkpoints, evaluation, progress and clean stops around one loop's updates.

    ``training_state`` returns what ``last.pt`` must hold besides the weights for the run to go
    on exactly; ``selection`` is the metric that picks ``best.pt`` and whether higher is better.
    """

    def __init__(self, setup: RunSetup, algorithm: Algorithm, selection: tuple[str, str],
                 training_state: Callable[[], dict[str, Any]]) -> None:
        self.setup, self.network = setup, algorithm.network
        self.keeper = CheckpointKeeper(setup, algorithm.network, algorithm.network_type, selection)
        self.training_state = training_state
        self.step = setup.start.step if setup.continuing else 0
        """The loop's budget counter (updates or env steps); the loop advances it."""
        self.logger: MetricsLogger | NullLogger = NullLogger()
        self.progress: Progress | None = None

    def hand_over(self, network: torch.nn.Module, *, continuing: bool = False) -> None:
        """Evaluate and checkpoint ``network`` from now on (DAgger's refit trains a new one after the last label).

        ``best.pt`` becomes its own from here on: the network handed over is the policy the run delivers, and
        an evaluation of the one before (DAgger's collector, trained as the labels came) that beat it by a
        few episodes' chance would otherwise stay ``best.pt``. ``continuing``: it was handed over before the
        run stopped, so the best so far (restored from ``last.pt``) is already its own.
        """
        self.network = self.keeper.network = network
        if not continuing:
            self.keeper.tracker.best = None

    def advance(self, count: int = 1) -> None:
        """``count`` more units of the budget are done."""
        self.step += count
        self.progress.update(count)

    def log(self, metrics: dict[str, float], group: str) -> None:
        self.logger.log(self.step, metrics, group)

    def evaluate(self, others: dict[str, float] | None = None, *,
                 logged_as: tuple[str, int] | None = None) -> dict[str, float]:
        """Greedy episodes of the network, logged as ``eval``; ``best.pt`` when the selection metric improved.

        ``others`` (``train/...``, ``validation/...``) are candidates for the selection metric too.
        ``logged_as``: the group and step to log under instead, for evaluations off the budget's axis (those
        in DAgger's refit, which spends updates after the last env step); they are candidates all the same.
        """
        evaluation = self.setup.evaluate(self.network)
        group, step = logged_as or ("eval", self.step)
        self.logger.log(step, evaluation, group)
        self.keeper.consider({**(others or {}), **{f"eval/{name}": value for name, value in evaluation.items()}},
                             self.step)
        return evaluation

    def save_last(self) -> None:
        self.keeper.save_last(self.step, self.training_state())

    def check_finite(self, metrics: dict[str, float], names: Sequence[str] | None = None) -> None:
        self.keeper.check_finite(metrics, self.step, names)

    @contextlib.contextmanager
    def running(self, total: int, *, save_on_stop: bool = True, **progress: Any) -> Iterator[Progress]:
        """The loop's body runs inside: logger open, stops made clean, a progress bar of ``total`` units.

        ``save_on_stop``: a stop saves ``last.pt`` first. A loop whose state is only consistent
        where it saved last (mid-rollout it is not) passes False. Afterwards the learning curve is
        drawn from the run's whole history (``learning_curve.svg``).
        """
        setup = self.setup
        writes = setup.world.writes

        def on_stop() -> int:
            if save_on_stop:
                self.save_last()
            return self.step

        logger = (MetricsLogger(setup.run_dir, print_fn=tqdm.write, step_offset=setup.step_offset) if writes
                  else NullLogger())
        progress.setdefault("unit", setup.algorithm.step_unit)
        progress.setdefault("desc", setup.algorithm.name)
        try:
            with logger, self.keeper.stop_cleanly(on_stop), interrupts.deferred(), \
                    Progress(total, initial=self.step, disable=None if writes else True, **progress) as bar:
                self.logger, self.progress = logger, bar
                yield bar
        finally:
            self.logger, self.progress = NullLogger(), None
            if writes:
                with contextlib.suppress(MazerunError):  # a by-product: never hide why the run ended
                    write_learning_curve(setup.run_dir, f"{setup.algorithm.name} on {setup.env_id}",
                                         f"{setup.algorithm.step_unit}s")

    def finish(self) -> TrainResult:
        """The run's result, written to ``result.json`` by the rank that writes."""
        result = self.keeper.result(self.step)
        if self.setup.world.writes:
            result.write()
        return result


class BestTracker:
    """Remembers the best value of the selection metric and says when a new one beats it."""

    def __init__(self, metric: str, mode: str, best: float | None = None) -> None:
        self.metric, self.mode = metric, mode
        self.best = best

    def improved(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best = value
        return better



class CheckpointKeeper:
    """``best.pt`` and ``last.pt`` of one run: what describes the network is fixed here, each save adds the state.

    ``last.pt`` carries the ``training_state`` a continued run needs (optimiser, targets, RNG
    states, counters); ``best.pt`` only the weights of the best evaluation so far.
    """

    def __init__(self, setup: RunSetup, network: torch.nn.Module, network_type: str, selection: tuple[str, str]) -> None:
        self.setup, self.network, self.network_type = setup, network, network_type
        best = None
        if setup.continuing:
            best = setup.start.checkpoint.extra.get("best", {}).get(selection[0])
        self.tracker = BestTracker(*selection, best=best)
        self.last_saved_step: int | None = setup.start.step if setup.continuing else None
        self.last_path = setup.run_dir / LAST_CHECKPOINT
        self.last_saved_path: Path | None = setup.start.checkpoint.path if setup.continuing else None
        """Where ``last_saved_step`` is: the continued run's own checkpoint until this run writes its ``last.pt``."""
        self.best_path = setup.run_dir / BEST_CHECKPOINT

    def _save(self, path: Path, step: int, training_state: dict[str, Any] | None) -> None:
        setup = self.setup
        if not setup.world.writes:
            return  # under torchrun rank 0 alone writes checkpoints
        extra: dict[str, Any] = {
            "step": step, "global_step": setup.step_offset + step, "best": {self.tracker.metric: self.tracker.best},
            "dataset": setup.dataset_sources, "world_size": setup.world.size,
        }
        if training_state is not None:
            extra[TRAINING_STATE] = training_state
        save_checkpoint(
            path,
            model_state={key: value.detach().cpu() for key, value in self.network.state_dict().items()},
            model_config=model_config_dict(setup.model_config, self.network_type),
            observation_space=setup.observation_space,
            action_space=setup.action_space,
            env_id=setup.env_id,
            algorithm=setup.algorithm.name,
            vocabulary=setup.vocabulary.to_list() if setup.vocabulary is not None else None,
            extra=extra,
        )

    def save_last(self, step: int, training_state: dict[str, Any]) -> None:
        self._save(self.last_path, step, training_state)
        self.last_saved_step, self.last_saved_path = step, self.last_path

    def save_snapshot(self, step: int) -> None:
        """The policy as it is now, kept beside the others as ``snapshots/step_<step>.pt`` (weights only)."""
        self._save(snapshot_path(self.setup.run_dir, step), step, None)

    def consider(self, metrics: dict[str, float], step: int) -> bool:
        """Save ``best.pt`` if ``metrics`` beat the best so far."""
        if not self.tracker.improved(metrics):
            return False
        log.info("-> new best model %s=%.4g, saved %s", self.tracker.metric, self.tracker.best, BEST_CHECKPOINT)
        self._save(self.best_path, step, None)
        return True

    def kept(self) -> str:
        """Which checkpoint the run can go on from, for messages."""
        if self.last_saved_path is None:
            return "no checkpoint was written yet"
        return f"{self.last_saved_path} holds {self.setup.algorithm.step_unit} {self.last_saved_step}"

    def result(self, step: int) -> TrainResult:
        setup = self.setup
        return TrainResult(
            run_dir=str(setup.run_dir), algorithm=setup.algorithm.name, metric=self.tracker.metric,
            mode=self.tracker.mode, best=self.tracker.best, step=step, global_step=setup.step_offset + step,
            env_id=setup.env_id,
        )

    @contextlib.contextmanager
    def stop_cleanly(self, on_stop: Callable[[], int]) -> Iterator[None]:
        """Turn Ctrl-C (and SIGTERM/SIGHUP, which the CLI raises as Ctrl-C) into a message that says how to go on.

        A dead env worker ends the run too: its one line says which checkpoint the run goes on from.

        ``on_stop`` saves what can be saved consistently and returns the step the run reached.
        """
        try:
            yield
        except EnvWorkerDied as error:
            raise MazerunError(f"{error}; {self.kept()} (continue with input_dir={self.setup.continue_hint})") from None
        except KeyboardInterrupt as interrupt:
            reached = on_stop()
            reason = str(interrupt) or "stopped"
            unit = self.setup.algorithm.step_unit
            message = f"{reason} at {unit} {reached}; {self.kept()} (continue with input_dir={self.setup.continue_hint})"
            raise interrupts.restated(interrupt, message) from None

    def check_finite(self, metrics: dict[str, float], step: int, names: Sequence[str] | None = None) -> None:
        """Abort at the first non-finite loss, keeping the last good checkpoints."""
        for name in names if names is not None else list(metrics):
            value = metrics.get(name)
            if value is not None and not math.isfinite(value):
                unit = self.setup.algorithm.step_unit
                raise MazerunError(
                    f"{name} became {value} at {unit} {step}: training diverged and stopped; {self.kept()}; "
                    f"lower {self.setup.prefix}.lr or check the data for extreme values"
                )
