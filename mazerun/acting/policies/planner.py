"""A planning expert for every MiniGrid and BabyAI task: reads the full state and plans again each step.

The mission becomes an objective (stand on a cell, face an object, stand next to one and say
done, pick one up, open a door, put one next to another); a BabyAI level's objective is the
first unfinished clause of its ``instrs`` verifier tree. The way to it is a Dijkstra search
over poses (cell, direction): a turn or a step costs one action, a closed door two (toggle,
then forward). When no way exists, a second search that may also cross locked doors and
movable objects, at a price, names the first obstacle on the cheapest way, and the planner
works on a subgoal instead: fetch that door's key (toggling open the box that hides it), or
carry the blocking object aside to a cell where it blocks nothing. Walls, lava and cells that
end the episode in failure are never entered, nor a moving obstacle's cell right ahead; farther
ones are planned through, as they move before the agent gets there (on Dynamic-Obstacles this
took 15.5 steps an episode on 8x8, seeds 0-199, where avoiding every obstacle's cell took 19.1;
both succeeded on all 200).

With ``sees="agent"`` (the heuristic's: the expert that records demonstrations and teaches
DAgger) the planner knows only the cells the agent has seen this episode (its view, each step),
as the BabyAI bot does: an unseen cell counts as empty floor, an object on it does not exist yet
(what a box holds counts as known once the box is seen). When the mission's object, or the way
to it, is not known yet, it explores: it walks, through the cells it knows, to the nearest pose
that faces a cell it has not seen (opening doors, and fetching a locked door's key it has seen,
as any way needs). A clone that sees only the agent's view can imitate that; one taught by a
planner that walks straight to a key in a room it never saw cannot (KeyCorridorS3R3: BC from
1k, 3k and 10k such demos scored 0.70, 0.73 and 0.71). ``sees="all"`` (``policy=planner``'s)
plans on the full state: the shortest plan.

Between steps the planner keeps only what the agent has seen, what the task fixed at reset (the
Memory task's cue object) and, while it carries something aside, the cell it means to put it
down on (checked again each step). So it labels any state (DAgger) and recovers at once from an
action it did not choose (epsilon-greedy noise). When no plan exists it raises :class:`NoPlan`.
"""

from __future__ import annotations

import copy
import heapq
import re
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from mazerun.acting.envs import is_minigrid
from mazerun.acting.policies.base import Policy
from mazerun.config.schemas import PLANNER_SEES
from mazerun.core.errors import MazerunError

LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE, DONE = range(7)
"""minigrid's action indices."""

DIRECTION_VECTORS = ((1, 0), (0, 1), (-1, 0), (0, -1))
"""minigrid's ``DIR_TO_VEC``: 0 faces east (+x), 1 south (+y), 2 west, 3 north."""

MOVABLE_TYPES = ("key", "ball", "box")

LOCKED_DOOR_PRICE = 20
"""What the relaxed search charges for a locked door without its key: the detour to fetch it."""

BLOCKER_PRICE = 10
"""What the relaxed search charges for a movable object in the way: pick it up, carry it aside, drop it."""

MAX_SUBGOAL_DEPTH = 8
"""Nested subgoals (a key behind a door whose key lies behind a blocker...) before the planner gives up."""

Cell = tuple[int, int]
Pose = tuple[int, int, int]


class NoPlan(MazerunError):
    """The planner found no way to finish the mission from this state."""


def front(pose: Pose) -> Cell:
    x, y, direction = pose
    dx, dy = DIRECTION_VECTORS[direction]
    return x + dx, y + dy


def neighbours(cell: Cell) -> list[Cell]:
    return [(cell[0] + dx, cell[1] + dy) for dx, dy in DIRECTION_VECTORS]


@dataclass(frozen=True)
class Step:
    """One action of a path and the pose it leads to; ``cost`` 2 marks a closed door toggled open first."""

    action: int
    pose: Pose
    cost: int


class World:
    """One step's view of the env's full state, with the rules of moving through it."""

    def __init__(self, env: Any, *, forbidden: frozenset[Cell] = frozenset(), may_move_objects: bool = True,
                 drop_cell: Cell | None = None, seen: np.ndarray | None = None,
                 explore_cell: Cell | None = None) -> None:
        self.env = env
        self.seen = seen
        """Per cell (row-major, as ``grid.grid``), whether the agent has seen it; None: every cell is known."""
        self.explore_cell = explore_cell
        """The unseen cell that exploration behind a locked door or an object is heading for (see :func:`explore`)."""
        self.grid = env.grid
        self.width = env.grid.width
        self.pose: Pose = (int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir))
        self.carrying = env.carrying
        self.forbidden = forbidden
        self.moving = {tuple(int(v) for v in obstacle.cur_pos) for obstacle in getattr(env, "obstacles", ())}
        """Cells of objects that move by themselves (Dynamic-Obstacles): never cleared, only waited for."""
        self.may_move_objects = may_move_objects and env.action_space.n > TOGGLE
        """Whether the agent may pick up, drop and toggle on its way (False: walk around, or no plan)."""
        self.drop_cell = drop_cell if env.carrying is not None else None
        """Where the carried object is being taken to be put down (kept by the task while it is carried)."""
        self._cells: dict[int, Cell] | None = None
        self._known_keys: dict[str, bool] = {}

    def inside(self, cell: Cell) -> bool:
        return 0 <= cell[0] < self.width and 0 <= cell[1] < self.grid.height

    def knows(self, cell: Cell) -> bool:
        """Whether the planner may read ``cell``: seen by the agent, or every cell where it plans on the full state."""
        return self.seen is None or (self.inside(cell) and bool(self.seen[cell[1] * self.width + cell[0]]))

    def unseen(self) -> set[Cell]:
        """The cells of the grid the agent has not seen yet."""
        if self.seen is None:
            return set()
        return {(index % self.width, index // self.width) for index in np.flatnonzero(~self.seen)}

    def at(self, cell: Cell) -> Any:
        """The object on ``cell`` (None: empty, unseen, or outside the grid)."""
        return self.grid.grid[cell[1] * self.width + cell[0]] if self.knows(cell) and self.inside(cell) else None

    def cell_of(self, obj: Any) -> Cell | None:
        """Where ``obj`` lies now (None when carried, gone or unseen)."""
        if self._cells is None:
            self._cells = {id(cell_obj): cell for cell, cell_obj in self.objects()}
        return self._cells.get(id(obj))

    def objects(self) -> list[tuple[Cell, Any]]:
        """Every object the planner may read, with its cell."""
        return [((index % self.width, index // self.width), obj) for index, obj in enumerate(self.grid.grid)
                if obj is not None and (self.seen is None or self.seen[index])]

    def holds_key(self, color: str) -> bool:
        return self.carrying is not None and self.carrying.type == "key" and self.carrying.color == color

    def has_a_key(self, color: str) -> bool:
        """Whether a key of ``color`` is carried or lies in the grid the planner reads (in a box, too)."""
        if color not in self._known_keys:
            key = key_of(color)
            self._known_keys[color] = self.holds_key(color) or holds(self.carrying, key) or any(
                key(obj) or holds(obj, key) for _, obj in self.objects())
        return self._known_keys[color]

    def entry_cost(self, cell: Cell, relaxed: bool, keyless: bool = False) -> int | None:
        """Actions to step into ``cell`` (two through a closed door); None where the agent must not go.

        ``relaxed`` also lets the way cross a movable object and a locked door whose key is carried or lies in
        the grid the planner reads, at the prices above, so that the cheapest such way names what to clear
        first. A locked door whose key is nowhere stays shut even then (the v0 ObstructedMazes lose keys, and
        another way may exist); ``keyless`` lets the way cross it too, to name it where no other way does.
        """
        if cell in self.forbidden or not self.inside(cell):
            return None
        if cell in self.moving:  # walking into one now fails the episode; a farther one will have moved on
            return 1 if relaxed or cell != front(self.pose) else None
        obj = self.at(cell)
        if obj is None or obj.type in ("goal", "floor"):
            return 1
        if obj.type == "door":
            if obj.is_open:
                return 1
            if not self.may_move_objects:
                return None
            if not obj.is_locked or self.holds_key(obj.color):
                return 2
            return 1 + LOCKED_DOOR_PRICE if relaxed and (keyless or self.has_a_key(obj.color)) else None
        if relaxed and self.may_move_objects and obj.type in MOVABLE_TYPES:
            return 1 + BLOCKER_PRICE
        return None  # walls, lava, and objects the agent may not move

    def is_obstacle(self, cell: Cell) -> bool:
        """Whether only the relaxed search may enter ``cell``."""
        return self.entry_cost(cell, relaxed=False) is None

    def is_free(self, cell: Cell) -> bool:
        obj = self.at(cell)
        return (obj is None or obj.type in ("goal", "floor") or (obj.type == "door" and obj.is_open)) \
            and cell not in self.forbidden

    def can_hold(self, cell: Cell) -> bool:
        """Whether an object dropped on ``cell`` blocks no way: empty, by no door, and no cut.

        The free cells around it must stay connected through its eight neighbours once it is
        filled (a local cut test), so a corridor or a doorway is never closed.
        """
        if self.at(cell) is not None or cell in self.forbidden or cell in self.moving:
            return False
        x, y = cell
        if any(self.at(side) is not None and self.at(side).type == "door" for side in neighbours(cell)):
            return False
        ring = [(x, y - 1), (x + 1, y - 1), (x + 1, y), (x + 1, y + 1),
                (x, y + 1), (x - 1, y + 1), (x - 1, y), (x - 1, y - 1)]
        free = [around == self.pose[:2] or self.is_free(around) for around in ring]
        if all(free):
            return True
        runs_with_a_side = 0  # runs of free ring cells (ring[i] and ring[i+1] touch) holding a side (even i)
        for start in range(8):
            if free[start] and not free[start - 1]:
                end = start
                while free[end % 8]:
                    end += 1
                runs_with_a_side += any(index % 2 == 0 for index in range(start, end))
        return runs_with_a_side <= 1


def search(world: World, is_goal: Callable[[Pose], bool], *, relaxed: bool = False,
           keyless: bool = False) -> list[Step] | None:
    """The cheapest actions from the agent's pose to one where ``is_goal`` holds (Dijkstra over poses), entering
    cells as :meth:`World.entry_cost` allows."""
    start = world.pose
    best = {start: 0}
    came_from: dict[Pose, tuple[Pose, Step]] = {}
    frontier = [(0, start)]
    while frontier:
        cost, pose = heapq.heappop(frontier)
        if cost > best[pose]:
            continue
        if is_goal(pose):
            path = []
            while pose != start:
                pose, step = came_from[pose]
                path.append(step)
            return path[::-1]
        x, y, direction = pose
        moves = [(LEFT, (x, y, (direction - 1) % 4), 1), (RIGHT, (x, y, (direction + 1) % 4), 1)]
        ahead = front(pose)
        entry = world.entry_cost(ahead, relaxed, keyless)
        if entry is not None:
            moves.append((FORWARD, (ahead[0], ahead[1], direction), entry))
        for action, next_pose, step_cost in moves:
            next_cost = cost + step_cost
            if next_cost < best.get(next_pose, next_cost + 1):
                best[next_pose] = next_cost
                came_from[next_pose] = (pose, Step(action, next_pose, step_cost))
                heapq.heappush(frontier, (next_cost, next_pose))
    return None


def first_action(world: World, path: list[Step]) -> int:
    step = path[0]
    if step.action == FORWARD and step.cost == 2:
        return TOGGLE  # the door ahead is closed: open it, then step through
    return step.action


def facing(cells: set[Cell] | dict[Cell, Any]) -> Callable[[Pose], bool]:
    return lambda pose: front(pose) in cells


def go(world: World, is_goal: Callable[[Pose], bool], arrive: Callable[[Pose], int], depth: int) -> int:
    """The next action toward a pose where ``is_goal`` holds, then ``arrive(pose)`` there.

    When the way is shut, the first obstacle of the cheapest relaxed way becomes the subgoal:
    a locked door's key to fetch, or an object to carry aside.
    """
    path = search(world, is_goal)
    if path is not None:
        return first_action(world, path) if path else arrive(world.pose)
    if depth >= MAX_SUBGOAL_DEPTH:
        raise NoPlan("the way is shut: a key behind its own door, or more nested obstacles than "
                     f"the planner follows ({MAX_SUBGOAL_DEPTH})")
    relaxed = search(world, is_goal, relaxed=True)
    if relaxed is None:
        raise NoPlan(why_shut(world, is_goal))
    obstacles = [step.pose[:2] for step in relaxed if step.action == FORWARD and world.is_obstacle(step.pose[:2])]
    first = obstacles[0]
    if first in world.moving:
        return wait_for_the_way(world, relaxed)
    obstacle = world.at(first)
    if obstacle.type == "door":
        return fetch_key(world, obstacle.color, depth + 1)
    later_doors = [world.at(cell) for cell in obstacles[1:] if world.at(cell).type == "door"]
    if later_doors and holds(obstacle, key_of(later_doors[0].color)):
        return fetch_key(world, later_doors[0].color, depth + 1)  # opening the box clears the way too
    return carry_aside(world, first, depth + 1, is_goal)


def why_shut(world: World, is_goal: Callable[[Pose], bool]) -> str:
    """Why no way leads to ``is_goal``, even clearing obstacles: the first locked door whose key is nowhere on the
    cheapest way that crosses such doors too, else no way at all."""
    for step in search(world, is_goal, relaxed=True, keyless=True) or []:
        obj = world.at(step.pose[:2]) if step.action == FORWARD else None
        if obj is not None and obj.type == "door" and obj.is_locked and not world.has_a_key(obj.color):
            return f"the locked {obj.color} door on the way has no {obj.color} key in the grid"
    return "no way leads there"


def fetch_key(world: World, color: str, depth: int) -> int:
    """The next action toward holding a key of ``color``; no such key in the grid: no plan."""
    if not world.has_a_key(color):
        raise NoPlan(f"the locked {color} door on the way has no {color} key in the grid")
    return pick_up(world, key_of(color), depth)


def way_that_needs_the_key(world: World, is_goal: Callable[[Pose], bool]) -> list[Step] | None:
    """The open way to ``is_goal`` when it crosses a locked door the carried key opens, else None."""
    path = search(world, is_goal)
    for step in path or []:
        obj = world.at(step.pose[:2])
        if step.action == FORWARD and obj is not None and obj.type == "door" and obj.is_locked:
            return path
    return None


def wait_for_the_way(world: World, relaxed: list[Step]) -> int:
    """Follow the way that crosses a moving obstacle, but turn rather than walk into an occupied cell."""
    action = first_action(world, relaxed)
    if action == FORWARD and world.is_obstacle(front(world.pose)):
        return LEFT  # a turn is the only action that waits without risk (Dynamic-Obstacles has no done)
    return action


def holds(obj: Any, matches: Callable[[Any], bool]) -> bool:
    """Whether ``obj`` is a box with something that ``matches`` inside."""
    return obj is not None and obj.type == "box" and obj.contains is not None and matches(obj.contains)


def key_of(color: str) -> Callable[[Any], bool]:
    return lambda obj: obj.type == "key" and obj.color == color


def pick_up(world: World, matches: Callable[[Any], bool], depth: int,
            keep_clear: frozenset[Cell] = frozenset()) -> int:
    """The next action toward holding an object that ``matches`` (from a box that hides one, too).

    Hands must be empty to pick up, but a carried key stays in hand while the way to the object
    still crosses the locked door it opens. What the hands hold goes down off the way to the
    object and off ``keep_clear``.
    """
    sources: dict[Cell, int] = {}
    for cell, obj in world.objects():
        if not obj.can_pickup():
            continue  # a description such as "a grey object" also matches walls
        if matches(obj):
            sources[cell] = PICKUP
        elif holds(obj, matches):
            sources[cell] = TOGGLE  # a box opens into what it holds
    if holds(world.carrying, matches):
        return put_down(world)  # a box carried aside holds it: down, then open
    if not sources:
        raise NoPlan("nothing to pick up matches")
    if world.carrying is not None:
        if search(world, facing(sources)) is None:  # shut: the subgoals that open it say what to do with the hands
            return go(world, facing(sources), lambda pose: DROP, depth)
        keep_key = way_that_needs_the_key(world, facing(sources))
        if keep_key:
            return first_action(world, keep_key)
        return put_down(world, keep_clear | ways_from_here(world, facing(sources)))
    return go(world, facing(sources), lambda pose: sources[front(pose)], depth)


def ways_from_here(world: World, is_goal: Callable[[Pose], bool]) -> frozenset[Cell]:
    """The cells of the relaxed ways to ``is_goal`` from the agent's cell (itself left out), facing each direction.

    A drop keeps them clear. One direction's way alone changes as the agent turns, and the drop
    cell it rules out with it: the agent would turn back and forth between two drop cells.
    """
    cells: set[Cell] = set()
    for direction in range(4):
        turned = copy.copy(world)
        turned.pose = (*world.pose[:2], direction)
        cells |= {step.pose[:2] for step in search(turned, is_goal, relaxed=True) or []}
    return frozenset(cells - {world.pose[:2]})  # the agent leaves its own cell behind


def put_down(world: World, keep_clear: frozenset[Cell] = frozenset()) -> int:
    """The next action toward dropping what the agent carries where it blocks nothing (nor ``keep_clear``).

    The cell chosen is kept while it stays free and in reach: ``keep_clear`` is drawn from where
    the agent stands, and a choice remade at every step would walk it back and forth.
    """
    def empty(cell: Cell) -> bool:
        return world.at(cell) is None and cell not in world.forbidden and cell not in world.moving

    path = None
    if world.drop_cell is not None and world.can_hold(world.drop_cell):
        path = search(world, facing({world.drop_cell}))
    for fits in (lambda cell: cell not in keep_clear and world.can_hold(cell),  # best: off the way, no cut
                 lambda cell: cell not in keep_clear and empty(cell),  # a crowded room: off the way at least
                 empty):
        if path is None:
            path = search(world, lambda pose: fits(front(pose)))
    if path is None:
        raise NoPlan("there is no free cell to put the carried object down")
    world.drop_cell = front(path[-1].pose if path else world.pose)
    return first_action(world, path) if path else DROP


def carry_aside(world: World, cell: Cell, depth: int, is_goal: Callable[[Pose], bool]) -> int:
    """The next action toward picking up the object on ``cell`` (then it is carried out of the way).

    What the hands hold first goes down off the way being cleared (toward ``is_goal``).
    """
    if world.carrying is None:
        return go(world, facing({cell}), lambda pose: PICKUP, depth)
    keep_key = way_that_needs_the_key(world, facing({cell}))
    return first_action(world, keep_key) if keep_key else put_down(world, keep_clear=ways_from_here(world, is_goal))


def explore(world: World) -> int:
    """The next action toward a pose that faces a cell the agent has not seen, the nearest through the cells it
    knows; no such pose: no plan.

    Where every such cell lies behind a locked door or an object, the cell that the cheapest relaxed
    way reaches is kept (``world.explore_cell``) until it is seen: two locked doors whose keys lie on
    either side of the agent would otherwise trade places as the cheaper subgoal at each turn it takes.
    """
    unseen = world.unseen()
    if not unseen:
        raise NoPlan("every cell is seen")
    path = search(world, facing(unseen))
    if path is not None:
        return first_action(world, path) if path else LEFT
    if world.explore_cell in unseen:
        try:
            return go(world, facing({world.explore_cell}), lambda pose: LEFT, 0)
        except NoPlan:
            pass  # the kept way has shut: choose again
    relaxed = search(world, facing(unseen), relaxed=True)
    if relaxed is None:
        raise NoPlan("no way leads to the cells not seen yet")
    world.explore_cell = front(relaxed[-1].pose)
    return go(world, facing({world.explore_cell}), lambda pose: LEFT, 0)


def seen_from(env: Any) -> np.ndarray:
    """The cells of ``env``'s grid in the agent's view now (row-major), as ``gen_obs`` shows them."""
    _, visible = env.gen_obs_grid()
    size, half = env.agent_view_size, env.agent_view_size // 2
    (ax, ay), (dx, dy), (rx, ry) = env.agent_pos, env.dir_vec, env.right_vec
    corner_x, corner_y = ax + dx * (size - 1) - rx * half, ay + dy * (size - 1) - ry * half  # the view's (0, 0)
    view_x, view_y = np.nonzero(visible)  # minigrid's inverse of get_view_coords: corner + vx * right - vy * dir
    xs, ys = corner_x + view_x * rx - view_y * dx, corner_y + view_x * ry - view_y * dy
    inside = (xs >= 0) & (xs < env.grid.width) & (ys >= 0) & (ys < env.grid.height)
    cells = np.zeros(env.grid.width * env.grid.height, dtype=bool)
    cells[ys[inside] * env.grid.width + xs[inside]] = True
    return cells


# -- objectives: what the mission asks for, as the next action from any state --------------------


def reach(world: World, cells: set[Cell]) -> int:
    return go(world, lambda pose: pose[:2] in cells, lambda pose: DONE, 0)


def face(world: World, cells: set[Cell]) -> int:
    """Stand facing one of ``cells`` (BabyAI's "go to": the verifier sees it after any action)."""
    cells = {cell for cell in cells if world.knows(cell)}
    if not cells:
        raise NoPlan("the object to go to is not in the grid")
    return go(world, facing(cells), lambda pose: DONE, 0)


def stand_next_to_and_done(world: World, cells: set[Cell]) -> int:
    """Stand beside one of ``cells`` and say done (MiniGrid's GoToDoor and GoToObject)."""
    beside = {side for cell in cells for side in neighbours(cell)}
    return go(world, lambda pose: pose[:2] in beside, lambda pose: DONE, 0)


def open_door(world: World, doors: list[Any]) -> int:
    """Face one of ``doors`` and toggle it (an open one closes, then opens: the verifier wants the opening)."""
    cells = {world.cell_of(door): door for door in doors if world.cell_of(door) is not None}
    if not cells:
        raise NoPlan("the door to open is not in the grid")

    def usable(cell: Cell) -> bool:
        return not cells[cell].is_locked or world.holds_key(cells[cell].color)

    def toggle_or_fetch_key(pose: Pose) -> int:
        return TOGGLE if usable(front(pose)) else fetch_key(world, cells[front(pose)].color, 1)

    ready = {cell for cell in cells if usable(cell)}
    if ready and search(world, facing(ready)) is not None:
        return go(world, facing(ready), toggle_or_fetch_key, 0)
    path = search(world, facing(cells))
    if path is not None:  # the door is in reach but locked: its key first
        return fetch_key(world, cells[front(path[-1].pose if path else world.pose)].color, 1)
    return go(world, facing(cells), toggle_or_fetch_key, 0)  # clear the way to the door first


def put_next_to(world: World, moves: Callable[[Any], bool], targets: set[Cell],
                reach_of: Callable[[Cell], set[Cell]]) -> int:
    """Carry an object that ``moves`` and drop it on a free cell within ``reach_of`` a target cell.

    A shut way to the target is opened first, with empty hands, so the object is not carried
    into a subgoal that would make the agent put it down again; when every cell by the target
    is taken, one object there is carried aside first.
    """
    spots = {spot for cell in targets for spot in reach_of(cell)
             if world.at(spot) is None and spot not in world.forbidden}
    if not spots:
        taken = sorted(spot for cell in targets for spot in reach_of(cell) if spot not in targets
                       and world.at(spot) is not None and world.at(spot).type in MOVABLE_TYPES
                       and not moves(world.at(spot)))
        if not taken or not world.may_move_objects:
            raise NoPlan("every cell next to the target is taken")
        return carry_aside(world, taken[0], 0, facing({taken[0]}))
    if world.carrying is not None and not moves(world.carrying):
        keep_key = way_that_needs_the_key(world, facing(spots))
        if keep_key:  # the carried key opens the way: open it before the hands go to the object
            return first_action(world, keep_key)
    carries_it = world.carrying is not None and moves(world.carrying)
    if not carries_it and search(world, facing(spots)) is not None:
        return pick_up(world, moves, 0, keep_clear=frozenset(spots))
    return go(world, facing(spots), lambda pose: DROP, 0)


def beside(cell: Cell) -> set[Cell]:
    return set(neighbours(cell))


def around(cell: Cell) -> set[Cell]:
    x, y = cell
    return {(x + dx, y + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy}


# -- tasks: a mission read once at reset, giving an objective for each state -----------------------


def matching(color: str, kind: str) -> Callable[[Any], bool]:
    return lambda obj: obj.type == kind and obj.color == color


class Task:
    """A mission, read at reset; :meth:`next_action` plans from the env's state each step."""

    forbidden: frozenset[Cell] = frozenset()
    may_move_objects = True
    """False where picking up the wrong object ends the episode (Fetch, PutNear)."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.drop_cell: Cell | None = None
        self.explore_cell: Cell | None = None
        self.seen: np.ndarray | None = None
        """The cells the agent has seen this episode (see :meth:`plan_on_what_the_agent_sees`); None: all known."""

    def plan_on_what_the_agent_sees(self) -> None:
        """From now on, plan on the cells the agent has seen (from its view at each step) rather than the full state."""
        self.seen = np.zeros(self.env.grid.width * self.env.grid.height, dtype=bool)

    def next_action(self) -> int:
        if self.seen is not None:
            self.seen |= seen_from(self.env)
        world = World(self.env, forbidden=self.forbidden, may_move_objects=self.may_move_objects,
                      drop_cell=self.drop_cell, seen=self.seen, explore_cell=self.explore_cell)
        try:
            action = self.objective(world)
        except NoPlan as unknown:  # on what the agent has seen: look further before giving up
            if self.seen is None:
                raise
            try:
                action = explore(world)
            except NoPlan:
                raise unknown from None
        self.drop_cell, self.explore_cell = world.drop_cell, world.explore_cell
        return action

    def objective(self, world: World) -> int:
        raise NotImplementedError


class ReachGoal(Task):
    """"get to the green goal square", "reach the goal", "use the key to open the door and then get to the goal"..."""

    def objective(self, world: World) -> int:
        goals = {cell for cell, obj in world.objects() if obj.type == "goal"}
        if not goals:
            raise NoPlan("the grid has no goal square")
        return reach(world, goals)


class PickUpObject(Task):
    """"pick up the blue ball" (KeyCorridor, ObstructedMaze, UnlockPickup); "get a red key" (Fetch)."""

    def __init__(self, env: Any, color: str, kind: str, *, may_move_objects: bool = True) -> None:
        super().__init__(env)
        self.matches = matching(color, kind)
        self.may_move_objects = may_move_objects

    def objective(self, world: World) -> int:
        return pick_up(world, self.matches, 0)


class GoNextTo(Task):
    """"go to the red door" / "go to the blue key": stand beside it and say done."""

    def __init__(self, env: Any, color: str, kind: str) -> None:
        super().__init__(env)
        self.matches = matching(color, kind)

    def objective(self, world: World) -> int:
        return stand_next_to_and_done(world, {cell for cell, obj in world.objects() if self.matches(obj)})


class OpenDoors(Task):
    """"open the door" (Unlock) and "open the red door then the blue door" (RedBlueDoors): in order."""

    def __init__(self, env: Any, colors: list[str | None]) -> None:
        super().__init__(env)
        self.colors = colors

    def objective(self, world: World) -> int:
        doors = [obj for _, obj in world.objects() if obj.type == "door"]
        for color in self.colors:
            wanted = [door for door in doors if color is None or door.color == color]
            if not any(door.is_open for door in wanted):
                if not wanted:  # not seen yet: look for it without opening another (red before blue fails)
                    world.may_move_objects = False
                return open_door(world, wanted)
        raise NoPlan("every door of the mission is open already")


class PutNear(Task):
    """"put the blue key near the purple box": drop it on a cell around the target (diagonals count)."""

    may_move_objects = False

    def __init__(self, env: Any, move: tuple[str, str], target: tuple[str, str]) -> None:
        super().__init__(env)
        self.moves = matching(*move)
        self.target = matching(*target)

    def objective(self, world: World) -> int:
        targets = {cell for cell, obj in world.objects() if self.target(obj)}
        return put_next_to(world, self.moves, targets, around)


class MatchTheCue(Task):
    """Memory: go to the object at the end of the hallway that matches the one seen at the start.

    The cue is the object nearest the start room's left wall; it is remembered at reset. The
    matching object's cell toward the hallway is the goal, the other object's is forbidden
    (stepping there fails the episode).
    """

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        world = World(env)
        objects = sorted((cell, obj) for cell, obj in world.objects() if obj.type in MOVABLE_TYPES)
        if len(objects) != 3:
            raise NoPlan(f"a Memory grid holds 3 objects, this one {len(objects)}")
        (_, cue), *choices = objects
        self.cue_type = cue.type
        hallway_row = world.pose[1]

        def toward_hallway(cell: Cell) -> Cell:
            return cell[0], cell[1] + (1 if cell[1] < hallway_row else -1)

        self.goal = {toward_hallway(cell) for cell, obj in choices if obj.type == self.cue_type}
        self.forbidden = frozenset(toward_hallway(cell) for cell, obj in choices if obj.type != self.cue_type)

    def objective(self, world: World) -> int:
        return reach(world, self.goal)


class BabyAIInstructions(Task):
    """A BabyAI level: works on the first unfinished clause of its ``instrs`` verifier tree."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self.instrs = env.instrs
        check_strict_sequence(env.instrs)

    def objective(self, world: World) -> int:
        return self.clause_action(world, current_clause(self.instrs))

    def clause_action(self, world: World, clause: Any) -> int:
        kind = type(clause).__name__
        if getattr(clause, "strict", False):  # a strict clause fails on any other pickup or door toggled
            world.may_move_objects = False
        if kind == "GoToInstr":
            return face(world, {tuple(pos) for pos in clause.desc.obj_poss})
        if kind == "PickupInstr":
            wanted = clause.desc.obj_set
            if world.carrying is not None and any(world.carrying is obj for obj in wanted):
                return put_down(world)  # the verifier counts a pickup with empty hands only
            return pick_up(world, lambda obj: any(obj is target for target in wanted), 0)
        if kind == "OpenInstr":
            return open_door(world, clause.desc.obj_set)
        if kind == "PutNextInstr":
            wanted = clause.desc_move.obj_set
            if world.carrying is not None and clause.preCarrying is not world.carrying:
                return DONE  # the verifier counts a drop only once it has seen the object carried for a step
            fixed = {tuple(pos) for pos in clause.desc_fixed.obj_poss if world.knows(tuple(pos))}
            return put_next_to(world, lambda obj: any(obj is target for target in wanted), fixed, beside)
        raise NoPlan(f"the planner does not know the BabyAI clause {kind}")


def check_strict_sequence(instr: Any) -> None:
    """Refuse "open door A, then door B" when B's clause is strict: it can never succeed.

    minigrid's ``BeforeInstr`` verifies the second clause on the very toggle that opened the
    first door, and a strict ``OpenInstr`` fails on any other door it sees toggled
    (BabyAI-OpenDoorsOrderN*Debug).
    """
    kind = type(instr).__name__
    if kind not in ("BeforeInstr", "AfterInstr"):
        return
    first, second = (instr.instr_a, instr.instr_b) if kind == "BeforeInstr" else (instr.instr_b, instr.instr_a)
    if type(first).__name__ == type(second).__name__ == "OpenInstr" and getattr(second, "strict", False) \
            and not any(door is other for door in first.desc.obj_set for other in second.desc.obj_set):
        raise NoPlan("minigrid's strict verifier fails the second door on the toggle that opens the first, "
                     "so this mission cannot succeed")


def current_clause(instr: Any) -> Any:
    """The action clause a BabyAI instruction tree waits on, from its verifier's progress flags."""
    kind = type(instr).__name__
    if kind == "BeforeInstr":
        return current_clause(instr.instr_b if instr.a_done == "success" else instr.instr_a)
    if kind == "AfterInstr":
        return current_clause(instr.instr_a if instr.b_done == "success" else instr.instr_b)
    if kind == "AndInstr":
        return current_clause(instr.instr_b if instr.a_done == "success" else instr.instr_a)
    return instr


COLOR = r"(red|green|blue|purple|yellow|grey)"
KIND = r"(key|ball|box)"

MISSIONS: list[tuple[str, Callable[..., Task]]] = [
    (rf"open the {COLOR} door then the {COLOR} door", lambda env, a, b: OpenDoors(env, [a, b])),
    (r"open the door", lambda env: OpenDoors(env, [None])),
    (r"go to the matching object at the end of the hallway", MatchTheCue),
    (rf"put the {COLOR} {KIND} near the {COLOR} {KIND}", lambda env, c1, k1, c2, k2: PutNear(env, (c1, k1), (c2, k2))),
    (rf"(?:get|go get|fetch|go fetch|you must fetch) a {COLOR} {KIND}",
     lambda env, color, kind: PickUpObject(env, color, kind, may_move_objects=False)),
    (rf"go to the {COLOR} (door|key|ball|box)", GoNextTo),
    (rf"pick up the {COLOR} {KIND}", PickUpObject),
    (r".*\bgoal\b.*", ReachGoal),
]
"""Each MiniGrid mission (a regular expression over the whole text) and the task it asks for."""


def read_task(env: Any) -> Task:
    """The task of ``env`` (unwrapped), from its BabyAI instructions or its mission text."""
    if getattr(env, "instrs", None) is not None:
        return BabyAIInstructions(env)
    for pattern, task in MISSIONS:
        match = re.fullmatch(pattern, env.mission)
        if match:
            return task(env, *match.groups())
    raise NoPlan(f"the planner cannot read the mission {env.mission!r}")


class PlannerPolicy(Policy):
    """Plans each step on the full state of a MiniGrid or BabyAI env, or on what the agent has seen of it (see the
    module docstring).

    It keeps no plan between steps, so :meth:`took` (an action it did not choose) needs nothing.
    """

    name = "planner"

    def __init__(self, env_id: str, sees: str = "all") -> None:
        if sees not in PLANNER_SEES:
            raise MazerunError(f"policy.sees={sees!r} is unknown; use {' or '.join(PLANNER_SEES)}")
        self.env_id, self.sees = env_id, sees
        self._task: Task | None = None

    def reset(self, env: gym.Env, seed: int | None) -> None:
        try:
            self._task = read_task(env.unwrapped)
        except NoPlan as error:
            raise NoPlan(f"planner on {self.env_id} (seed {seed}): {error}") from None
        if self.sees == "agent":
            self._task.plan_on_what_the_agent_sees()
        self._seed = seed

    def act(self, observation: Any) -> int:
        assert self._task is not None, "reset() comes before act()"
        try:
            return self._task.next_action()
        except NoPlan as error:
            raise NoPlan(f"planner on {self.env_id} (seed {self._seed}): {error}; "
                         "this state has no plan: use policy=bot or policy=random here") from None


def planner_for(env_id: str, sees: str = "all") -> PlannerPolicy:
    """The planner, for a MiniGrid or BabyAI id only (it reads their grid), planning on what ``sees`` says."""
    if not is_minigrid(env_id):
        raise MazerunError(f"policy=planner plans on MiniGrid and BabyAI envs only, not {env_id}; "
                           "use policy=heuristic, policy=random or policy=torch_policy there")
    return PlannerPolicy(env_id, sees)
