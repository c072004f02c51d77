"""DAgger: the teacher-forcing schedule, the expert beside each env copy, the aggregate, runs through `run`."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import newest_run_dir, run_cli, run_ok, spawn_cli

from mazerun.acting.envs import ExpertActions, make_env
from mazerun.acting.policies.heuristic import BabyAIBotPolicy, LunarLanderHeuristic
from mazerun.acting.vector import make_vector_env
from mazerun.algorithms.dagger import DAgger, DAggerConfig, TeacherForcingConfig
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.config.schemas import EnvConfig, RunConfig, RunnerConfig
from mazerun.core import interrupts
from mazerun.core.errors import MazerunError
from mazerun.core.schedules import LinearSchedule
from mazerun.data.records import load_records
from mazerun.nn.checkpoint import load_checkpoint
from mazerun.nn.models import ModelConfig
from mazerun.training.loops.interactive import LabelledStates, due_updates
from mazerun.training.metrics import read_metrics_csv
from mazerun.training.runsetup import RunSetup
from mazerun.training.train import train

TINY = ["algorithm=dagger", "algorithm.n_steps=16", "runner.n_envs=4", "runner.eval_repeats=2",
        "model.hidden_sizes=[32,32]"]


# -------------------------------------------------------------------------------------- schedules


def test_beta_decays_linearly_from_start_to_end_over_its_steps() -> None:
    config = DAggerConfig(total_steps=1000, teacher_forcing=TeacherForcingConfig(start=1.0, end=0.2, steps=400))
    beta = config.beta()
    assert [beta(step) for step in (0, 100, 200, 400, 900)] == pytest.approx([1.0, 0.8, 0.6, 0.2, 0.2])
    # without steps the decay spans the whole budget
    assert DAggerConfig(total_steps=1000).beta()(250) == pytest.approx(0.75)


def test_a_raised_budget_continues_a_linear_schedule_from_where_it_stood() -> None:
    schedule = LinearSchedule.of("linear", 1e-3, end_step=1000)
    assert schedule(400) == pytest.approx(6e-4)
    stretched = schedule.extended_to(400, 2000)
    assert stretched(400) == pytest.approx(6e-4)  # no jump
    assert stretched(1200) == pytest.approx(3e-4) and stretched(2000) == 0.0
    assert schedule.extended_to(400, 1000) is schedule  # the same budget: the same schedule
    assert LinearSchedule.from_list(stretched.to_list()) == stretched
    assert LinearSchedule.of("constant", 0.2, end_step=10)(10) == 0.2


# ----------------------------------------------------------------------------------------- expert


def test_lunar_lander_labels_are_the_heuristics_own_actions_on_the_visited_states() -> None:
    envs = make_vector_env("LunarLander-v3", 2, "sync", 60, seed=7, make_expert=lambda env: LunarLanderHeuristic())
    rng = np.random.default_rng(0)
    heuristic = LunarLanderHeuristic()
    replays = [make_env("LunarLander-v3", max_episode_steps=60) for _ in range(2)]
    try:
        envs.reset()
        observations, infos = envs.observations, envs.infos
        for index, env in enumerate(replays):
            env.reset(seed=7 + index)
        for _ in range(80):
            labels = infos["expert_action"]
            for index, env in enumerate(replays):  # the label of the state each copy is in
                heuristic.reset(env, None)
                assert labels[index] == heuristic.act(observations[index])
            actions = rng.integers(0, 4, size=2)
            observations, _, terminated, truncated, infos = envs.step(actions)
            for index, env in enumerate(replays):
                _, _, done_a, done_b, _ = env.step(int(actions[index]))
                if done_a or done_b:
                    assert terminated[index] or truncated[index]
                    env.reset(seed=7 + index + 2)  # copy i's next episode: seed + i + n_envs
    finally:
        envs.close()


def test_the_babyai_bot_replans_after_the_learners_own_actions() -> None:
    env = ExpertActions(make_env("BabyAI-GoToLocal-v0"), BabyAIBotPolicy())
    shadow_env = make_env("BabyAI-GoToLocal-v0")
    shadow = BabyAIBotPolicy()
    rng = np.random.default_rng(1)
    observation, info = env.reset(seed=3)
    shadow_env.reset(seed=3)
    shadow.reset(shadow_env, 3)
    for _ in range(30):
        assert info["expert_action"] == shadow.act(observation)
        action = int(rng.integers(0, 3)) if rng.random() < 0.5 else info["expert_action"]
        if action != info["expert_action"]:
            shadow.took(action)  # what the wrapper tells its bot: the action actually taken
        observation, _, terminated, truncated, info = env.step(action)
        shadow_env.step(action)
        if terminated or truncated:
            break


def test_the_aggregate_keeps_every_labelled_state() -> None:
    space, actions = gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(4)
    aggregate = LabelledStates(10, space, actions, 1, torch.device("cpu"))
    aggregate.add(torch.arange(6.0).reshape(2, 3), torch.tensor([1, 2]), torch.tensor([True, False]))
    aggregate.add(torch.ones(3, 3), torch.tensor([3, 0, 1]), torch.tensor([False, True, False]))
    assert len(aggregate) == 5
    assert aggregate.labels[:5].tolist() == [1, 2, 3, 0, 1]
    assert aggregate.observations[1].tolist() == [3.0, 4.0, 5.0]
    batch = aggregate.sample(64, torch.Generator().manual_seed(0))
    assert set(batch.expert_actions.tolist()) == {0, 1, 2, 3}  # every row can be drawn, none past the end
    restored = LabelledStates(10, space, actions, 1, torch.device("cpu"))
    restored.load_state(aggregate.state())
    assert len(restored) == 5 and torch.equal(restored.observations[:5], aggregate.observations[:5])


# -------------------------------------------------------------------------------------- end to end


def test_dagger_on_lunar_lander_labels_every_step_and_records_them(workdir: Path) -> None:
    result = run_ok(*TINY, "algorithm.total_steps=256", "algorithm.n_updates=40", "algorithm.eval_every=128",
                    "runner.max_episode_steps=40", cwd=workdir)
    assert "heuristic expert" in result.stderr
    run_dir = newest_run_dir(workdir)
    rows = read_metrics_csv(run_dir / "metrics.csv")
    train = {(row["step"], row["metric"]): row["value"] for row in rows if row["group"] == "train"}
    assert train[(128, "labels")] == 128 and train[(256, "labels")] == 256  # nothing dropped
    assert train[(128, "beta")] > train[(256, "beta")]  # teacher forcing decays
    assert {(256, "expert_agreement"), (256, "policy_loss")} <= set(train)
    assert [row["step"] for row in rows if row["metric"] == "mean_return"] == [128, 256]
    records = load_records(run_dir / "trajectory_data")
    assert records and all(len(record.expert_actions) == len(record) for record in records)
    assert sum(len(record) for record in records) <= 256  # finished episodes; the rest were still running
    heuristic = LunarLanderHeuristic()  # a function of the observation alone: each label is the one of its own state
    heuristic.reset(make_env("LunarLander-v3"), None)
    assert all(label == heuristic.act(observation) for record in records
               for observation, label in zip(record.observations, record.expert_actions))
    last = load_checkpoint(run_dir / "last.pt")
    assert last.algorithm == "dagger" and last.extra["step"] == 256

    # BC trains on DAgger's records, with the expert's labels as targets
    run_ok("-cn", "conf_train", f"runner.dataset.dir_or_file={run_dir / 'trajectory_data'}", "algorithm.n_updates=10",
           "algorithm.eval_every=10", "algorithm.validation_percentage=0", "runner.eval_repeats=1",
           "runner.max_episode_steps=20", cwd=workdir)


@pytest.mark.parametrize("takeover", [True, False])
def test_once_the_learner_errs_the_expert_drives_the_rest_of_the_episode(workdir: Path, takeover: bool) -> None:
    """With no teacher forcing the untrained learner errs early; taken over, it never acts again in that episode."""
    run_ok(*TINY, "algorithm.total_steps=256", "algorithm.n_updates=4", "algorithm.eval_every=256",
           "algorithm.teacher_forcing.start=0", "algorithm.teacher_forcing.end=0", "runner.max_episode_steps=40",
           f"algorithm.expert_takes_over={str(takeover).lower()}", cwd=workdir)
    run_dir = newest_run_dir(workdir)
    mistakes = [np.flatnonzero(np.asarray(record.actions) != np.asarray(record.expert_actions))
                for record in load_records(run_dir / "trajectory_data")]
    assert sum(len(found) > 0 for found in mistakes) >= 2
    if takeover:
        assert all(len(found) <= 1 for found in mistakes)  # the first mistake is the last
        train = {row["metric"] for row in read_metrics_csv(run_dir / "metrics.csv") if row["group"] == "train"}
        assert "expert_driving" in train
    else:
        assert any(len(found) > 1 for found in mistakes)


def test_a_takeover_is_refused_where_actions_are_continuous() -> None:
    box = gym.spaces.Box(-1, 1, (2,))
    with pytest.raises(MazerunError, match="algorithm.expert_takes_over=true needs discrete actions"):
        DAggerConfig(expert_takes_over=True).check_spaces(box, box)
    DAggerConfig(expert_takes_over=True).check_spaces(box, gym.spaces.Discrete(3))


def test_dagger_with_the_babyai_bot_reports_success(workdir: Path) -> None:
    result = run_ok(*TINY, "env=BabyAI-GoToLocal-v0", "algorithm.total_steps=128", "algorithm.n_updates=10",
                    "algorithm.refit_updates=5", "algorithm.eval_every=128", cwd=workdir)
    # the bot's GoToLocal episodes are shorter than a chunk (16 steps): the refit's chunks start blank
    assert ("refit: 0% of the labels lie 16 or more steps into their episode, so its chunks are not warmed"
            in result.stderr)
    rows = read_metrics_csv(newest_run_dir(workdir) / "metrics.csv")
    assert ("eval", "success_rate") in {(row["group"], row["metric"]) for row in rows}


def test_a_trained_run_can_be_the_teacher(workdir: Path) -> None:
    run_ok(*TINY, "algorithm.total_steps=64", "algorithm.n_updates=5", "algorithm.eval_every=64",
           "runner.max_episode_steps=30", "hydra.run.dir=teacher", cwd=workdir)
    result = run_ok(*TINY, "expert=torch_policy", "expert.input_dir=teacher", "algorithm.total_steps=128",
                    "algorithm.n_updates=5", "algorithm.eval_every=128", "runner.max_episode_steps=30",
                    "hydra.run.dir=student", cwd=workdir)
    assert "torch_policy:dagger expert" in result.stderr
    assert load_records(workdir / "student" / "trajectory_data")[0].policy == "dagger:torch_policy:dagger"


@pytest.mark.parametrize(("overrides", "message"), [
    (["env=gym_env", "env.name=Acrobot-v1"], "no heuristic policy for Acrobot-v1"),
    (["algorithm.teacher_forcing.start=1.5"], "algorithm.teacher_forcing.start=1.5 must lie in [0, 1]"),
    (["algorithm.teacher_forcing.steps=0"], "algorithm.teacher_forcing.steps=0 must be > 0"),
    (["algorithm.refit_updates=-1"], "algorithm.refit_updates=-1 must be >= 0"),
    (["expert=torch_policy"], "expert.input_dir must be set"),
    (["expert=torch_policy", "expert.input_dir=nowhere"], "nowhere does not exist"),
])
def test_bad_dagger_input_is_one_line_and_writes_nothing(workdir: Path, overrides: list[str], message: str) -> None:
    result = run_cli(*TINY, "algorithm.total_steps=64", *overrides, cwd=workdir)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not list(workdir.glob("outputs/*/*/*.pt")) and not list(workdir.glob("outputs/*/*/trajectory_data"))


def dagger_config(input_dir: Path | None = None, **algorithm_settings: int) -> RunConfig:
    algorithm = DAggerConfig(total_steps=256, n_steps=16, n_updates=40, eval_every=128, batch_size=32,
                             **algorithm_settings)
    return RunConfig(algorithm=algorithm, env=EnvConfig(name="LunarLander-v3"),
                     runner=RunnerConfig(n_envs=4, eval_repeats=1, max_episode_steps=40),
                     input_dir=None if input_dir is None else str(input_dir), model={"hidden_sizes": [16, 16]},
                     device="cpu")


def test_the_last_iteration_stops_at_the_label_budget(workdir: Path) -> None:
    """64 labels an iteration (4 copies x 16 steps): 200 labels are 3 iterations and 2 steps, not 256."""
    run_ok(*TINY, "algorithm.total_steps=200", "algorithm.n_updates=20", "algorithm.eval_every=1000",
           "runner.max_episode_steps=40", cwd=workdir)
    run_dir = newest_run_dir(workdir)
    assert load_checkpoint(run_dir / "last.pt").extra["step"] == 200
    labels = [row["value"] for row in read_metrics_csv(run_dir / "metrics.csv") if row["metric"] == "labels"]
    assert labels == [200]


def test_labels_and_updates_are_spread_in_proportion() -> None:
    config = DAggerConfig(total_steps=100_000, n_updates=10_000)
    assert [due_updates(config, step) for step in (0, 1024, 50_000, 100_000, 101_024)] == [0, 102, 5000, 10_000,
                                                                                             10_000]


@pytest.mark.parametrize("takeover", [False, True])
def test_a_stop_inside_an_update_phase_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         takeover: bool) -> None:
    """4 iterations of 64 labels, 10 updates each; the stop lands in the second phase, before the report at 128
    (mid-episode, so with a takeover the copies the expert drives must travel in last.pt)."""
    settings = {"expert_takes_over": True} if takeover else {}
    train(dagger_config(**settings), tmp_path / "whole")
    check, calls = interrupts.check, {"n": 0}

    def stop_in_the_second_update_phase() -> None:  # checks: 1 per iteration, then 1 per update
        calls["n"] += 1
        if calls["n"] == 18:
            raise KeyboardInterrupt
        check()

    monkeypatch.setattr(interrupts, "check", stop_in_the_second_update_phase)
    with pytest.raises(KeyboardInterrupt):
        train(dagger_config(**settings), tmp_path / "stopped")
    monkeypatch.setattr(interrupts, "check", check)
    stopped = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert stopped.extra["step"] == 128 and stopped.extra["training_state"]["algorithm"]["updates"] == 15
    train(dagger_config(input_dir=tmp_path / "stopped", **settings), tmp_path / "continued")

    whole, continued = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "continued" / "last.pt")
    for name, value in whole.model_state.items():
        assert torch.equal(value, continued.model_state[name]), name
    assert read_metrics_csv(tmp_path / "continued" / "metrics.csv") == read_metrics_csv(tmp_path / "whole" / "metrics.csv")


def test_sigterm_in_a_long_update_phase_stops_within_seconds(workdir: Path) -> None:
    """500k updates owed after the first 64 labels: the phase checks for a stop before each update."""
    with spawn_cli(*TINY, "algorithm.total_steps=256", "algorithm.n_updates=2000000", "runner.max_episode_steps=10",
                   "hydra.run.dir=stopped", cwd=workdir) as process:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((workdir / "stopped" / "trajectory_data").glob("*.pkl")):
            time.sleep(0.05)  # episodes of 10 steps end inside the first 16-step iteration: its updates come next
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert time.monotonic() - signalled < 15 and "Traceback" not in stderr
    last = load_checkpoint(workdir / "stopped" / "last.pt")
    assert last.extra["step"] == 64 and 0 < last.extra["training_state"]["algorithm"]["updates"] < 500_000


# -------------------------------------------------------------------------------------- refit


def test_the_refit_trains_fresh_weights_on_every_label_and_hands_them_over(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """40 updates as the 256 labels come, then 30 of a fresh network on all of them: that network is the policy,
    in last.pt and in best.pt, even where the collector's evaluation scored higher (here every later one scores
    lower than the one before)."""
    scores = iter(range(100, 0, -1))
    monkeypatch.setattr(RunSetup, "evaluate", lambda self, network: {"mean_return": float(next(scores))})
    result = train(dagger_config(refit_updates=30), tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    refit = last.extra["training_state"]["refit"]
    assert last.extra["training_state"]["algorithm"]["updates"] == 40 and refit["algorithm"]["updates"] == 30
    assert refit["algorithm"]["lr_schedule"] == [3e-4, 0.0, 30, 0]  # lr down to 0 over the refit's own updates
    collector, handed_over = refit["collector"], last.model_state
    assert not torch.equal(collector["policy_head.weight"], handed_over["policy_head.weight"])
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert [row["step"] for row in rows if row["metric"] == "labels"] == [128, 256]  # the last report is the refit's
    assert result.step == 256
    best = load_checkpoint(tmp_path / "run" / "best.pt").model_state  # the refit's, whatever the collector scored
    assert all(torch.equal(value, handed_over[name]) for name, value in best.items())


def test_the_refits_evaluations_pick_best_pt_and_a_continued_refit_keeps_its_best(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With refit_eval_every=10 of 30 refit updates, the refit is evaluated at 10 and 20 (logged as refit_eval
    against its updates) and after its last: scored 5, 50 and 1, best.pt holds the network of update 20, as
    BC's best.pt holds its best evaluation. A run stopped after that evaluation and continued keeps 50 as the
    best to beat (the collector scored 100 before the refit: that is not the refit's)."""
    def scored(*scores: float) -> None:
        remaining = iter(scores)
        monkeypatch.setattr(RunSetup, "evaluate", lambda self, network: {"mean_return": float(next(remaining))})

    scored(100, 5, 50, 1)
    train(dagger_config(refit_updates=30, refit_eval_every=10), tmp_path / "whole")
    rows = read_metrics_csv(tmp_path / "whole" / "metrics.csv")
    assert [(row["step"], row["value"]) for row in rows if row["group"] == "refit_eval"] == [(10, 5.0), (20, 50.0)]
    assert [(row["step"], row["value"]) for row in rows if row["group"] == "eval"] == [(128, 100.0), (256, 1.0)]
    best, last = load_checkpoint(tmp_path / "whole" / "best.pt"), load_checkpoint(tmp_path / "whole" / "last.pt")
    assert best.extra["best"] == last.extra["best"] == {"eval/mean_return": 50.0}
    assert not torch.equal(best.model_state["policy_head.weight"], last.model_state["policy_head.weight"])

    check, calls = interrupts.check, {"n": 0}

    def stop_after_the_second_refit_evaluation() -> None:  # 4 iterations, 40 updates, then 1 per refit update
        calls["n"] += 1
        if calls["n"] == 4 + 40 + 25:
            raise KeyboardInterrupt
        check()

    scored(100, 5, 50)
    monkeypatch.setattr(interrupts, "check", stop_after_the_second_refit_evaluation)
    with pytest.raises(KeyboardInterrupt):
        train(dagger_config(refit_updates=30, refit_eval_every=10), tmp_path / "stopped")
    monkeypatch.setattr(interrupts, "check", check)
    scored(1)
    train(dagger_config(tmp_path / "stopped", refit_updates=30, refit_eval_every=10), tmp_path / "continued")
    assert load_checkpoint(tmp_path / "continued" / "last.pt").extra["best"] == {"eval/mean_return": 50.0}


def test_the_refit_draws_its_fresh_weights_from_the_seed_alone() -> None:
    """Whatever torch's generator went through (a continued run's differs), the same seed draws the same weights,
    and drawing them leaves that generator where it was."""
    spec = AlgorithmSpec(gym.spaces.Box(-1.0, 1.0, (8,)), gym.spaces.Discrete(4),
                         ModelConfig(kind="vector_obs", hidden_sizes=(16, 16)))
    learner = DAgger(DAggerConfig(refit_updates=30), spec)
    torch.manual_seed(1)
    first = learner.refit_learner(seed=7).network.state_dict()
    after = torch.rand(1)
    torch.manual_seed(2)
    second = learner.refit_learner(seed=7).network.state_dict()
    other = learner.refit_learner(seed=8).network.state_dict()
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)
    assert all(torch.equal(value, second[name]) for name, value in first.items())
    assert not torch.equal(first["policy_head.weight"], other["policy_head.weight"])


def test_a_stop_inside_the_refit_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refit's network and optimiser, and the collector beside them, travel in last.pt."""
    train(dagger_config(refit_updates=30), tmp_path / "whole")
    check, calls = interrupts.check, {"n": 0}

    def stop_in_the_refit() -> None:  # 4 iterations: 1 check each and 1 per update (40), then 1 per refit update
        calls["n"] += 1
        if calls["n"] == 4 + 40 + 12:
            raise KeyboardInterrupt
        check()

    monkeypatch.setattr(interrupts, "check", stop_in_the_refit)
    with pytest.raises(KeyboardInterrupt):
        train(dagger_config(refit_updates=30), tmp_path / "stopped")
    monkeypatch.setattr(interrupts, "check", check)
    stopped = load_checkpoint(tmp_path / "stopped" / "last.pt").extra["training_state"]
    assert stopped["refit"]["algorithm"]["updates"] == 11
    train(dagger_config(tmp_path / "stopped", refit_updates=30), tmp_path / "continued")

    whole, continued = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "continued" / "last.pt")
    for name, value in whole.model_state.items():
        assert torch.equal(value, continued.model_state[name]), name
    assert read_metrics_csv(tmp_path / "continued" / "metrics.csv") == read_metrics_csv(tmp_path / "whole" / "metrics.csv")


def test_the_refit_keeps_the_collectors_burn_in_only_where_most_labels_lie_beyond_a_chunk() -> None:
    """The collector's chunks are warmed by burn_in steps; the refit's only where more than half of the labels lie
    too deep into their episode for a blank chunk to hold their history."""
    spec = AlgorithmSpec(gym.spaces.Box(-1.0, 1.0, (8,)), gym.spaces.Discrete(4),
                         ModelConfig(kind="vector_obs", hidden_sizes=(16, 16)))
    learner = DAgger(DAggerConfig(refit_updates=30, burn_in=32, lr_schedule="constant"), spec)
    shallow, deep = learner.refit_learner(seed=7, deep_share=0.5).config, learner.refit_learner(7, 0.51).config
    assert (shallow.burn_in, shallow.lr_schedule, shallow.n_updates) == (0, "linear", 30)
    assert (deep.burn_in, deep.lr_schedule, deep.n_updates) == (32, "linear", 30)
    assert learner.config.burn_in == 32


def test_the_share_of_labels_beyond_a_chunk_follows_each_copy_by_hand() -> None:
    # two copies interleaved (rows 0, 2, 4, ... copy 0; rows 1, 3, 5, ... copy 1), 5 steps each
    # copy 0: one episode of 5 steps, positions 0 1 2 3 4; copy 1: episodes of 2 and 3, positions 0 1 0 1 2
    aggregate = LabelledStates(10, gym.spaces.Box(-1.0, 1.0, (1,)), gym.spaces.Discrete(2), stride=2,
                               device=torch.device("cpu"))
    for step_starts in ([True, True], [False, False], [False, True], [False, False], [False, False]):
        aggregate.add(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.tensor(step_starts))
    assert aggregate.share_beyond(2) == 4 / 10  # copy 0's positions 2, 3, 4 and copy 1's last 2
    assert aggregate.share_beyond(4) == 1 / 10
    assert aggregate.share_beyond(0) == 1.0
