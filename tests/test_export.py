"""Export: every acting network to ONNX and TorchScript, checked against torch on real episodes; policy=onnx through
`run`, in both runners, records the episodes policy=torch_policy records; bad input is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXPORT, REPO, run_cli, run_ok

from mazerun.acting.envs import make_env
from mazerun.acting.policies.onnx_policy import OnnxGraph, OnnxPolicy
from mazerun.data.records import load_records
from mazerun.nn.checkpoint import load_checkpoint, network_from_checkpoint, save_checkpoint
from mazerun.nn.export import export_policy
from mazerun.nn.models import ModelConfig, QNetwork, Vocabulary, build_network, obs_to_tensor
from mazerun.training.runsetup import model_config_dict, sample_mission_vocabulary

TOLERANCE = 1e-5
SHAKE = 0.1
"""Noise added to every initial weight: FiLM (zero at first) modulates, and logits are a few units as after
training. float32 rounding grows with the activations (and the widths): noise of 0.3 put a narrow minigrid
network's logits above 100, and onnxruntime's rounding, summing in another order than torch, beyond 1e-5."""
COPIES, STEPS, EPISODE_STEPS = 3, 60, 25
"""Env copies acting side by side (the graph's batch), steps of each, and a time limit that makes episodes restart."""

NETWORKS = {
    "mlp-lunar-lander": ("LunarLander-v3", "actor_critic", {}),
    "mlp-gaussian": ("LunarLanderContinuous-v3", "actor_critic", {}),
    "gru-lunar-lander": ("LunarLander-v3", "actor_critic", {"memory": "gru", "memory_size": 16}),
    "lstm-gaussian": ("LunarLanderContinuous-v3", "actor_critic", {"memory": "lstm", "memory_size": 16}),
    "q-mlp": ("LunarLander-v3", "q_network", {}),
    "q-lstm": ("LunarLander-v3", "q_network", {"memory": "lstm", "memory_size": 16}),
    "minigrid-gru": ("BabyAI-GoToLocal-v0", "actor_critic", {"memory": "gru", "memory_size": 32}),
    "minigrid-without-film": ("BabyAI-GoToLocal-v0", "actor_critic", {"film": False}),
    "q-minigrid-lstm": ("BabyAI-GoToLocal-v0", "q_network", {"memory": "lstm", "memory_size": 32}),
}
"""Every acting network mazerun builds: MLP, minigrid encoder (with and without FiLM), GRU and LSTM, actor-critic
(categorical and Gaussian) and Q-network."""


def checkpoint_of(name: str, directory: Path) -> Path:
    """A checkpoint of the network ``name`` names, built as training builds it (narrower), its weights shaken."""
    env_id, network_type, model = NETWORKS[name]
    env = make_env(env_id)
    kind = "minigrid" if "BabyAI" in env_id else "vector_obs"
    config = ModelConfig(kind=kind, hidden_sizes=(32, 32), activation="relu" if kind == "minigrid" else "tanh",
                         embedding_dim=8, image_channels=(8, 16), mission_dim=16, direction_dim=4, **model)
    vocabulary = sample_mission_vocabulary(env, 0) if kind == "minigrid" else None
    torch.manual_seed(0)
    network = build_network(network_type, config, env.observation_space, env.action_space, vocabulary)
    with torch.no_grad():  # away from the initialisation: FiLM (zero at first) modulates, logits are not all ~0
        for parameter in network.parameters():
            parameter.add_(SHAKE * torch.randn_like(parameter))
    if kind == "vector_obs":
        shape = env.observation_space.shape
        network.set_normalization(torch.randn(shape), torch.rand(shape) + 0.5)  # the graph must standardise
    env.close()
    save_checkpoint(directory / "best.pt", model_state=network.state_dict(),
                    model_config=model_config_dict(config, network_type), observation_space=env.observation_space,
                    action_space=env.action_space, env_id=env_id, algorithm="bc",
                    vocabulary=vocabulary.to_list() if vocabulary else None)
    return directory / "best.pt"


def torch_step(network: torch.nn.Module, batch: object, state: torch.Tensor, starts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The greedy action and the state after of ``act_step``, and the head's raw output, through the network's modules.

    The raw output (not ``Categorical``'s normalised logits, which round again) is what the graph returns.
    """
    if isinstance(network, QNetwork):
        encoder, memory, trunk, head = network.encoder, network.memory, network.trunk, network.head
    else:
        encoder, memory, trunk, head = (network.actor_encoder, network.actor_memory, network.actor_trunk,
                                        network.policy_head)
    with torch.no_grad():
        actions, new_state = network.act_step(batch, state, starts, deterministic=True)
        features = encoder(batch)
        if memory is not None:  # Memory's sequence path, which zeroes the state where an episode starts
            features = memory(features[None], starts[None], state[:, : memory.state_size])[0][0]
        return actions, head(trunk(features)), new_state


def acting_state_size(network: torch.nn.Module) -> int:
    return network.state_size if isinstance(network, QNetwork) else network.actor_state_size


def compare_along_episodes(checkpoint_path: Path, run_exported) -> float:
    """The largest difference between the exported graph and torch over :data:`STEPS` steps of real episodes.

    The torch network acts; the graph is fed the same observations and the same state at every step.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    network = network_from_checkpoint(checkpoint)
    vocabulary = Vocabulary.from_list(checkpoint.vocabulary) if checkpoint.vocabulary else None
    envs = [make_env(checkpoint.env_id, max_episode_steps=EPISODE_STEPS) for _ in range(COPIES)]
    observations = [env.reset(seed=seed)[0] for seed, env in enumerate(envs)]
    state = network.initial_state(COPIES, "cpu")
    starts = torch.ones(COPIES, dtype=torch.bool)
    largest = 0.0
    for _ in range(STEPS):
        stacked = stack(observations)
        batch = obs_to_tensor(stacked, checkpoint.observation_space, vocabulary, "cpu")
        actions, head, state_after = torch_step(network, batch, state, starts)
        acting = acting_state_size(network)  # an actor-critic's graph carries the actor's part alone
        exported = run_exported(stacked, state[:, :acting] if acting else None, starts)
        differences = [(torch.as_tensor(exported[0]) - actions).abs().max(),
                       (torch.as_tensor(exported[1]) - head).abs().max()]
        if acting:
            differences.append((torch.as_tensor(exported[2]) - state_after[:, :acting]).abs().max())
        largest = max(largest, *(float(value) for value in differences))
        state = state_after
        starts = torch.zeros(COPIES, dtype=torch.bool)
        for index, env in enumerate(envs):
            action = actions[index].numpy()
            observations[index], _, terminated, truncated, _ = env.step(int(action) if action.ndim == 0 else action)
            if terminated or truncated:
                observations[index], _ = env.reset()
                starts[index] = True
    return largest


def stack(observations: list) -> object:
    if isinstance(observations[0], dict):
        return {key: [observation[key] for observation in observations] if key == "mission"
                else np.stack([observation[key] for observation in observations]) for key in observations[0]}
    return np.stack(observations)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_network_exports_to_onnx_and_matches_torch_on_real_episodes(name: str, tmp_path: Path) -> None:
    graph_path, json_path = export_policy(load_checkpoint(checkpoint_of(name, tmp_path)), "onnx")
    assert graph_path == tmp_path / "best.onnx" and json_path == tmp_path / "best.onnx.json"
    graph = OnnxGraph(graph_path)

    def run_exported(observations: object, state: torch.Tensor | None, starts: torch.Tensor) -> list[np.ndarray]:
        feed = graph.feed(observations, None if state is None else state.numpy(), starts.numpy())
        return list(graph.run(feed).values())

    assert compare_along_episodes(tmp_path / "best.pt", run_exported) <= TOLERANCE


@pytest.mark.parametrize("name", ["mlp-gaussian", "q-lstm", "minigrid-gru"])
def test_torchscript_exports_match_torch_on_real_episodes(name: str, tmp_path: Path) -> None:
    """TorchScript runs the same acting step; it is traced, so the batch and the mission length must stay free."""
    graph_path, json_path = export_policy(load_checkpoint(checkpoint_of(name, tmp_path)), "torchscript",
                                          tmp_path / "policy.pt")
    description = json.loads(json_path.read_text())
    module = torch.jit.load(str(graph_path))
    vocabulary = Vocabulary.from_list(description["mission"]["vocabulary"]) if description["mission"] else None

    def run_exported(observations: object, state: torch.Tensor | None, starts: torch.Tensor) -> list[torch.Tensor]:
        if vocabulary is None:
            inputs = [torch.as_tensor(observations, dtype=torch.float32)]
        else:
            inputs = [torch.as_tensor(observations["image"]), torch.as_tensor(observations["direction"]),
                      vocabulary.encode(observations["mission"])]
        if state is not None:
            inputs += [state, starts]
        assert [spec["name"] for spec in description["inputs"]][: len(inputs)] == (
            ["observation"] if vocabulary is None else ["image", "direction", "mission"]) + (
            ["state", "episode_start"] if state is not None else [])
        with torch.no_grad():
            return list(module(*inputs))

    assert compare_along_episodes(tmp_path / "best.pt", run_exported) <= TOLERANCE


@pytest.mark.parametrize("name", ["mlp-lunar-lander", "mlp-gaussian"])
def test_policy_onnx_samples_from_the_distribution_the_json_describes(name: str, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(checkpoint_of(name, tmp_path))
    graph_path, _ = export_policy(checkpoint, "onnx")
    env = make_env(checkpoint.env_id)
    observation, _ = env.reset(seed=0)
    policy = OnnxPolicy(str(graph_path), checkpoint.env_id, env.observation_space, env.action_space,
                        deterministic=False)
    policy.reset(env, seed=3)
    samples = np.array([policy.act(observation) for _ in range(4000)])
    policy.reset(env, seed=3)
    assert np.array_equal([policy.act(observation) for _ in range(10)], samples[:10])  # seeded per episode
    network = network_from_checkpoint(checkpoint)
    with torch.no_grad():
        distribution = network.distribution(obs_to_tensor(observation, env.observation_space, None, "cpu"))
    if network.discrete:
        frequencies = np.bincount(samples, minlength=env.action_space.n) / len(samples)
        assert frequencies == pytest.approx(distribution.probs[0].numpy(), abs=0.03)
    else:  # the Gaussian, clipped to [-1, 1]: compare inside the bounds
        expected = torch.clamp(distribution.sample((20000,))[:, 0], -1, 1).numpy()
        assert samples.mean(axis=0) == pytest.approx(expected.mean(axis=0), abs=0.05)
        assert samples.std(axis=0) == pytest.approx(expected.std(axis=0), abs=0.05)
    env.close()


# ------------------------------------------------------------------------------------ through `run`


@pytest.fixture(scope="module")
def gru_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GoToLocal GRU clone trained through `run` on bot episodes, on a tiny budget."""
    root = tmp_path_factory.mktemp("gru")
    run_ok("env=BabyAI-GoToLocal-v0", "policy=bot", "runner.n_episodes=4", f"hydra.run.dir={root / 'bot'}", cwd=root)
    run_ok("-cn", "conf_train", "env=BabyAI-GoToLocal-v0", "model.memory=gru", "model.memory_size=32",
           "model.hidden_sizes=[32]", f"runner.dataset.dir_or_file={root / 'bot' / 'trajectory_data'}",
           "algorithm.n_updates=40", "algorithm.eval_every=40", "runner.eval_repeats=1",
           "algorithm.rollout_len=8", "algorithm.nrollouts=8", f"hydra.run.dir={root / 'train'}", cwd=root)
    return root / "train"


@pytest.fixture(scope="module")
def gru_onnx(gru_run: Path) -> Path:
    result = run_cli(str(gru_run), "--format", "onnx", "--out", str(gru_run / "policy.onnx"), program=EXPORT,
                     cwd=gru_run)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {gru_run / 'policy.onnx'} and {gru_run / 'policy.onnx.json'}")
    return gru_run / "policy.onnx"


WATCH = ["runner.n_episodes=4", "runner.max_episode_steps=30", "runner.n_workers=2"]


def recorded_actions(run_dir: Path) -> list[list[int]]:
    return [record.actions.tolist() for record in load_records(run_dir / "trajectory_data")]


@pytest.mark.parametrize("runner", ["sequential", "parallel"])
def test_policy_onnx_records_the_episodes_torch_policy_records(runner: str, gru_run: Path, gru_onnx: Path,
                                                               workdir: Path) -> None:
    run_ok("policy=torch_policy", f"input_dir={gru_run}", f"runner={runner}", *WATCH, "hydra.run.dir=torch",
           cwd=workdir)
    run_ok("policy=onnx", f"policy.path={gru_onnx}", f"runner={runner}", *WATCH, "hydra.run.dir=onnx", cwd=workdir)
    expected = recorded_actions(workdir / "torch")
    assert len(expected) == 4 and sum(map(len, expected)) > 30
    assert recorded_actions(workdir / "onnx") == expected
    stats = json.loads((workdir / "onnx" / "rollout_stats.json").read_text())
    assert stats["env_id"] == "BabyAI-GoToLocal-v0" and stats["policy"] == "onnx:bc"  # the env came from the JSON


def test_the_interface_json_says_how_to_feed_the_graph(gru_run: Path, gru_onnx: Path, tmp_path: Path) -> None:
    description = json.loads(gru_onnx.with_name("policy.onnx.json").read_text())
    assert description["env_id"] == "BabyAI-GoToLocal-v0" and description["file"] == "policy.onnx"
    assert [(spec["name"], spec["shape"], spec["dtype"]) for spec in description["inputs"]] == [
        ("image", ["batch", 7, 7, 3], "uint8"), ("direction", ["batch"], "int64"),
        ("mission", ["batch", "words"], "int64"), ("state", ["batch", 32], "float32"),
        ("episode_start", ["batch"], "bool")]
    assert [spec["name"] for spec in description["outputs"]] == ["action", "logits", "state_out"]
    assert description["mission"]["vocabulary"] == load_checkpoint(gru_run).vocabulary
    assert description["state"]["size"] == 32 and description["sampling"]["distribution"] == "categorical"
    gaussian = load_checkpoint(checkpoint_of("mlp-gaussian", tmp_path))
    _, json_path = export_policy(gaussian, "torchscript")
    description = json.loads(json_path.read_text())
    assert json_path == tmp_path / "best.torchscript.pt.json" and description["graph"] == "torchscript"
    assert description["sampling"]["log_std"] == pytest.approx(gaussian.model_state["log_std"].tolist())
    assert description["state"] is None and description["mission"] is None


def refused(result: object) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


def test_export_refuses_a_file_that_is_not_a_checkpoint_and_writes_nothing(workdir: Path) -> None:
    (workdir / "notes.txt").write_text("not a checkpoint")
    line = refused(run_cli("notes.txt", "--format", "onnx", program=EXPORT, cwd=workdir))
    assert "notes.txt" in line and "not a mazerun checkpoint" in line
    assert sorted(path.name for path in workdir.iterdir()) == ["notes.txt"]
    line = refused(run_cli(str(workdir / "nowhere"), "--format", "torchscript", program=EXPORT, cwd=workdir))
    assert "does not exist" in line


def test_policy_onnx_refuses_a_missing_path_a_file_that_is_not_onnx_and_an_env_of_other_spaces(
        gru_onnx: Path, workdir: Path) -> None:
    assert "policy=onnx needs policy.path=" in refused(run_cli("policy=onnx", cwd=workdir))
    assert "policy.path=nowhere.onnx does not exist" in refused(run_cli("policy=onnx", "policy.path=nowhere.onnx",
                                                                        cwd=workdir))
    shutil.copy(REPO / "README.md", workdir / "readme.onnx")  # not ONNX, with a valid interface beside it
    shutil.copy(gru_onnx.with_name("policy.onnx.json"), workdir / "readme.onnx.json")
    line = refused(run_cli("policy=onnx", "policy.path=readme.onnx", cwd=workdir))
    assert "readme.onnx is not an ONNX model onnxruntime can load" in line
    shutil.copy(gru_onnx, workdir / "alone.onnx")
    assert "has no alone.onnx.json beside it" in refused(run_cli("policy=onnx", "policy.path=alone.onnx", cwd=workdir))
    line = refused(run_cli("policy=onnx", f"policy.path={gru_onnx}", "env=CartPole-v1", cwd=workdir))
    assert "was exported for observations" in line and "CartPole-v1 has" in line
    assert "env.name=BabyAI-GoToLocal-v0" in line
    assert not list(workdir.glob("outputs/*/*/trajectory_data"))
