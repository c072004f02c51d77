"""DAgger: the learner acts, the expert labels every state it visits, the policy clones the aggregate.

Each iteration steps ``runner.n_envs`` env copies ``n_steps`` times. In every copy and step the
expert's action is executed with probability beta (teacher forcing), the learner's sampled
action otherwise; either way the state joins the aggregate D with the expert's label. The
policy is then trained on batches drawn uniformly from everything labelled so far:

    loss = -E_(s, a_expert)~D [ log pi(a_expert | s) ]        (cross-entropy, or Gaussian NLL)

beta decays linearly from ``teacher_forcing.start`` to ``teacher_forcing.end`` over
``teacher_forcing.steps`` env steps (AllenAct's ``LinearDecay``), so the learner is first shown
the expert's own trajectories and then the states its own mistakes lead to, which plain
behavioural cloning never sees (Ross et al., 2011). With ``expert_takes_over`` the learner's first
executed mistake in an episode hands the rest of it to the expert, so its labels hold that mistake's
recovery and no wandering after it. ``n_updates`` gradient steps are spread
over the iterations in proportion to the labels collected, so DAgger and BC with the same
``n_updates`` do the same amount of optimisation.

A network trained as the labels come has fitted the early aggregate first, and that warm start
generalises worse than a fresh one trained on all of it (Ash & Adams, 2020). With
``refit_updates`` the policy handed over is a network from fresh weights, trained on the whole
aggregate once the last label is in, as behavioural cloning trains on its records (the learning
rate decays from ``lr`` to 0 over those updates); the iterations' network only collects. On
GoToLocal with the bot, cloning DAgger's own 30k labels from scratch reached 0.946 success where
the network trained along reached 0.894 (bench/defaults.py).

The update is behavioural cloning's (:class:`mazerun.algorithms.bc.BehaviouralCloning`); only
where the data comes from differs, which is the interactive loop's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Optional

import gymnasium as gym
import torch

from mazerun.algorithms.base import EnvStepBudget
from mazerun.algorithms.bc import BehaviouralCloning
from mazerun.config.schemas import check_fields
from mazerun.core.errors import MazerunError
from mazerun.core.schedules import LinearSchedule

WARM_REFIT_SHARE = 0.5
"""The refit warms its chunks (``burn_in``) where more than this share of the labels lie beyond a chunk's reach."""


@dataclass
class TeacherForcingConfig:
    start: float = 1.0
    """Probability of executing the expert's action at the first step."""
    end: float = 0.0
    """Probability of executing the expert's action from ``steps`` on."""
    steps: Optional[int] = None
    """Env steps over which the probability decays linearly; null: the whole of total_steps."""


@dataclass
class DAggerConfig(EnvStepBudget):
    """DAgger's settings. The expert is the ``expert`` group (default: the env's heuristic, the bot for BabyAI);
    labelled episodes are recorded to trajectory_data/ with an expert_actions column, which behavioural cloning
    can train on later."""

    loop: ClassVar[str] = "interactive"
    imitates: ClassVar[bool] = True
    kind_defaults: ClassVar[dict[str, dict[str, Any]]] = {"minigrid": {
        "total_steps": 100_000, "n_updates": 10_000, "lr": 1e-3, "eval_every": 20_000, "rollout_len": 16,
        "nrollouts": 16, "burn_in": 32, "teacher_forcing.steps": 100_000, "refit_updates": 10_000,
        "refit_eval_every": 2000, "expert_takes_over": True, "runner.eval_repeats": 100}}
    """On MiniGrid and BabyAI (a GRU by default). The rate stays constant: a decay to 0 starves the labels that
    arrive last, the learner's own late states. Teacher forcing decays over 100k steps whatever the budget: a
    smaller budget keeps the expert at the wheel for most steps, so the labels hold recoveries from the learner's
    few actions (as DART's noise does) without a weak learner's wandering spending the budget on few layouts. The
    expert takes over from the learner's first mistake in an episode: once teacher forcing has decayed, a learner
    still weak wanders until the step limit, and on PutNextLocal's 120k labels without it 74% of the labels came
    after a first mistake, the records held 4,253 layouts (BC's demos: 10,000) and the refit scored 0.0 on 500
    unseen seeds; with it 0.93 (BC 0.858). The
    refit, a GRU from fresh weights on all the labels with BC's schedule, chunks and evaluations (the best is handed
    over, as BC's is), is the policy delivered. While the labels come in, each chunk's state is warmed by the 32
    steps before it: after the learner's own action the expert's label depends on what came before, and a chunk
    that starts from a blank state mid-episode cannot know it. The refit keeps the warm-up only where most labels
    lie a chunk's length or more into their episode, out of a blank chunk's reach: BC on DAgger's own labels
    scored, without the warm-up and with it, 0.894 and 0.812 on GoToLocal's 15.9k and 0.406 and 0.292 on
    PickupLoc's 6.1k (short episodes: none of their labels that deep), but 0.960 and 0.992 on KeyCorridorS3R3's
    437k (66% that deep). The README's DAgger section gives what each choice measured."""

    name: str = "dagger"
    """Which algorithm this section configures, as chosen by ``algorithm=<name>``."""
    total_steps: int = 20_000
    """Env steps in total over all envs, i.e. states the expert labels (the last iteration stops there, rounded up
    to a step of every env copy); budgets are totals."""
    n_steps: int = 64
    """Steps per env copy between two training phases."""
    n_updates: int = 3000
    """Gradient steps in total, spread over the iterations in proportion to the labels collected."""
    refit_updates: int = 0
    """Gradient steps of a network from fresh weights on the whole aggregate once the last label is in, its learning
    rate decaying from lr to 0; that network is the policy handed over. 0: hand over the network trained as the
    labels came."""
    refit_eval_every: int = 0
    """Refit updates between evaluations of the refitted network, each a candidate for best.pt as BC's are (logged
    as ``refit_eval`` against refit updates); 0: one evaluation, after its last update."""
    batch_size: int = 256
    """Labelled states per gradient step (models without memory; nrollouts sizes the batches of those with it)."""
    lr: float = 3e-4
    """Adam's learning rate."""
    lr_schedule: str = "constant"
    """constant, or linear: decays to 0 at n_updates."""
    teacher_forcing: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    """Probability of executing the expert's action rather than the learner's (beta), decaying linearly."""
    rollout_len: int = 32
    """Models with memory: steps per chunk of an env copy's consecutive steps (truncated BPTT)."""
    nrollouts: int = 64
    """Models with memory: chunks per batch (batch_size is for models without memory)."""
    burn_in: int = 0
    """Models with memory: steps before each chunk that only warm the state, while the labels come in. The refit
    keeps them only where most labels lie rollout_len or more steps into their episode; elsewhere it trains as
    behavioural cloning does, on chunks that start from a blank state."""
    learner_actions: str = "sample"
    """sample from the learner's policy, or greedy: its most likely action (what evaluation executes)."""
    expert_takes_over: bool = False
    """Discrete actions: once the learner has executed an action other than the expert's label, the expert drives
    the rest of that episode, which then holds one of the learner's mistakes and the expert's recovery from it (as
    DART's single perturbations do) and no wandering after it; false: the learner keeps acting with probability
    1 - beta at every step. On by default on MiniGrid and BabyAI (``kind_defaults``). At GoToLocal's 53.6k labels
    it saw 9,424 layouts where the learner driving on saw 9,085 (BC's demos: 10,000), since the way back from a
    wrong turn is itself a detour (README, DAgger)."""
    eval_every: int = 5000
    """Env steps between evaluations and checkpoints; the first one is after the first iteration."""
    fused: bool = True
    """Behavioural cloning's hand-written step where the policy allows it (see ``BCConfig.fused``)."""

    def check_spaces(self, observation_space: Any, action_space: Any) -> None:
        """DAgger learns in any env the models read and the expert acts in; a takeover needs actions that can
        equal the label."""
        if self.expert_takes_over and not isinstance(action_space, gym.spaces.Discrete):
            raise MazerunError("algorithm.expert_takes_over=true needs discrete actions: a continuous learner's action "
                               "never equals the expert's exactly; set it to false")

    def check(self, prefix: str = "algorithm") -> None:
        check_fields(self, prefix, positive=("total_steps", "n_steps", "n_updates", "batch_size", "lr", "eval_every",
                                             "rollout_len", "nrollouts"),
                     non_negative=("burn_in", "refit_updates", "refit_eval_every"), schedules=("lr_schedule",))
        if self.learner_actions not in ("sample", "greedy"):
            raise MazerunError(f"{prefix}.learner_actions={self.learner_actions!r} is unknown; use sample or greedy")
        forcing = self.teacher_forcing
        check_fields(forcing, f"{prefix}.teacher_forcing", unit_interval=("start", "end"))
        if forcing.steps is not None and forcing.steps <= 0:
            raise MazerunError(
                f"{prefix}.teacher_forcing.steps={forcing.steps} must be > 0 (or null to decay over total_steps)"
            )

    def beta(self) -> LinearSchedule:
        """The teacher-forcing probability against env steps."""
        forcing = self.teacher_forcing
        return LinearSchedule(forcing.start, forcing.end, forcing.steps or self.total_steps)


class DAgger(BehaviouralCloning):
    """Behavioural cloning of the expert's labels; the interactive loop feeds it the aggregate."""

    def refit_learner(self, seed: int, deep_share: float = 0.0) -> DAgger:
        """A learner from fresh weights for the refit, trained as behavioural cloning is: ``refit_updates`` updates,
        the learning rate decaying to 0. Its chunks keep the collector's ``burn_in`` only where ``deep_share``, the
        share of the labels that lie ``rollout_len`` or more steps into their episode, passes
        :data:`WARM_REFIT_SHARE` (why: ``DAggerConfig.kind_defaults``).

        The weights are drawn from torch's generator seeded with ``seed`` alone (and restored after), so a
        run stopped before the refit and continued draws the same ones.
        """
        burn_in = self.config.burn_in if deep_share > WARM_REFIT_SHARE else 0
        config = replace(self.config, n_updates=self.config.refit_updates, lr_schedule="linear", burn_in=burn_in)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DAgger(config, self.spec, self.generator)


Config = DAggerConfig
Algorithm = DAgger
