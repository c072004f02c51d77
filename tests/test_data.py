"""Records -> transition tensors: pairing within episodes, done flags, episode splits, sampling."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from mazerun.acting.envs import make_env
from mazerun.core.errors import MazerunError
from mazerun.data.records import EpisodeBuilder, StateTrajectoryRecord
from mazerun.data.tensors import (
    BatchSampler,
    build_vocabulary,
    check_records_match_spaces,
    env_id_of,
    observation_stats,
    records_to_dataset,
    split_by_episode,
)
from mazerun.nn.models import Vocabulary


def vector_record(
    steps: int, start: float, *, terminated: bool, truncated: bool, env_id: str = "Test-v0"
) -> StateTrajectoryRecord:
    """An episode whose observation t is [start + t, -(start + t)], so pairings can be read back."""
    values = start + np.arange(steps + 1, dtype=np.float32)
    return StateTrajectoryRecord(
        observations=np.stack([values, -values], axis=1),
        actions=np.arange(steps, dtype=np.int64) % 2,
        rewards=np.full(steps, 0.5) + np.arange(steps),
        terminated=terminated,
        truncated=truncated,
        env_id=env_id,
        seed=0,
        policy="hand",
    )


def mission_record(missions: list[str], *, terminated: bool) -> StateTrajectoryRecord:
    steps = len(missions) - 1
    image = np.zeros((steps + 1, 7, 7, 3), dtype=np.uint8)
    image[:, 0, 0, 0] = np.arange(steps + 1)
    return StateTrajectoryRecord(
        observations={
            "image": image,
            "direction": np.arange(steps + 1, dtype=np.int64) % 4,
            "mission": np.array(missions),
        },
        actions=np.full(steps, 2, dtype=np.int64),
        rewards=np.zeros(steps),
        terminated=terminated,
        truncated=not terminated,
        env_id="BabyAI-GoToLocal-v0",
        seed=0,
        policy="hand",
    )


def two_episodes() -> list[StateTrajectoryRecord]:
    return [
        vector_record(3, 0.0, terminated=True, truncated=False),
        vector_record(2, 100.0, terminated=False, truncated=True),
    ]


def test_transitions_pair_steps_within_each_episode_only() -> None:
    dataset = records_to_dataset(two_episodes())

    assert len(dataset) == 5
    assert dataset.observations[:, 0].tolist() == [0, 1, 2, 100, 101]
    # The terminated episode's last step leads to its own final observation (3), not to 100.
    assert dataset.next_observations[:, 0].tolist() == [1, 2, 3, 101, 102]
    assert dataset.next_observations[:, 1].tolist() == [-1, -2, -3, -101, -102]
    # Only termination ends bootstrapping; the truncated episode's last step is not done.
    assert dataset.dones.tolist() == [0, 0, 1, 0, 0]
    assert dataset.episode_ids.tolist() == [0, 0, 0, 1, 1]
    assert dataset.actions.tolist() == [0, 1, 0, 0, 1]
    assert dataset.rewards.tolist() == [0.5, 1.5, 2.5, 0.5, 1.5]
    assert dataset.observations.dtype == torch.float32
    assert dataset.actions.dtype == torch.int64
    assert dataset.rewards.dtype == torch.float32
    assert dataset.dones.dtype == torch.float32


def test_continuous_actions_become_float32_rows() -> None:
    record = vector_record(2, 0.0, terminated=True, truncated=False)
    record.actions = np.array([[0.5, -1.0], [1.0, 0.25]], dtype=np.float64)
    dataset = records_to_dataset([record])
    assert dataset.actions.dtype == torch.float32
    assert dataset.actions.tolist() == [[0.5, -1.0], [1.0, 0.25]]


def test_dict_observations_encode_missions_and_pair_within_episodes() -> None:
    records = [
        mission_record(["go to the red ball"] * 3, terminated=True),
        mission_record(["pick up the key", "pick up the key"], terminated=False),
    ]
    dataset = records_to_dataset(records)
    vocabulary = dataset.vocabulary

    assert vocabulary is not None
    assert vocabulary.to_list() == sorted({"go", "to", "the", "red", "ball", "pick", "up", "key"})
    assert dataset.observations["image"].dtype == torch.uint8
    assert dataset.observations["direction"].dtype == torch.int64
    assert dataset.observations["image"][:, 0, 0, 0].tolist() == [0, 1, 0]
    assert dataset.next_observations["image"][:, 0, 0, 0].tolist() == [1, 2, 1]
    assert dataset.next_observations["direction"].tolist() == [1, 2, 1]
    expected = vocabulary.encode(["go to the red ball", "go to the red ball", "pick up the key"])
    assert torch.equal(dataset.observations["mission"], expected)
    assert torch.equal(dataset.next_observations["mission"], expected)
    assert dataset.dones.tolist() == [0, 1, 0]


def test_a_given_vocabulary_maps_new_words_to_unknown() -> None:
    vocabulary = Vocabulary.build(["go to the ball"])
    dataset = records_to_dataset([mission_record(["go to the box"] * 2, terminated=True)], vocabulary)
    assert dataset.vocabulary is vocabulary
    ids = dataset.observations["mission"][0].tolist()
    assert ids[:3] == vocabulary.encode(["go to the"])[0].tolist()
    assert ids[3] == Vocabulary.UNKNOWN


def test_build_vocabulary_covers_every_mission() -> None:
    records = [mission_record(["open the door", "go to a box"], terminated=True)]
    assert build_vocabulary(records).to_list() == ["a", "box", "door", "go", "open", "the", "to"]


def many_episodes(count: int) -> list[StateTrajectoryRecord]:
    return [
        vector_record(2 + index % 3, 1000.0 * index, terminated=index % 2 == 0, truncated=index % 2 == 1)
        for index in range(count)
    ]


def test_split_keeps_each_episode_on_one_side() -> None:
    dataset = records_to_dataset(many_episodes(10))
    train, validation = split_by_episode(dataset, 30, seed=1)

    assert validation is not None
    train_episodes = set(train.episode_ids.tolist())
    validation_episodes = set(validation.episode_ids.tolist())
    assert len(validation_episodes) == 3
    assert train_episodes.isdisjoint(validation_episodes)
    assert train_episodes | validation_episodes == set(range(10))
    assert len(train) + len(validation) == len(dataset)
    # Every transition stays with its own episode's next observation (episode e starts at 1000 e).
    for part in (train, validation):
        assert torch.equal(part.next_observations[:, 0] - part.observations[:, 0], torch.ones(len(part)))
        episode_of_step = torch.div(part.observations[:, 0], 1000, rounding_mode="floor").long()
        assert torch.equal(episode_of_step, part.episode_ids)


def ids(records: list[StateTrajectoryRecord]) -> list[str]:
    return [record.id for record in records]


def test_split_is_reproducible_and_seed_dependent() -> None:
    records = many_episodes(20)
    first = split_by_episode(records, 25, seed=3)
    again = split_by_episode(records, 25, seed=3)
    other = split_by_episode(records, 25, seed=4)
    assert ids(first[1]) == ids(again[1])
    assert len(first[1]) == 5 and len(first[0]) == 15
    assert set(ids(first[1])) != set(ids(other[1]))
    assert set(ids(first[0])).isdisjoint(ids(first[1]))


def test_split_with_zero_percent_has_no_validation() -> None:
    dataset = records_to_dataset(two_episodes())
    train, validation = split_by_episode(dataset, 0, seed=0)
    assert validation is None
    assert train is dataset
    records, none = split_by_episode(two_episodes()[:1], 0.0, seed=0)
    assert none is None and len(records) == 1


def test_split_sizes_are_clamped_to_one_and_all_but_one() -> None:
    _, small = split_by_episode(many_episodes(10), 1, seed=0)
    assert small is not None and len(small) == 1
    train, large = split_by_episode(many_episodes(3), 99, seed=0)
    assert large is not None and len(large) == 2 and len(train) == 1


@pytest.mark.parametrize("percentage", [-1, 100, 150])
def test_split_rejects_percentages_outside_range(percentage: float) -> None:
    with pytest.raises(MazerunError, match=r"outside \[0, 100\)"):
        split_by_episode(many_episodes(4), percentage, seed=0)


def test_split_needs_two_episodes() -> None:
    with pytest.raises(MazerunError, match="at least 2 episodes.*has 1"):
        split_by_episode(records_to_dataset(two_episodes()[:1]), 10, seed=0)


def test_observation_stats_match_numpy_and_clamp_constant_features() -> None:
    record = vector_record(4, 0.0, terminated=True, truncated=False)
    record.observations[:, 1] = 7.0
    mean, std = observation_stats(records_to_dataset([record]).observations)
    assert mean.tolist() == pytest.approx([1.5, 7.0])
    assert std[0].item() == pytest.approx(np.std([0, 1, 2, 3]))
    assert std[1].item() == pytest.approx(1e-6)


def test_sampler_is_deterministic_for_a_seed() -> None:
    dataset = records_to_dataset(many_episodes(8))
    first, again, other = (BatchSampler(dataset, 16, seed=seed) for seed in (5, 5, 6))
    for _ in range(3):
        a, b, c = first.sample(), again.sample(), other.sample()
        assert a.expert_actions is None  # the records carry no expert labels
        for field_a, field_b in zip(a[:-1], b[:-1]):
            assert torch.equal(field_a, field_b)
        assert not torch.equal(a.observations, c.observations)
    assert a.observations.shape == (16, 2)
    assert a.actions.shape == a.rewards.shape == a.dones.shape == (16,)
    # All fields come from the same rows.
    assert torch.equal(a.next_observations[:, 0], a.observations[:, 0] + 1)


def test_sampler_indexes_dict_observations_per_key() -> None:
    dataset = records_to_dataset([mission_record(["go to the red ball"] * 4, terminated=True)])
    batch = BatchSampler(dataset, 3, seed=0).sample()  # the dataset's 3 transitions: a larger batch is clamped
    assert set(batch.observations) == {"image", "direction", "mission"}
    assert batch.observations["image"].shape == (3, 7, 7, 3)
    assert torch.equal(batch.next_observations["direction"], (batch.observations["direction"] + 1) % 4)
    assert torch.equal(batch.observations["image"][:, 0, 0, 0].long(), batch.observations["direction"])


def test_sampler_epoch_visits_every_transition_once() -> None:
    dataset = records_to_dataset(many_episodes(5))
    sampler = BatchSampler(dataset, 4, seed=0)
    shuffled = torch.cat([batch.observations[:, 0] for batch in sampler.epoch()])
    ordered = torch.cat([batch.observations[:, 0] for batch in sampler.epoch(shuffle=False)])
    assert torch.equal(ordered, dataset.observations[:, 0])
    assert torch.equal(shuffled.sort().values, ordered.sort().values)
    assert not torch.equal(shuffled, ordered)


def test_real_env_episodes_round_trip_through_the_dataset() -> None:
    env = make_env("LunarLander-v3", max_episode_steps=15)
    observation, _ = env.reset(seed=0)
    env.action_space.seed(0)
    builder = EpisodeBuilder(observation)
    terminated = truncated = False
    while not (terminated or truncated):
        action = env.action_space.sample()
        observation, reward, terminated, truncated, _ = env.step(action)
        builder.add(action, reward, observation)
    record = builder.build(
        terminated=terminated, truncated=truncated, env_id="LunarLander-v3", seed=0, policy="random"
    )
    env.close()

    check_records_match_spaces([record], env.observation_space, env.action_space)
    dataset = records_to_dataset([record])
    assert len(dataset) == len(record) == 15
    assert torch.equal(dataset.next_observations[-1], torch.from_numpy(observation))
    assert dataset.dones[-1].item() == float(terminated)


def test_mismatching_records_are_named_with_expected_and_found_shapes() -> None:
    space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    good = vector_record(2, 0.0, terminated=True, truncated=False)
    plane = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    check_records_match_spaces([good], plane, gym.spaces.Discrete(2))
    with pytest.raises(MazerunError, match=rf"{good.id}.*shape \(2,\).*expected \(3,\)"):
        check_records_match_spaces([good], space, gym.spaces.Discrete(2))
    bad_action = vector_record(3, 0.0, terminated=True, truncated=False)
    bad_action.actions[1] = 9
    with pytest.raises(MazerunError, match=rf"{bad_action.id}.*actions contain 9, outside Discrete\(4\)"):
        check_records_match_spaces([good, bad_action], plane, gym.spaces.Discrete(4))


def test_dict_records_are_checked_against_the_babyai_space() -> None:
    env = make_env("BabyAI-GoToLocal-v0")
    record = mission_record(["go to the red ball"] * 3, terminated=True)
    check_records_match_spaces([record], env.observation_space, env.action_space)
    vector = vector_record(2, 0.0, terminated=True, truncated=False)
    with pytest.raises(MazerunError, match="expected a dict"):
        check_records_match_spaces([vector], env.observation_space, env.action_space)
    record.observations["image"] = record.observations["image"][:, :5]
    expected = r"observations\['image'\] have shape \(5, 7, 3\).*expected \(7, 7, 3\)"
    with pytest.raises(MazerunError, match=expected):
        check_records_match_spaces([record], env.observation_space, env.action_space)


def test_env_id_of_rejects_mixed_environments() -> None:
    records = [vector_record(1, 0, terminated=True, truncated=False, env_id="LunarLander-v3")] * 3
    assert env_id_of(records) == "LunarLander-v3"
    mixed = records + [vector_record(1, 0, terminated=True, truncated=False, env_id="CartPole-v1")]
    with pytest.raises(MazerunError, match=r"LunarLander-v3 \(3 records\), CartPole-v1 \(1 record\)"):
        env_id_of(mixed)
    with pytest.raises(MazerunError, match="no trajectory records"):
        env_id_of([])
