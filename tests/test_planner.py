"""The planning expert: shortest plans on hand-built grids, legal actions on real envs, refusals, records that train."""

from __future__ import annotations

import copy
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from conftest import run_cli, run_ok
from minigrid.core.grid import Grid
from minigrid.core.mission import MissionSpace
from minigrid.core.world_object import Ball, Box, Door, Goal, Key, Lava
from minigrid.minigrid_env import MiniGridEnv

from mazerun.acting.envs import make_env
from mazerun.acting.policies import build_expert
from mazerun.acting.policies.heuristic import PLANNER_FIRST_IDS, BabyAIBotPolicy, heuristic_for
from mazerun.acting.policies.planner import (
    FORWARD,
    LEFT,
    RIGHT,
    TOGGLE,
    NoPlan,
    PlannerPolicy,
    front,
    planner_for,
    seen_from,
)
from mazerun.config.schemas import ExpertConfig
from mazerun.data.records import load_records


class HandBuiltGrid(MiniGridEnv):
    """A fixed grid drawn as text: W wall, A agent (facing east), G goal, V lava, L locked yellow
    door, D closed yellow door, B box holding the yellow key, b a ball that stays put, O a ball that patrols its
    column one cell a step."""

    def __init__(self, rows: list[str], mission: str = "get to the green goal square",
                 see_through_walls: bool = True) -> None:
        self.rows, self.text = rows, mission
        self.patrol_step = 1
        super().__init__(mission_space=MissionSpace(mission_func=lambda: mission), width=len(rows[0]),
                         height=len(rows), max_steps=200, see_through_walls=see_through_walls)
        if any("O" in row for row in rows):
            self.action_space = gym.spaces.Discrete(3)  # as Dynamic-Obstacles: turn and walk only

    def _gen_grid(self, width: int, height: int) -> None:
        self.grid = Grid(width, height)
        self.obstacles = []
        self.mission = self.text
        for y, row in enumerate(self.rows):
            for x, mark in enumerate(row):
                if mark == "W":
                    self.grid.wall_rect(x, y, 1, 1)
                elif mark == "G":
                    self.grid.set(x, y, Goal())
                elif mark == "V":
                    self.grid.set(x, y, Lava())
                elif mark == "L":
                    self.grid.set(x, y, Door("yellow", is_locked=True))
                elif mark == "D":
                    self.grid.set(x, y, Door("yellow"))
                elif mark == "B":
                    self.grid.set(x, y, Box("grey", contains=Key("yellow")))
                elif mark == "b":
                    self.grid.set(x, y, Ball("purple"))
                elif mark == "O":
                    self.obstacles.append(Ball("blue"))
                    self.put_obj(self.obstacles[-1], x, y)
                elif mark == "A":
                    self.agent_pos, self.agent_dir = (x, y), 0

    def step(self, action: int):
        """Dynamic-Obstacles' rule: walking into an obstacle's cell (as it was before it moved) fails."""
        ahead = self.grid.get(*self.front_pos)
        walked_into_it = action == FORWARD and ahead is not None and ahead.type == "ball"
        for ball in self.obstacles:
            x, y = ball.cur_pos
            if self.grid.get(x, y + self.patrol_step) is not None or (x, y + self.patrol_step) == tuple(self.agent_pos):
                self.patrol_step = -self.patrol_step
            if self.grid.get(x, y + self.patrol_step) is None and (x, y + self.patrol_step) != tuple(self.agent_pos):
                self.grid.set(x, y, None)
                self.put_obj(ball, x, y + self.patrol_step)
        observation, reward, terminated, truncated, info = super().step(action)
        if walked_into_it:
            return observation, -1.0, True, truncated, info
        return observation, reward, terminated, truncated, info


def state_key(env: MiniGridEnv) -> bytes:
    carrying = env.carrying.encode() if env.carrying else (0, 0, 0)
    return bytes((*env.agent_pos, env.agent_dir, *carrying, env.patrol_step % 3)) + env.grid.encode().tobytes()


def shortest_plan(env: MiniGridEnv, limit: int = 40) -> int:
    """The fewest actions to success, by breadth-first search over copies of the env (DONE left out)."""
    frontier, seen = [copy.deepcopy(env)], {state_key(env)}
    for depth in range(1, limit + 1):
        next_frontier = []
        for state in frontier:
            for action in range(min(6, state.action_space.n)):
                child = copy.deepcopy(state)
                _, reward, terminated, truncated, _ = child.step(action)
                if terminated and reward > 0:
                    return depth
                if not (terminated or truncated) and state_key(child) not in seen:
                    seen.add(state_key(child))
                    next_frontier.append(child)
        frontier = next_frontier
    raise AssertionError(f"no plan within {limit} actions")


def play(env, policy: PlannerPolicy, seed: int, *, epsilon: float = 0.0, check: bool = True) -> tuple[bool, int]:
    """One episode; with ``epsilon`` a share of random actions replaces the planner's (it is told, as in DAgger).

    With ``check``, every action the planner chooses is legal and never walks into a wall, lava,
    a closed door or an object.
    """
    observation, _ = env.reset(seed=seed)
    policy.reset(env, seed)
    noise = np.random.default_rng(seed)
    state = env.unwrapped
    terminated = truncated = False
    steps, reward = 0, 0.0
    while not (terminated or truncated):
        action = policy.act(observation)
        if check:
            assert 0 <= action < state.action_space.n
            ahead = state.grid.get(*front((*state.agent_pos, state.agent_dir)))
            if action == FORWARD and ahead is not None:
                assert ahead.can_overlap() and ahead.type != "lava", f"walks into {ahead.type} on seed {seed}"
        if noise.random() < epsilon:
            action = int(noise.integers(state.action_space.n))
            policy.took(action)
        observation, reward, terminated, truncated, _ = env.step(action)
        steps += 1
    return bool(terminated and reward > 0), steps


KEY_IN_A_BOX = ["WWWWWWW",
                "W.B.W.W",
                "WA..LGW",
                "WWWWWWW"]
LAVA_WITH_A_GAP = ["WWWWWWW",
                   "WA.V..W",
                   "W..V..W",
                   "W.....W",
                   "W..V.GW",
                   "WWWWWWW"]
A_BALL_ON_PATROL = ["WWWWWWW",
                    "WA.O..W",
                    "W.....W",
                    "W.....W",
                    "W....GW",
                    "WWWWWWW"]


@pytest.mark.parametrize("rows, mission", [
    (KEY_IN_A_BOX, "use the key to open the door and then get to the goal"),
    (LAVA_WITH_A_GAP, "avoid the lava and get to the green goal square"),
    (A_BALL_ON_PATROL, "get to the green goal square"),
], ids=["locked-door-key-in-a-box", "lava", "moving-obstacle"])
def test_the_planner_takes_the_shortest_plan_on_hand_built_grids(rows: list[str], mission: str) -> None:
    env = HandBuiltGrid(rows, mission)
    env.reset(seed=0)
    shortest = shortest_plan(env)
    succeeded, steps = play(env, PlannerPolicy("hand-built", sees="all"), seed=0)
    assert succeeded and steps == shortest
    assert play(env, PlannerPolicy("hand-built", sees="agent"), seed=0)[0]  # on what the agent sees: there too


def test_the_key_in_a_box_plan_is_the_nine_actions_worked_out_by_hand() -> None:
    env = HandBuiltGrid(KEY_IN_A_BOX)
    env.reset(seed=0)
    # forward, left, toggle the box, pick up the key, right, forward, toggle the door, forward, forward
    assert shortest_plan(env) == 9


TWO_CLOSED_ROOMS = ["WWWWWWWWWWW",
                    "W..W...W..W",
                    "W..D.A.D.GW",
                    "W..W...W..W",
                    "WWWWWWWWWWW"]


def test_the_agents_view_is_the_cells_minigrid_shows_it() -> None:
    """Facing east from (5, 2), the 7x7 view spans x 5..11 and y -1..5: every cell of the grid from x 5 on, except
    what the closed door at (7, 2) hides (the right room), and the door itself is seen."""
    env = HandBuiltGrid(TWO_CLOSED_ROOMS, see_through_walls=False)
    env.reset(seed=0)
    seen = seen_from(env).reshape(5, 11)
    assert not seen[:, :5].any()
    assert seen[:, 5:8].all()  # the middle room's right half, its wall and the door
    assert not seen[1:4, 8:10].any()  # the room behind the door
    for steps in range(12):  # and against minigrid's own map of world cells to view cells, pose after pose
        _, visible = env.gen_obs_grid()
        seen = seen_from(env)
        for index in range(env.grid.width * env.grid.height):
            x, y = index % env.grid.width, index // env.grid.width
            view = env.get_view_coords(x, y)
            in_view = 0 <= view[0] < env.agent_view_size and 0 <= view[1] < env.agent_view_size
            assert seen[index] == (in_view and visible[view]), (steps, x, y)
        env.step((LEFT, FORWARD, RIGHT)[steps % 3])


def test_on_what_the_agent_sees_it_looks_for_a_goal_it_has_not_seen() -> None:
    """The full state's plan walks straight at the goal behind the right door; planning on what the agent has seen,
    it first turns to the cells behind it (two turns: the nearest unseen cell), opens the left door it finds there,
    and only then looks behind the right one."""
    env = HandBuiltGrid(TWO_CLOSED_ROOMS, see_through_walls=False)
    actions = {}
    for sees in ("all", "agent"):
        env.reset(seed=0)
        policy, taken = PlannerPolicy("hand-built", sees=sees), []
        policy.reset(env, 0)
        for _ in range(4):
            taken.append(policy.act(None))
            env.step(taken[-1])
        actions[sees] = taken
    assert actions["all"] == [FORWARD, TOGGLE, FORWARD, FORWARD]
    assert actions["agent"] == [RIGHT, RIGHT, FORWARD, TOGGLE]
    env.reset(seed=0)
    shortest = shortest_plan(env)
    succeeded, steps = play(env, PlannerPolicy("hand-built", sees="agent"), seed=0)
    assert succeeded and steps > shortest


A_KEYLESS_DOOR_AND_A_BALL_IN_THE_WAY_ROUND = ["WWWWWWWW",
                                             "WALG...W",
                                             "WbWWW.WW",
                                             "W......W",
                                             "WWWWWWWW"]


def test_a_locked_door_whose_key_is_nowhere_is_not_a_way_when_another_exists() -> None:
    """The cheapest way that clears an obstacle crosses the locked door (22 actions' worth against the ball's 24),
    but its key is nowhere, so that way is shut for good: the planner carries the ball aside and walks round.
    (It named the door as no plan before: MiniGrid-ObstructedMaze-Full-v0 seeds 51, 56, 92 and 138, which lose a
    door's key, were counted as having none.)"""
    env = HandBuiltGrid(A_KEYLESS_DOOR_AND_A_BALL_IN_THE_WAY_ROUND)
    for sees in ("all", "agent"):
        assert play(env, PlannerPolicy("hand-built", sees=sees), seed=0)[0], sees
    maze = "MiniGrid-ObstructedMaze-Full-v0"
    assert play(make_env(maze), PlannerPolicy(maze, sees="all"), seed=51)[0]


def test_a_locked_door_whose_key_is_nowhere_on_the_only_way_is_no_plan_by_name() -> None:
    env = HandBuiltGrid(["WWWWW",
                         "WALGW",
                         "WWWWW"])
    env.reset(seed=0)
    policy = PlannerPolicy("hand-built", sees="all")
    policy.reset(env, 0)
    with pytest.raises(NoPlan, match="the locked yellow door on the way has no yellow key in the grid"):
        policy.act(None)


@pytest.mark.parametrize("env_id, seed", [("MiniGrid-ObstructedMaze-2Dl-v0", 28), ("MiniGrid-RedBlueDoors-8x8-v0", 8)],
                         ids=["two-locked-doors-either-side", "red-door-unseen"])
def test_on_what_the_agent_sees_it_keeps_one_subgoal_and_opens_no_door_out_of_turn(env_id: str, seed: int) -> None:
    """Seeds that failed before: two locked doors whose seen keys lie on either side of the agent made it turn
    back and forth until the time limit; exploring for an unseen red door opened the blue one (a failure)."""
    env = make_env(env_id)
    assert play(env, PlannerPolicy(env_id, sees="agent"), seed)[0]


REAL_ENVS = ["MiniGrid-LavaCrossingS9N2-v0", "MiniGrid-LavaGapS7-v0", "MiniGrid-DistShift2-v0",
             "MiniGrid-Dynamic-Obstacles-8x8-v0", "MiniGrid-DoorKey-8x8-v0", "MiniGrid-MultiRoom-N4-S5-v0",
             "MiniGrid-KeyCorridorS4R3-v0", "MiniGrid-ObstructedMaze-2Dlhb-v1", "MiniGrid-BlockedUnlockPickup-v0",
             "MiniGrid-MemoryS11-v0", "MiniGrid-Fetch-8x8-N3-v0", "MiniGrid-PutNear-8x8-N3-v0",
             "MiniGrid-GoToDoor-8x8-v0", "MiniGrid-GoToObject-8x8-N2-v0", "MiniGrid-RedBlueDoors-8x8-v0",
             "BabyAI-KeyInBox-v0", "BabyAI-UnlockToUnlock-v0", "BabyAI-PutNextS6N3-v0", "BabyAI-BossLevel-v0"]


@pytest.mark.parametrize("sees", ["all", "agent"])
@pytest.mark.parametrize("env_id", REAL_ENVS)
def test_legal_actions_never_into_lava_or_walls_and_success_on_real_envs(env_id: str, sees: str) -> None:
    env, policy = make_env(env_id), PlannerPolicy(env_id, sees)
    for seed in range(4):
        succeeded, _ = play(env, policy, seed)
        assert succeeded, f"{env_id} seed {seed}"
    for seed in range(4, 8):  # off its own path, as a DAgger learner or epsilon-greedy noise leads it
        play(env, policy, seed, epsilon=0.25)


def test_it_recovers_from_actions_it_did_not_choose() -> None:
    env, policy = make_env("MiniGrid-DoorKey-8x8-v0"), PlannerPolicy("MiniGrid-DoorKey-8x8-v0")
    outcomes = [play(env, policy, seed, epsilon=0.1)[0] for seed in range(20)]
    assert sum(outcomes) >= 19


@pytest.mark.parametrize("overrides, message", [
    (["env=CartPole-v1", "policy=planner"],
     "error: policy=planner plans on MiniGrid and BabyAI envs only, not CartPole-v1"),
    (["env.name=MiniGrid-Playground-v0", "policy=planner"], "the planner cannot read the mission ''"),
    (["env.name=MiniGrid-Empty-5x5-v0", "policy=bot"], "error: policy=bot solves BabyAI levels only"),
    (["env.name=MiniGrid-Empty-5x5-v0", "policy=planner", "policy.sees=everything"],
     "error: policy.sees='everything' is unknown; use agent or all"),
], ids=["not-a-grid", "unreadable-mission", "bot-off-babyai", "unknown-view"])
def test_refusals_are_one_line(workdir: Path, overrides: list[str], message: str) -> None:
    result = run_cli(*overrides, "runner.n_episodes=2", cwd=workdir)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_planner_records_train_through_run(workdir: Path) -> None:
    run_ok("env=MiniGrid-DoorKey-5x5-v0", "policy=planner", "runner.n_episodes=4", "hydra.run.dir=record", cwd=workdir)
    records = load_records(workdir / "record" / "trajectory_data")
    assert len(records) == 4 and all(record.policy == "planner" and record.episode_return > 0 for record in records)
    run_ok("-cn", "conf_train", "env=MiniGrid-DoorKey-5x5-v0",
           f"runner.dataset.dir_or_file={workdir / 'record' / 'trajectory_data'}", "algorithm.n_updates=2",
           "runner.eval_repeats=1", "algorithm.validation_percentage=0", "hydra.run.dir=train", cwd=workdir)
    assert (workdir / "train" / "best.pt").is_file() and (workdir / "train" / "last.pt").is_file()


def test_heuristic_on_a_minigrid_id_is_the_planner(workdir: Path) -> None:
    run_ok("env.name=MiniGrid-Unlock-v0", "policy=heuristic", "runner.n_episodes=2", "hydra.run.dir=unlock",
           cwd=workdir)
    assert {record.policy for record in load_records(workdir / "unlock" / "trajectory_data")} == {"planner"}


def test_the_heuristic_is_the_better_grid_expert_per_id() -> None:
    """The planner where it is the better grid expert, planning on what the agent sees (what a clone can imitate);
    ``policy=planner`` plans on the full state unless told otherwise."""
    assert heuristic_for("MiniGrid-DoorKey-5x5-v0").sees == "agent"
    assert planner_for("MiniGrid-DoorKey-5x5-v0").sees == "all"
    for env_id in PLANNER_FIRST_IDS:
        assert isinstance(heuristic_for(env_id), PlannerPolicy) and heuristic_for(env_id).sees == "agent", env_id
    env = make_env("MiniGrid-DoorKey-5x5-v0")  # DAgger's teacher alike
    assert build_expert(ExpertConfig(), "MiniGrid-DoorKey-5x5-v0", env).sees == "agent"
    assert build_expert(ExpertConfig(name="planner"), "MiniGrid-DoorKey-5x5-v0", env).sees == "all"
    assert build_expert(ExpertConfig(name="planner", sees="agent"), "MiniGrid-DoorKey-5x5-v0", env).sees == "agent"
    assert "BabyAI-GoToLocal-v0" not in PLANNER_FIRST_IDS
    assert isinstance(heuristic_for("BabyAI-GoToLocal-v0"), BabyAIBotPolicy)
