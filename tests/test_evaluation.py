"""Evaluation rollouts: exactly the asked number of episodes, on fixed seeds, whatever their lengths."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

from mazerun.acting.evaluation import EVAL_SEED_OFFSET, evaluate


@pytest.mark.parametrize("episodes", [3, 20])
def test_evaluation_plays_each_seed_once(episodes: int) -> None:
    env = gym.make("CartPole-v1")
    result = evaluate(lambda obs: torch.zeros(len(obs), dtype=torch.long), "CartPole-v1", episodes,
                      observation_space=env.observation_space, vocabulary=None, device="cpu")
    # A constant push ends each episode after a seed-dependent number of steps; play the same seeds by hand.
    expected = []
    for i in range(episodes):
        env.reset(seed=EVAL_SEED_OFFSET + i)
        steps, done = 0, False
        while not done:
            _, _, terminated, truncated, _ = env.step(0)
            steps, done = steps + 1, terminated or truncated
        expected.append(steps)
    assert len(set(expected)) > 1  # lengths differ, so over-sampling short episodes would show
    assert sorted(result.lengths) == sorted(expected)
    assert result.successes is None
    assert result.metrics()["mean_return"] == pytest.approx(sum(expected) / episodes)


def test_evaluation_is_deterministic_and_reports_success_on_babyai() -> None:
    space = gym.make("BabyAI-GoToLocal-v0").observation_space
    from mazerun.nn.models import Vocabulary

    vocabulary = Vocabulary.build(["go to the red ball"])
    first = evaluate(lambda obs: torch.full((len(obs["direction"]),), 2), "BabyAI-GoToLocal-v0", 4,
                     observation_space=space, vocabulary=vocabulary, device="cpu")
    second = evaluate(lambda obs: torch.full((len(obs["direction"]),), 2), "BabyAI-GoToLocal-v0", 4,
                      observation_space=space, vocabulary=vocabulary, device="cpu")
    assert first.returns == second.returns and len(first.successes) == 4
    assert "success_rate" in first.metrics()
