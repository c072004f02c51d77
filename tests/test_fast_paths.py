"""The fast paths give what the plain ones give: mazerun's Adam against torch.optim's, the fused PPO and
CQL and BC updates against autograd on the same batches, fused rollouts against the network's own forward."""

from __future__ import annotations

import copy
import dataclasses
import logging
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import run_ok

from mazerun.acting.vector import make_vector_env
from mazerun.algorithms import base, build_algorithm
from mazerun.algorithms.base import BatchAlgorithm, OfflineAlgorithm, resolve_matmul_dtype
from mazerun.algorithms.bc import BCConfig, BehaviouralCloning
from mazerun.algorithms.cql import ConservativeQLearning, CQLBoxConfig, CQLConfig
from mazerun.algorithms.iql import IQLConfig
from mazerun.algorithms.ppo import PPO, PPOConfig
from mazerun.algorithms.protocol import AlgorithmSpec
from mazerun.algorithms.rollouts import RolloutBatch
from mazerun.algorithms.sac import SACConfig, SoftActorCritic
from mazerun.algorithms.td3_bc import TD3BC, TD3BCConfig
from mazerun.core.errors import MazerunError
from mazerun.data.records import NO_LABEL
from mazerun.data.tensors import TransitionBatch
from mazerun.fast import fused
from mazerun.fast.array_actor import ArrayActor, inverse_cdf
from mazerun.fast.fused import FusedActorCritic, fusable
from mazerun.fast.optim import Adam, adam_step, reference_adam_step
from mazerun.nn.checkpoint import save_checkpoint
from mazerun.nn.models import ModelConfig, build_actor_critic, sample_with_noise
from mazerun.training.loops.onpolicy import RolloutBuffer, RolloutCollector

OBSERVATIONS = gym.spaces.Box(-1.0, 1.0, (5,))


def _spec(discrete: bool, hidden: tuple[int, ...] = (16, 16), activation: str = "tanh",
          memory: str = "none") -> AlgorithmSpec:
    actions = gym.spaces.Discrete(3) if discrete else gym.spaces.Box(-1.0, 1.0, (2,))
    return AlgorithmSpec(OBSERVATIONS, actions, ModelConfig(kind="vector_obs", hidden_sizes=hidden,
                                                            activation=activation, memory=memory))


def _ppo(config: PPOConfig, spec: AlgorithmSpec, weights: dict[str, torch.Tensor],
         generator: torch.Generator | None = None) -> PPO:
    """PPO built through the protocol, its network starting from ``weights``."""
    ppo = PPO(config, spec, generator)
    ppo.network.load_state_dict(weights)
    return ppo


def _network(discrete: bool, hidden: tuple[int, ...] = (16, 16), activation: str = "tanh",
             memory: str = "none") -> torch.nn.Module:
    torch.manual_seed(0)
    network = _spec(discrete, hidden, activation, memory).actor_critic()
    network.set_normalization(torch.randn(5) * 0.1, torch.rand(5) + 0.5)
    with torch.no_grad():  # move the heads off their near-zero initialisation so every term matters
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return network


def _batch(discrete: bool, size: int = 64) -> RolloutBatch:
    generator = torch.Generator().manual_seed(1)
    actions = torch.randint(0, 3, (size,), generator=generator) if discrete else torch.randn(size, 2, generator=generator)
    return RolloutBatch(torch.randn(size, 5, generator=generator), actions,
                        torch.randn(size, generator=generator) * 0.3 - 1.0, torch.randn(size, generator=generator),
                        torch.randn(size, generator=generator), torch.randn(size, generator=generator))


# ----------------------------------------------------------------------------------------------- Adam


def test_adam_steps_exactly_as_torch_fused_adam_and_skips_parameters_without_gradients() -> None:
    torch.manual_seed(0)
    ours_model, theirs_model = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    theirs_model.load_state_dict(ours_model.state_dict())
    ours = Adam(ours_model.parameters(), lr=1e-2, eps=1e-5)
    theirs = torch.optim.Adam(theirs_model.parameters(), lr=1e-2, eps=1e-5, fused=True)
    for step in range(3):
        inputs = torch.randn(8, 4)
        for model, optimizer in ((ours_model, ours), (theirs_model, theirs)):
            optimizer.zero_grad(set_to_none=True)
            model(inputs).square().mean().backward()
            if step == 1:
                model.bias.grad = None  # no gradient: left alone, its step count too
            optimizer.step()
    for name, value in ours_model.state_dict().items():
        assert torch.equal(value, theirs_model.state_dict()[name]), name
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert [float(state["step"]) for state in ours_state["state"].values()] == [3.0, 2.0]
    assert ours_state["param_groups"] == theirs_state["param_groups"]
    for index, state in theirs_state["state"].items():
        for key, value in state.items():
            assert torch.equal(ours_state["state"][index][key], value), (index, key)
    # each loads the other's state
    crossed = Adam(theirs_model.parameters(), lr=1.0)
    crossed.load_state_dict(theirs_state)
    assert crossed.param_groups[0]["lr"] == 1e-2
    theirs.load_state_dict(ours_state)


def test_the_fused_kernel_is_the_formula() -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(7) for _ in range(4)]
    fused, reference = [t.clone() for t in tensors], [t.clone() for t in tensors]
    fused[3].abs_()
    reference[3].abs_()
    steps_fused, steps_reference = [torch.tensor(4.0)], [torch.tensor(5.0)]
    adam_step([fused[0]], [fused[1]], [fused[2]], [fused[3]], steps_fused, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-5)
    reference_adam_step([reference[0]], [reference[1]], [reference[2]], [reference[3]], steps_reference, lr=0.1,
                        beta1=0.9, beta2=0.999, eps=1e-5)
    assert float(steps_fused[0]) == 5.0
    for ours, expected in zip(fused, reference):
        torch.testing.assert_close(ours, expected)


# ------------------------------------------------------------------------------------- fused PPO update


@pytest.mark.parametrize("discrete", [True, False], ids=["categorical", "gaussian"])
@pytest.mark.parametrize("hidden,activation,clip_vf", [((16, 16), "tanh", None), ((12,), "relu", 0.2),
                                                       ((), "tanh", None)])
def test_the_fused_update_gives_the_plain_update_on_a_fixed_batch(
    discrete: bool, hidden: tuple[int, ...], activation: str, clip_vf: float | None
) -> None:
    settings = dict(n_epochs=2, batch_size=16, clip_vf=clip_vf, ent_coef=0.05, critic_burn_in_epochs=2)
    start = _network(discrete, hidden, activation).state_dict()
    fused = _ppo(PPOConfig(**settings), _spec(discrete, hidden, activation), start, torch.Generator().manual_seed(2))
    plain = _ppo(PPOConfig(**settings, fused=False), _spec(discrete, hidden, activation), start,
                 torch.Generator().manual_seed(2))
    fused_network, plain_network = fused.network, plain.network
    assert fused.fused is not None and plain.fused is None
    batch = _batch(discrete)
    # critic burn-in, then policy updates: the actor's Adam steps fall behind the critic's
    for _ in range(4):
        ours, expected = fused.update(batch), plain.update(batch)
        assert ours.keys() == expected.keys()
        for name, value in expected.items():
            assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for name, value in plain_network.state_dict().items():
        torch.testing.assert_close(fused_network.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    ours_state, expected_state = fused.optimizer.state_dict(), plain.optimizer.state_dict()
    assert ours_state["param_groups"] == expected_state["param_groups"]
    assert ours_state["state"].keys() == expected_state["state"].keys()
    for index, state in expected_state["state"].items():
        assert float(ours_state["state"][index]["step"]) == float(state["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours_state["state"][index][key], state[key], rtol=1e-4, atol=1e-8)


def test_a_plain_run_s_optimiser_state_continues_on_the_fused_path_and_back() -> None:
    settings = dict(n_epochs=1, batch_size=16, critic_burn_in_epochs=1)
    plain = _ppo(PPOConfig(**settings, fused=False), _spec(True), _network(True).state_dict(),
                 torch.Generator().manual_seed(0))
    plain.update(_batch(True))  # the critic alone: the actor has no state yet
    fused = _ppo(PPOConfig(**settings), _spec(True), plain.network.state_dict(), torch.Generator().manual_seed(0))
    fused.optimizer.load_state_dict(plain.optimizer.state_dict())
    assert fused.optimizer.counts == [0, 4]
    again = _ppo(PPOConfig(**settings, fused=False), _spec(True), plain.network.state_dict())
    again.optimizer.load_state_dict(fused.optimizer.state_dict())
    for index, state in plain.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(again.optimizer.state_dict()["state"][index][key], value)


def test_the_module_reads_and_writes_the_fused_storage() -> None:
    network = _network(False)
    fused = FusedActorCritic(network)
    replacement = _network(False, hidden=(16, 16))
    with torch.no_grad():
        for parameter in replacement.parameters():
            parameter.mul_(1.5)
    network.load_state_dict(replacement.state_dict())  # a checkpoint loaded after fusing lands in the storage
    observations = torch.randn(6, 5)
    out = fused.heads(observations)
    with torch.no_grad():
        torch.testing.assert_close(out.head, network.distribution(observations).mean)
        torch.testing.assert_close(out.values[:, 0], network.value(observations))
        torch.testing.assert_close(out.values[:, 0], replacement.value(observations))
    assert torch.equal(fused.log_std, replacement.log_std.detach())


def test_networks_with_memory_or_images_take_the_plain_path() -> None:
    assert fusable(_network(True))
    assert not fusable(_network(True, memory="gru"))
    ppo = PPO(PPOConfig(imitation_coef=0.5), _spec(True))
    assert ppo.fused is None and isinstance(ppo.optimizer, Adam)


@pytest.mark.parametrize("env_id", ["LunarLander-v3", "LunarLanderContinuous-v3"])
def test_fused_rollouts_act_as_the_network_does(env_id: str) -> None:
    buffers = []
    for fuse in (True, False):
        envs = make_vector_env(env_id, 2, "sync", 30, seed=3)
        try:
            torch.manual_seed(0)
            network = build_actor_critic(ModelConfig(kind="vector_obs", hidden_sizes=(8,)),
                                         envs.single_observation_space, envs.single_action_space)
            with torch.no_grad():
                network.policy_head.weight.mul_(100.0)  # decided actions, so a wrong observation shows
            buffer = RolloutBuffer(40, 2, envs.single_observation_space, envs.single_action_space, torch.device("cpu"))
            RolloutCollector(envs, network, envs.single_observation_space, None, torch.device("cpu"), 0.99,
                             torch.Generator().manual_seed(0),
                             fused=FusedActorCritic(network) if fuse else None).collect(buffer)
            buffers.append(buffer)
        finally:
            envs.close()
    ours, expected = buffers
    torch.testing.assert_close(ours.observations, expected.observations)
    torch.testing.assert_close(ours.actions, expected.actions)
    torch.testing.assert_close(ours.log_probs, expected.log_probs)
    torch.testing.assert_close(ours.values, expected.values)


def test_the_inverse_cdf_draw_by_hand() -> None:
    probabilities = np.array([[0.2, 0.5, 0.3]] * 6, dtype=np.float32)  # cumulative 0.2, 0.7, 1.0
    uniforms = np.array([0.0, 0.19, 0.21, 0.69, 0.71, 0.99], dtype=np.float32)
    assert inverse_cdf(probabilities, uniforms).tolist() == [0, 0, 1, 1, 2, 2]
    categorical = torch.distributions.Categorical(probs=torch.from_numpy(probabilities))
    assert sample_with_noise(categorical, torch.from_numpy(uniforms)).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("discrete", [True, False])
def test_the_array_actor_acts_as_the_network_does_and_sees_new_weights(discrete: bool) -> None:
    network = _network(discrete)
    actor = ArrayActor(FusedActorCritic(network))
    generator = torch.Generator().manual_seed(2)
    observations = torch.randn(9, 5, generator=generator) * 3
    noise = torch.rand(9, generator=generator) if discrete else torch.randn(9, 2, generator=generator)
    for _ in range(2):
        actions, log_probs, values = actor.act(observations.numpy(), noise.numpy())
        with torch.no_grad():
            distribution = network.distribution(observations)
            expected = sample_with_noise(distribution, noise)
            if discrete:
                assert actions.tolist() == expected.tolist() and len(set(actions.tolist())) > 1
            else:
                torch.testing.assert_close(torch.from_numpy(actions), expected)
            torch.testing.assert_close(torch.from_numpy(log_probs), distribution.log_prob(expected))
            torch.testing.assert_close(torch.from_numpy(values), network.value(observations))
        network.load_state_dict(_network(discrete, hidden=(16, 16), activation="tanh").state_dict() | {
            name: value * 1.5 for name, value in network.state_dict().items() if name.endswith("weight")})


def test_training_never_imports_the_compiler() -> None:
    """torch.optim imports torch._dynamo (1.5-2 s of start-up); mazerun's training does without it."""
    script = (
        "import sys, tempfile\n"
        "from pathlib import Path\n"
        "from mazerun.algorithms.ppo import PPOConfig\n"
        "from mazerun.config.schemas import RunConfig, RunnerConfig\n"
        "from mazerun.training.train import train\n"
        "with tempfile.TemporaryDirectory() as directory:\n"
        "    train(RunConfig(algorithm=PPOConfig(n_steps=16, batch_size=16, total_steps=32, eval_every=32),\n"
        "                    runner=RunnerConfig(n_envs=2, max_episode_steps=20, eval_repeats=1),\n"
        "                    model={'hidden_sizes': [8]}, device='cpu'), Path(directory))\n"
        "print(sorted(name for name in sys.modules if name.startswith('torch._dynamo'))[:3])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------------- CQL


def _cql(fused: bool, td_loss: str, matmul_dtype: str = "float32", activation: str = "relu") -> ConservativeQLearning:
    torch.manual_seed(0)
    algorithm = ConservativeQLearning(
        CQLConfig(fused=fused, td_loss=td_loss, alpha=0.7, gamma=0.9, target_update_interval=2,
                  matmul_dtype=matmul_dtype),
        AlgorithmSpec(OBSERVATIONS, gym.spaces.Discrete(3),
                      ModelConfig(kind="vector_obs", hidden_sizes=(16, 16), activation=activation)))
    algorithm.set_normalization(torch.randn(5) * 0.1, torch.rand(5) + 0.5)
    return algorithm


def _transitions(generator: torch.Generator, size: int = 32) -> TransitionBatch:
    return TransitionBatch(torch.randn(size, 5, generator=generator) * 2, torch.randint(0, 3, (size,), generator=generator),
                           torch.randn(size, generator=generator) * 3, torch.randn(size, 5, generator=generator) * 2,
                           (torch.rand(size, generator=generator) < 0.2).float(), None)


@pytest.mark.parametrize("td_loss", ["huber", "mse"])
def test_the_fused_cql_step_gives_the_autograd_step(td_loss: str) -> None:
    """Five steps (two target copies) on the same batches: same metrics, weights, targets and Adam moments."""
    fused, plain = _cql(True, td_loss), _cql(False, td_loss)
    assert fused.stack is not None and plain.stack is None
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        batch = _transitions(generator)
        ours, expected = fused.update(batch), plain.update(batch)
        for name, value in expected.items():
            assert torch.allclose(ours[name], value, rtol=1e-5, atol=1e-5), name
    for attribute in ("network", "target_network"):
        ours_state, expected_state = getattr(fused, attribute).state_dict(), getattr(plain, attribute).state_dict()
        for key, value in expected_state.items():
            assert torch.allclose(ours_state[key], value, atol=1e-5), f"{attribute}.{key}"
    for key, state in plain.optimizer.state_dict()["state"].items():
        for entry, value in state.items():
            assert torch.allclose(fused.optimizer.state_dict()["state"][key][entry], value, atol=1e-6), entry
    (trained, chooser), target = fused.stack._workspaces[32], fused.stack.target.workspace(32)
    assert trained.out_grad is not None and len(trained.hidden_grad) == 2  # only the pass trained through
    assert all(not workspace.hidden_grad and workspace.out_grad is None for workspace in (chooser, target))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_bfloat16_cql_step_errs_from_float32_no_more_than_torch_autocast(activation: str) -> None:
    """bfloat16 products round each hidden activation to 8 bits of mantissa, so the gradient moves off the
    float32 one (most where ReLUs sit near their kink): by no more than autograd under torch.autocast's
    bfloat16 moves it on the same batch. What is stored stays float32."""
    low, plain, autocast = (_cql(True, "huber", "bfloat16", activation), _cql(False, "huber", activation=activation),
                            _cql(False, "huber", activation=activation))
    assert low.stack is not None and low.stack.online.hidden_dtype == torch.bfloat16
    batch = _transitions(torch.Generator().manual_seed(3), size=256)
    ours, expected = low.update(batch), plain.update(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast.update(batch)
    for name, value in expected.items():
        assert torch.allclose(ours[name], value, rtol=1e-2, atol=1e-2), name
    gradients = [torch.cat([parameter.grad.flatten() for parameter in algorithm.network.parameters()])
                 for algorithm in (low, plain, autocast)]
    error, autocast_error = ((gradient - gradients[1]).norm() / gradients[1].norm() for gradient in
                             (gradients[0], gradients[2]))
    assert 0 < error <= 1.25 * autocast_error and error < 0.05
    assert low.stack.target.workspace(256).head_inputs_grad is None and not low.stack.target.workspace(256).weight_grads
    assert all(parameter.dtype == torch.float32 for parameter in low.network.parameters())


def test_bfloat16_products_need_the_fused_step() -> None:
    with pytest.raises(MazerunError, match=r"algorithm.matmul_dtype=bfloat16 needs the fused step"):
        CQLConfig(fused=False, matmul_dtype="bfloat16").check()
    with pytest.raises(MazerunError, match=r"algorithm.matmul_dtype='float16' is unknown; use auto, float32, bfloat16"):
        CQLConfig(matmul_dtype="float16").check()


def test_bfloat16_products_on_a_cpu_that_lacks_them_warn_once(monkeypatch, caplog) -> None:
    """Without AVX512-BF16 or AMX torch multiplies bfloat16 with a scalar loop, ~20x slower than float32."""
    monkeypatch.setattr(fused, "native_low_precision", lambda dtype, device: dtype == torch.float32)
    monkeypatch.setattr(fused, "_warned_slow_dtypes", set())
    with caplog.at_level(logging.WARNING, logger="mazerun.fast.fused"):
        _cql(True, "huber")
        assert not caplog.records
        for _ in range(2):
            _cql(True, "huber", "bfloat16")
    assert [record.getMessage() for record in caplog.records] == [
        "algorithm.matmul_dtype=bfloat16: this cpu has no native bfloat16 matrix products (AVX512-BF16 or AMX), so "
        "they run many times slower than float32's; set algorithm.matmul_dtype=float32"]


def test_a_copy_of_a_fused_cql_learner_trains_its_own_weights_and_checkpoints_hold_no_storage_around_them(
        tmp_path) -> None:
    original = _cql(True, "huber")
    before = [parameter.clone() for parameter in original.network.parameters()]
    copied = copy.deepcopy(original)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        copied.update(_transitions(generator))
    assert all(torch.equal(old, now) for old, now in zip(before, original.network.parameters()))
    assert not any(torch.equal(old, now) for old, now in zip(before, copied.network.parameters()))
    state = copied.network.state_dict()
    save_checkpoint(tmp_path / "q.pt", model_state=state, model_config={}, observation_space=OBSERVATIONS,
                    action_space=gym.spaces.Discrete(3), env_id="none", algorithm="cql")
    saved = torch.load(tmp_path / "q.pt", weights_only=True)["model_state"]
    for key, value in state.items():  # each tensor saved alone, not the flat storage it is a view of
        assert saved[key].untyped_storage().nbytes() == value.numel() * value.element_size(), key
        assert torch.equal(saved[key], value)


# -------------------------------------------------------------------------------------------- BC


def _bc(fused: bool) -> BehaviouralCloning:
    torch.manual_seed(0)
    algorithm = BehaviouralCloning(BCConfig(fused=fused), AlgorithmSpec(
        OBSERVATIONS, gym.spaces.Discrete(3), ModelConfig(kind="vector_obs", hidden_sizes=(16, 16))))
    algorithm.set_normalization(torch.randn(5) * 0.1, torch.rand(5) + 0.5)
    return algorithm


@pytest.mark.parametrize("labelled", [False, True])
def test_the_fused_bc_step_gives_the_autograd_step(labelled: bool) -> None:
    """Four steps on the same batches, with DAgger's expert labels (some missing) or the actions taken."""
    fused, plain = _bc(True), _bc(False)
    assert fused.stack is not None and plain.stack is None
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        batch = _transitions(generator)
        if labelled:
            labels = torch.randint(0, 3, (32,), generator=generator)
            labels[::5] = NO_LABEL
            batch = batch._replace(expert_actions=labels)
        ours, expected = fused.update(batch), plain.update(batch)
        assert ours.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.allclose(ours[name], value, rtol=1e-5, atol=1e-6), name
    expected_state = plain.network.state_dict()
    for key, value in fused.network.state_dict().items():
        assert torch.allclose(value, expected_state[key], atol=1e-6), key


# ------------------------------------------------------------------ the fast path checks itself against the loss


@pytest.mark.parametrize("build", [lambda: _bc(True), lambda: _cql(True, "huber"),
                                   lambda: _cql(True, "huber", matmul_dtype="bfloat16")], ids=["bc", "cql", "cql-bf16"])
def test_a_faithful_fast_path_passes_its_check_and_the_check_changes_nothing(build) -> None:
    checked, unchecked = build(), build()
    batch = _transitions(torch.Generator().manual_seed(4))
    assert checked.check_fast_path(batch) is None and checked.stack is not None
    for _ in range(3):
        batch = _transitions(torch.Generator().manual_seed(5))
        checked.update(batch), unchecked.update(batch)
    expected = unchecked.network.state_dict()
    for key, value in checked.network.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_an_edited_loss_is_caught_at_the_first_batch_and_training_follows_the_edit(monkeypatch) -> None:
    """A researcher doubles CQL's conservative term in the readable loss and leaves the hand-written gradient."""
    import mazerun.algorithms.cql as cql

    readable = cql.conservative_loss
    monkeypatch.setattr(cql, "conservative_loss", lambda q_values, actions: 2 * readable(q_values, actions))
    fused, plain = _cql(True, "huber"), _cql(False, "huber")
    line = fused.check_fast_path(_transitions(torch.Generator().manual_seed(4)))
    assert line is not None and "\n" not in line
    assert "cql's hand-written gradient differs from autograd of its loss (losses())" in line and "training on autograd" in line
    assert fused.stack is None
    for seed in range(3):  # from here on the edited loss is what trains
        batch = _transitions(torch.Generator().manual_seed(seed))
        ours, expected = fused.update(batch), plain.update(batch)
        assert torch.equal(ours["conservative_loss"], expected["conservative_loss"])
    expected_state = plain.network.state_dict()
    for key, value in fused.network.state_dict().items():
        assert torch.allclose(value, expected_state[key], atol=1e-6), key


def test_an_edited_bc_loss_is_caught_in_a_real_run_and_said_in_one_line(workdir, monkeypatch, caplog) -> None:
    """Through the training entry the CLI calls (in process, so the edit can be made), on recorded episodes."""
    import mazerun.algorithms.bc as bc
    from mazerun.config.schemas import DatasetConfig, RunConfig, RunnerConfig
    from mazerun.training.train import train

    run_ok("runner.n_episodes=2", "runner.max_episode_steps=50", "hydra.run.dir=demos", cwd=workdir)
    readable = bc.imitation_loss
    monkeypatch.setattr(bc, "imitation_loss", lambda *args, **kwargs: (lambda loss, metrics: (loss * 3, metrics))(
        *readable(*args, **kwargs)))
    config = RunConfig(runner=RunnerConfig(dataset=DatasetConfig(dir_or_file=str(workdir / "demos" / "trajectory_data")),
                                           eval_repeats=1), algorithm=BCConfig(n_updates=3, eval_every=3))
    with caplog.at_level("WARNING"):
        train(config, workdir / "bc")
    lines = [record.getMessage() for record in caplog.records if "differs from autograd" in record.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("bc's hand-written gradient differs from autograd of its loss (losses())")


def test_ppo_s_faithful_fast_path_passes_its_check_and_the_check_changes_nothing() -> None:
    settings = dict(n_epochs=2, batch_size=16, ent_coef=0.05)
    start = _network(True).state_dict()
    checked = _ppo(PPOConfig(**settings), _spec(True), start, torch.Generator().manual_seed(2))
    unchecked = _ppo(PPOConfig(**settings), _spec(True), start, torch.Generator().manual_seed(2))
    batch = _batch(True)
    assert checked.check_fast_path(batch) is None and checked.fused is not None
    assert checked.update(batch) == unchecked.update(batch)
    expected = unchecked.network.state_dict()
    for key, value in checked.network.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("discrete", [True, False], ids=["categorical", "gaussian"])
def test_an_edited_ppo_loss_is_caught_and_training_follows_the_edit(discrete: bool, monkeypatch) -> None:
    """A researcher halves the value loss in ppo_terms and leaves clipped_surrogate_gradient as it was."""
    import mazerun.algorithms.ppo as ppo

    readable = ppo.ppo_terms
    monkeypatch.setattr(ppo, "ppo_terms", lambda *args: readable(*args)._replace(
        value_loss=0.5 * readable(*args).value_loss))
    settings = dict(n_epochs=2, batch_size=16, ent_coef=0.05)
    start = _network(discrete).state_dict()
    fused = _ppo(PPOConfig(**settings), _spec(discrete), start, torch.Generator().manual_seed(2))
    plain = _ppo(PPOConfig(**settings, fused=False), _spec(discrete), start, torch.Generator().manual_seed(2))
    batch = _batch(discrete)
    line = fused.check_fast_path(batch)
    assert line is not None and "\n" not in line and line.startswith("ppo's hand-written gradient differs")
    assert fused.fused is None and fused.fast_actor is None and isinstance(fused.optimizer, Adam)
    for _ in range(2):
        ours, expected = fused.update(batch), plain.update(batch)
        for name, value in expected.items():
            assert ours[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    expected_state = plain.network.state_dict()
    for key, value in fused.network.state_dict().items():
        assert torch.allclose(value, expected_state[key], atol=1e-6), key


def test_an_edited_ppo_loss_is_caught_in_a_real_run_and_said_in_one_line(workdir, monkeypatch, caplog) -> None:
    import mazerun.algorithms.ppo as ppo
    from mazerun.config.schemas import RunConfig, RunnerConfig
    from mazerun.training.train import train

    readable = ppo.ppo_terms
    # the policy term: at a fresh near-uniform policy the entropy's gradient is too small to tell an edit of it
    monkeypatch.setattr(ppo, "ppo_terms",
                        lambda *args: readable(*args)._replace(policy_loss=1.5 * readable(*args).policy_loss))
    config = RunConfig(runner=RunnerConfig(eval_repeats=1, n_envs=2),
                       algorithm=PPOConfig(total_steps=128, n_steps=32, batch_size=16, eval_every=128))
    with caplog.at_level("WARNING"):
        train(config, workdir / "ppo")
    lines = [record.getMessage() for record in caplog.records if "differs from autograd" in record.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("ppo's hand-written gradient differs from autograd")


# -------------------------------------------------------------------------------------------- SAC


def _sac(fused: bool, activation: str = "tanh", ent_coef: str = "auto_0.3", matmul_dtype: str = "float32"
         ) -> SoftActorCritic:
    """A tiny SAC learner (asymmetric action box) whose networks standardise observations with fixed statistics."""
    torch.manual_seed(0)
    actions = gym.spaces.Box(np.array([-1.0, -2.0], np.float32), np.array([1.0, 0.5], np.float32))
    model = ModelConfig(kind="vector_obs", hidden_sizes=(16, 16), activation=activation)
    algorithm = SoftActorCritic(SACConfig(fused=fused, ent_coef=ent_coef, gamma=0.9, tau=0.1, matmul_dtype=matmul_dtype),
                                AlgorithmSpec(OBSERVATIONS, actions, model), torch.Generator().manual_seed(3))
    mean, std = torch.randn(5) * 0.1, torch.rand(5) + 0.5
    for network in (algorithm.network, algorithm.critic, algorithm.critic_target):
        network.set_normalization(mean, std)
    return algorithm


def _box_transitions(generator: torch.Generator, size: int = 32) -> TransitionBatch:
    return TransitionBatch(torch.randn(size, 5, generator=generator) * 2,
                           torch.rand(size, 2, generator=generator) - 0.5,
                           torch.randn(size, generator=generator) * 3, torch.randn(size, 5, generator=generator) * 2,
                           (torch.rand(size, generator=generator) < 0.2).float(), None)


def _assert_same_state(ours: BatchAlgorithm, expected: BatchAlgorithm) -> None:
    """Every network (weights, targets, statistics) and every optimiser's state alike."""
    for attribute, value in vars(expected).items():
        if isinstance(value, torch.nn.Module):
            for key, tensor in value.state_dict().items():
                assert torch.allclose(getattr(ours, attribute).state_dict()[key], tensor, atol=1e-6), f"{attribute}.{key}"
    for attribute in expected.optimizers():
        ours_state, expected_state = getattr(ours, attribute).state_dict(), getattr(expected, attribute).state_dict()
        assert ours_state["state"].keys() == expected_state["state"].keys(), attribute
        for index, state in expected_state["state"].items():
            for name, value in state.items():
                assert torch.allclose(ours_state["state"][index][name], value, atol=1e-6), f"{attribute}.{index}.{name}"


def _assert_same_updates(fused: BatchAlgorithm, plain: BatchAlgorithm) -> None:
    """Five updates on the same batches: the same metrics, then the same state (:func:`_assert_same_state`)."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        batch = _box_transitions(generator)
        ours, expected = fused.update(batch), plain.update(batch)
        assert ours.keys() == expected.keys()
        for metric, value in expected.items():
            assert torch.allclose(ours[metric], value, rtol=1e-5, atol=1e-6), metric
    _assert_same_state(fused, plain)


@pytest.mark.parametrize("activation,ent_coef", [("tanh", "auto_0.3"), ("relu", "auto_0.3"), ("tanh", "0.2")])
def test_the_stacked_sac_update_gives_the_autograd_update(activation: str, ent_coef: str) -> None:
    """Five updates (five target updates) on the same batches: the same metrics, weights, targets, temperature and
    Adam moments as autograd of critic_loss and actor_loss with their Adam steps."""
    fused, plain = _sac(True, activation, ent_coef), _sac(False, activation, ent_coef)
    assert fused.stacks is not None and plain.stacks is None
    _assert_same_updates(fused, plain)


def test_the_stacked_sac_gradients_are_autograd_s_where_the_log_std_clamp_holds() -> None:
    """A log-std pushed past its upper bound: no gradient flows through the clamped entries, as autograd's. (At the
    lower bound, sigma = 2e-9, autograd's own gradient in the mean is float32 rounding of two terms of 1e9 that
    cancel; the hand-written one has them cancelled in the formula.)"""
    fused = _sac(True)
    with torch.no_grad():
        fused.network.log_std_head.bias.copy_(torch.tensor([30.0, 0.0]))
    assert fused.check_fast_path(_box_transitions(torch.Generator().manual_seed(4))) is None
    assert fused.stacks is not None


def test_optimiser_states_move_between_the_stacked_and_the_plain_sac() -> None:
    """A checkpoint's training state of either path continues on the other: its layout is unchanged."""
    generator = torch.Generator().manual_seed(2)
    for source_fused in (True, False):
        source, target, reference = _sac(source_fused), _sac(not source_fused), _sac(source_fused)
        for _ in range(2):
            batch = _box_transitions(generator)
            source.update(batch), reference.update(batch)
        target.network.load_state_dict(source.network.state_dict())
        target.load_training_state(source.training_state(), 0)
        target.generator.set_state(source.generator.get_state())
        batch = _box_transitions(generator)
        target.update(batch), reference.update(batch)
        _assert_same_state(target, reference)


def test_the_sac_check_passes_changes_nothing_and_leaves_the_generator_where_it_was() -> None:
    checked, unchecked = _sac(True), _sac(True)
    assert checked.check_fast_path(_box_transitions(torch.Generator().manual_seed(4))) is None
    assert checked.stacks is not None
    assert torch.equal(checked.generator.get_state(), unchecked.generator.get_state())
    for seed in range(3):
        batch = _box_transitions(torch.Generator().manual_seed(seed))
        checked.update(batch), unchecked.update(batch)
    _assert_same_state(checked, unchecked)


@pytest.mark.parametrize("edit", ["actor", "critic"])
def test_an_edited_sac_loss_is_caught_at_the_first_batch_and_training_follows_the_edit(edit: str, monkeypatch) -> None:
    """A researcher doubles the entropy term of soft_actor_loss, or scales critic_loss, and leaves the gradients."""
    import mazerun.algorithms.sac as sac

    if edit == "actor":
        monkeypatch.setattr(sac, "soft_actor_loss", lambda critic, observations, actions, log_probs, alpha: (
            (2 * alpha * log_probs - critic(observations, actions).min(dim=0).values).mean()))
    else:
        readable = sac.SoftActorCritic.critic_loss
        monkeypatch.setattr(sac.SoftActorCritic, "critic_loss",
                            lambda self, batch: (lambda loss, metrics: (3 * loss, metrics))(*readable(self, batch)))
    fused, plain = _sac(True), _sac(False)
    line = fused.check_fast_path(_box_transitions(torch.Generator().manual_seed(4)))
    assert line is not None and "\n" not in line
    assert "sac's hand-written gradient differs from autograd of its loss" in line and "training on autograd" in line
    assert fused.stacks is None
    for seed in range(3):  # from here on the edited loss is what trains
        batch = _box_transitions(torch.Generator().manual_seed(seed))
        fused.update(batch), plain.update(batch)
    _assert_same_state(fused, plain)


# -------------------------------------------------------------------------------------- TD3+BC, IQL and CQL on Box actions


def _box_learner(name: str, fused: bool, activation: str = "tanh", matmul_dtype: str = "float32") -> OfflineAlgorithm:
    """A tiny TD3+BC, continuous IQL or continuous CQL learner (asymmetric action box), its networks standardising
    observations with fixed statistics, as the offline loop sets them."""
    torch.manual_seed(0)
    actions = gym.spaces.Box(np.array([-1.0, -2.0], np.float32), np.array([1.0, 0.5], np.float32))
    spec = AlgorithmSpec(OBSERVATIONS, actions, ModelConfig(kind="vector_obs", hidden_sizes=(16, 16),
                                                            activation=activation))
    if name == "td3_bc":
        algorithm = TD3BC(TD3BCConfig(fused=fused, gamma=0.9, tau=0.1, lr=1e-3, matmul_dtype=matmul_dtype), spec,
                          torch.Generator().manual_seed(3))
    elif name == "iql":
        algorithm = build_algorithm(IQLConfig(fused=fused, gamma=0.9, tau=0.1, lr=1e-3, matmul_dtype=matmul_dtype),
                                    spec, torch.Generator().manual_seed(3))
    else:
        box = CQLBoxConfig(alpha=2.0, actor_lr=1e-3, tau=0.1, n_action_samples=3)
        algorithm = build_algorithm(CQLConfig(fused=fused, gamma=0.9, lr=1e-3, matmul_dtype=matmul_dtype, box=box),
                                    spec, torch.Generator().manual_seed(3))
    algorithm.set_normalization(torch.randn(5) * 0.1, torch.rand(5) + 0.5)
    return algorithm


@pytest.mark.parametrize("name,activation", [("td3_bc", "tanh"), ("td3_bc", "relu"), ("iql", "relu"), ("cql", "tanh"),
                                             ("cql", "relu")])
def test_the_stacked_box_update_gives_the_autograd_update(name: str, activation: str) -> None:
    """Five updates (TD3+BC's actor and targets move on updates 0, 2 and 4) on the same batches: the same metrics,
    weights, targets and Adam moments as autograd of the readable losses."""
    fused, plain = _box_learner(name, True, activation), _box_learner(name, False, activation)
    assert fused.stack is not None and plain.stack is None
    assert fused.check_fast_path(_box_transitions(torch.Generator().manual_seed(4))) is None
    _assert_same_updates(fused, plain)


def test_a_copy_of_a_stacked_td3_bc_learner_trains_its_own_weights() -> None:
    original = _box_learner("td3_bc", True)
    clone = copy.deepcopy(original)
    before = copy.deepcopy(original.network.state_dict())
    clone.update(_box_transitions(torch.Generator().manual_seed(0)))
    assert all(torch.equal(before[key], value) for key, value in original.network.state_dict().items())
    assert not all(torch.equal(before[key], value) for key, value in clone.network.state_dict().items())


@pytest.mark.parametrize("name,edit", [("td3_bc", "losses"), ("td3_bc", "actor_loss"), ("iql", "losses"),
                                       ("cql", "losses"), ("cql", "actor_loss")])
def test_an_edited_box_loss_is_caught_at_the_first_batch_and_training_follows_the_edit(name: str, edit: str) -> None:
    """A researcher scales one phase's loss (or, in TD3+BC's actor, its cloning term) and leaves the fast path."""
    fused = _box_learner(name, True)
    readable = getattr(type(fused), edit)
    setattr(fused, edit, lambda batch: (lambda loss, metrics: (1.5 * loss, metrics))(*readable(fused, batch)))
    line = fused.check_fast_path(_box_transitions(torch.Generator().manual_seed(4)))
    assert line is not None and "\n" not in line
    assert f"{name}'s hand-written gradient differs from autograd of its loss ({edit}())" in line
    assert fused.stack is None
    plain = _box_learner(name, False)
    setattr(plain, edit, lambda batch: (lambda loss, metrics: (1.5 * loss, metrics))(*readable(plain, batch)))
    batch = _box_transitions(torch.Generator().manual_seed(5))
    fused.update(batch), plain.update(batch)
    _assert_same_state(fused, plain)


# ------------------------------------------------------------------- bfloat16 products in the Box learners' stacks


def _low_precision_box(name: str, matmul_dtype: str = "float32", activation: str = "relu") -> BatchAlgorithm:
    """A tiny SAC, TD3+BC, IQL or CQL learner: on its stacks with bfloat16 products, or on the float32 autograd
    path."""
    low = matmul_dtype != "float32"
    if name == "sac":
        return _sac(low, activation, matmul_dtype=matmul_dtype)
    return _box_learner(name, low, activation, matmul_dtype)


def _autograd_gradients(algorithm: BatchAlgorithm, batch: TransitionBatch) -> torch.Tensor:
    """Autograd of every phase's readable loss at the current weights, one vector, drawn as the fast path's check
    draws (SAC's two losses one after the other, each offline phase from the same state); the generator is left
    where it was."""
    drawn, gradients = algorithm.generator_state(), []
    for phase in _fast_phases(algorithm):
        if not isinstance(algorithm, SoftActorCritic):
            algorithm.restore_generator(drawn)
        parameters = [parameter for group in getattr(algorithm, phase.optimizer).param_groups
                      for parameter in group["params"]]
        loss, _ = getattr(algorithm, phase.loss)(batch)
        gradients += [torch.zeros_like(parameter) if grad is None else grad for parameter, grad in
                      zip(parameters, torch.autograd.grad(loss, parameters, allow_unused=True))]
    algorithm.restore_generator(drawn)
    return torch.cat([gradient.flatten() for gradient in gradients])


def _fast_phases(algorithm: BatchAlgorithm) -> list:
    """The phases with a hand-written gradient: SAC's all, an offline learner's :attr:`fused_phases`."""
    if isinstance(algorithm, SoftActorCritic):
        return list(algorithm.phases)
    return [phase for phase in algorithm.phases if phase.loss in algorithm.fused_phases]


def _stacks(algorithm: BatchAlgorithm) -> list:
    """The learner's stacked networks, critics first."""
    stacks = algorithm.stacks if isinstance(algorithm, SoftActorCritic) else algorithm.stack
    return [stacks] if stacks is None or not isinstance(stacks, tuple) else list(stacks)


def _fast_gradients(algorithm: BatchAlgorithm, batch: TransitionBatch) -> torch.Tensor:
    """The stacks' hand-written gradients of every phase, in :func:`_autograd_gradients`' order."""
    if isinstance(algorithm, SoftActorCritic):
        fast = algorithm.fast_path_gradients(batch)[0]
    else:
        fast = [gradient for phase in _fast_phases(algorithm) for gradient in algorithm.phase_gradients(phase, batch)[0]]
    return torch.cat([gradient.flatten() for gradient in fast])


@pytest.mark.parametrize("name", ["sac", "td3_bc", "iql", "cql"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_a_bfloat16_box_step_errs_from_float32_no_more_than_torch_autocast(name: str, activation: str) -> None:
    """On 256 transitions, every phase's hand-written gradient with bfloat16 products is off autograd's float32 one by
    no more than autograd under torch.autocast's bfloat16 is; weights and Adam stay float32, and an update's metrics
    stay within 2% of the float32 ones."""
    low, plain = _low_precision_box(name, "bfloat16", activation), _low_precision_box(name, "float32", activation)
    stacks = _stacks(low)  # the critics', then the actor's where the learner stacks it
    assert stacks[0].critic.hidden_dtype == torch.bfloat16
    assert all(stack.actor.hidden_dtype == torch.bfloat16 for stack in stacks[1:2])
    batch = _box_transitions(torch.Generator().manual_seed(3), size=256)
    exact, fast = _autograd_gradients(plain, batch), _fast_gradients(low, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _autograd_gradients(plain, batch)
    error, autocast_error = ((gradient - exact).norm() / exact.norm() for gradient in (fast, autocast))
    assert 0 < error <= 1.25 * autocast_error and error < 0.1
    ours, expected = low.update(batch), plain.update(batch)
    for metric, value in expected.items():
        assert torch.allclose(ours[metric], value, rtol=2e-2, atol=2e-2), metric
    assert all(parameter.dtype == torch.float32 for parameter in [*low.network.parameters(), *low.critic.parameters()])


@pytest.mark.parametrize("name", ["sac", "td3_bc", "iql", "cql"])
def test_a_faithful_bfloat16_box_step_passes_its_check_through_a_float32_twin(name: str) -> None:
    """The twin's float32 hand-written gradients are held to autograd; the learner keeps its bfloat16 stacks and its
    generator, and trains on as the unchecked one does."""
    checked, unchecked = _low_precision_box(name, "bfloat16"), _low_precision_box(name, "bfloat16")
    assert checked.check_fast_path(_box_transitions(torch.Generator().manual_seed(4))) is None
    stacks = _stacks(checked)
    assert stacks[0] is not None and stacks[0].critic.hidden_dtype == torch.bfloat16
    assert torch.equal(checked.generator.get_state(), unchecked.generator.get_state())
    for seed in range(2):
        batch = _box_transitions(torch.Generator().manual_seed(seed))
        checked.update(batch), unchecked.update(batch)
    _assert_same_state(checked, unchecked)


@pytest.mark.parametrize("name,loss", [("sac", "critic_loss"), ("td3_bc", "actor_loss"), ("iql", "losses"),
                                       ("cql", "losses"), ("cql", "actor_loss")])
def test_an_edited_box_loss_is_caught_under_bfloat16_products(name: str, loss: str, monkeypatch) -> None:
    """bfloat16's rounding (percents of a gradient) would hide a small edit; the float32 twin does not."""
    algorithm = _low_precision_box(name, "bfloat16")
    readable = getattr(type(algorithm), loss)
    monkeypatch.setattr(type(algorithm), loss,
                        lambda self, batch: (lambda value, metrics: (1.05 * value, metrics))(*readable(self, batch)))
    line = algorithm.check_fast_path(_box_transitions(torch.Generator().manual_seed(4)))
    assert line is not None and "\n" not in line and "differs from autograd of its loss" in line
    assert _stacks(algorithm) == [None]


def test_auto_products_are_bfloat16_only_in_a_box_learner_s_fused_step_on_a_cpu_that_has_them(monkeypatch) -> None:
    box, discrete, cpu = gym.spaces.Box(-1.0, 1.0, (2,)), gym.spaces.Discrete(3), torch.device("cpu")
    vector = ModelConfig(kind="vector_obs")
    for native in (True, False):
        monkeypatch.setattr(base, "native_low_precision", lambda dtype, device, native=native: native)
        for config in (SACConfig(), TD3BCConfig(), IQLConfig(), CQLConfig()):
            assert config.matmul_dtype == "auto"
            resolved = resolve_matmul_dtype(config, box, vector, cpu)
            assert resolved.matmul_dtype == ("bfloat16" if native else "float32"), config.name
            assert dataclasses.replace(resolved, matmul_dtype="auto") == config  # every other setting kept
    # where the CPU has them: float32 for the discrete variants (returns not measured), the autograd path, a network
    # with memory and a GPU; an explicit choice is kept as it is
    for config, actions, model, device in ((CQLConfig(), discrete, vector, cpu), (IQLConfig(), discrete, vector, cpu),
                                           (TD3BCConfig(fused=False), box, vector, cpu),
                                           (CQLConfig(), box, ModelConfig(kind="vector_obs", memory="gru"), cpu),
                                           (SACConfig(), box, vector, torch.device("cuda"))):
        assert resolve_matmul_dtype(config, actions, model, device).matmul_dtype == "float32"
    explicit = TD3BCConfig(matmul_dtype="float32")
    assert resolve_matmul_dtype(explicit, box, vector, cpu) is explicit
    assert base.product_dtype(TD3BCConfig()) == torch.float32  # a learner built without run: auto unresolved
    TD3BCConfig(fused=False).check()  # auto needs no fused step


def test_bfloat16_box_products_are_refused_where_they_cannot_run() -> None:
    for config in (SACConfig(fused=False, matmul_dtype="bfloat16"), TD3BCConfig(fused=False, matmul_dtype="bfloat16"),
                   IQLConfig(fused=False, matmul_dtype="bfloat16")):
        with pytest.raises(MazerunError, match=r"^algorithm.matmul_dtype=bfloat16 needs the fused step; set "
                                               r"algorithm.fused=true or algorithm.matmul_dtype=float32$"):
            config.check()
    with pytest.raises(MazerunError, match=r"algorithm.matmul_dtype='half' is unknown; use auto, float32, bfloat16"):
        TD3BCConfig(matmul_dtype="half").check()
    with pytest.raises(MazerunError, match=r"^algorithm.matmul_dtype=bfloat16 applies to IQL's 1-D Box variant "
                                           r"only \(the discrete-action one has no fused step\); use "
                                           r"algorithm.matmul_dtype=float32$"):
        IQLConfig(matmul_dtype="bfloat16").check_spaces(OBSERVATIONS, gym.spaces.Discrete(3))
