"""AgileRL's side of bench/evolution.py, run with the interpreter that has agilerl (its own venv).

    /work/agilerl-venv/bin/python bench/agilerl_offline_peer.py --dataset data.h5 [--population 4] ...

Reads the HDF5 file mazerun exported (observations, next_observations, actions, rewards,
terminals), puts every transition in AgileRL's ReplayBuffer at once, and runs the loop of
AgileRL's offline tutorial (seed 003 / ``train_offline``): each agent learns ``--evo-steps``
batches, every agent is tested for ``--eval-loop`` episodes, then ``TournamentSelection`` and
``Mutations``. The best agent ever tested is kept and played greedily on ``--test-episodes``
episodes seeded ``--seed-offset + i``. Prints one JSON line: wall seconds (dataset load to end
of search), the elite's mean return, its fitness and the learn steps per agent.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import gymnasium as gym
import h5py
import numpy as np
import torch

warnings.filterwarnings("ignore")

from agilerl.algorithms.core.registry import HyperparameterConfig, RLParameter  # noqa: E402
from agilerl.components.data import Transition  # noqa: E402
from agilerl.components.replay_buffer import ReplayBuffer  # noqa: E402
from agilerl.hpo.mutation import Mutations  # noqa: E402
from agilerl.hpo.tournament import TournamentSelection  # noqa: E402
from agilerl.utils.utils import create_population  # noqa: E402

ENV_ID = "LunarLander-v3"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--evo-steps", type=int, default=2000)
    parser.add_argument("--eval-loop", type=int, default=10)
    parser.add_argument("--test-episodes", type=int, default=100)
    parser.add_argument("--seed-offset", type=int, default=2_000_000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    start = time.perf_counter()
    with h5py.File(args.dataset, "r") as file:
        columns = {name: np.asarray(file[name][()]) for name in
                   ("observations", "next_observations", "actions", "rewards", "terminals")}
    count = len(columns["rewards"])
    transitions = Transition(
        obs=columns["observations"].astype(np.float32), action=columns["actions"].astype(np.int64),
        reward=columns["rewards"].astype(np.float32), next_obs=columns["next_observations"].astype(np.float32),
        done=columns["terminals"].astype(np.float32),
    ).to_tensordict()
    transitions.batch_size = [count]
    memory = ReplayBuffer(max_size=count, device="cpu")
    memory.add(transitions)

    env = gym.vector.SyncVectorEnv([lambda: gym.make(ENV_ID)])
    # An MLP of the compute of mazerun's 256x256: 8 -> 256 -> 128 (latent) -> 256 -> 4 (AgileRL's
    # Q-network is an encoder, a latent layer and a head, each MLP with at least one hidden layer).
    net_config = {"encoder_config": {"hidden_size": [256]}, "latent_dim": 128, "head_config": {"hidden_size": [256]}}
    init_hp = {"DOUBLE": True, "BATCH_SIZE": args.batch_size, "LR": args.lr, "GAMMA": 0.99, "LEARN_STEP": 1,
               "TAU": 1e-3, "POP_SIZE": args.population}
    hp_config = HyperparameterConfig(
        lr=RLParameter(min=1e-5, max=1e-2),
        batch_size=RLParameter(min=32, max=1024, dtype=int),
        learn_step=RLParameter(min=1, max=10, dtype=int, grow_factor=1.5, shrink_factor=0.75),
    )
    population = create_population(
        algo="CQN", observation_space=env.single_observation_space, action_space=env.single_action_space,
        net_config=net_config, INIT_HP=init_hp, hp_config=hp_config, population_size=args.population,
        num_envs=1, device="cpu",
    )
    tournament = TournamentSelection(tournament_size=2, elitism=True, population_size=args.population)
    mutations = Mutations(no_mutation=0.4, architecture=0.2, new_layer_prob=0.2, parameters=0.2, activation=0,
                          rl_hp=0.2, mutation_sd=0.1, rand_seed=args.seed, device="cpu")

    best, best_fitness = None, -float("inf")
    while np.less([agent.steps for agent in population], args.max_steps).all():
        for agent in population:
            steps = min(args.evo_steps, args.max_steps - agent.steps)
            for _ in range(steps):
                agent.learn(memory.sample(agent.batch_size))
            agent.steps += steps
        fitnesses = [agent.test(env, max_steps=None, loop=args.eval_loop) for agent in population]
        index = int(np.argmax(fitnesses))
        if fitnesses[index] > best_fitness:
            best, best_fitness = population[index].clone(), float(fitnesses[index])
        if not np.less([agent.steps for agent in population], args.max_steps).all():
            break
        _, population, _ = tournament.select(population)
        population = mutations.mutation(population)
    wall = time.perf_counter() - start
    env.close()

    returns = []
    single = gym.make(ENV_ID)
    for episode in range(args.test_episodes):
        observation, _ = single.reset(seed=args.seed_offset + episode)
        total, done = 0.0, False
        while not done:
            action = int(np.asarray(best.get_action(observation[None], epsilon=0)).reshape(-1)[0])
            observation, reward, terminated, truncated, _ = single.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    single.close()
    print(json.dumps({"wall": wall, "elite_return": float(np.mean(returns)), "elite_fitness": best_fitness,
                      "steps_per_agent": int(min(agent.steps for agent in population)),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
