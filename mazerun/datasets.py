"""``python -m mazerun.datasets``: convert, append, export and describe offline datasets.

The formats themselves (HDF5, Minari, columnar stores, trajectory_data) are read and written in
:mod:`mazerun.data.formats` and :mod:`mazerun.data.store`; this entry adds what needs an env
(the spaces a store checks against, the env spec a Minari dataset carries) and the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Iterable, Sequence

from mazerun.core import interrupts

if __name__ == "__main__":  # `python -m mazerun.datasets`: stop signals handled before numpy and torch load
    interrupts.run_command("mazerun.datasets")

import numpy as np

from mazerun.acting.envs import env_spaces, make_env
from mazerun.core.errors import MazerunError
from mazerun.core.progress import Progress
from mazerun.data.formats import (
    D3RLPY_PREFIX,
    MINARI_PREFIX,
    is_d3rlpy,
    is_hdf5,
    is_minari,
    iter_source_records,
    load_dataset_records,
    write_d3rlpy,
    write_hdf5,
    write_minari,
)
from mazerun.data.store import EPISODE_COLUMNS, STORE_FORMAT, STORE_VERSION, ColumnarStore, StoreWriter


def write_store(sources: Iterable[str], destination: str | Path, *, append: bool = False,
                env_id: str | None = None) -> str:
    """Convert (or append) every episode of ``sources`` into the store at ``destination``; says what it wrote."""
    destination = Path(destination)
    sources = list(sources)
    for source in sources:
        if Path(source).resolve() == destination.resolve():
            raise MazerunError(f"{source} is the destination itself; name other sources")
    with StoreWriter(destination, env_spaces, append=append) as writer:
        with Progress(None, unit="episode", desc="checking", leave=False) as checked:
            for source in sources:  # every episode is checked before the first is written: a bad one changes nothing
                for record, where in iter_source_records(source, env_id):
                    writer.check(record, where)
                    checked.update()
        with Progress(checked.done, unit="episode", desc="writing") as written:
            for source in sources:
                for record, where in iter_source_records(source, env_id):
                    writer.add(record, where)
                    written.update()
        if writer.added == 0:
            raise MazerunError(f"{', '.join(sources)} hold no episodes")
    index = writer.index
    verb = "appended" if append else "wrote"
    return (f"{verb} {writer.added} episodes to {destination}: now {index['episodes']} episodes, "
            f"{index['transitions']} transitions of {index['env_id']}")


def describe(path: str | Path) -> str:
    store = ColumnarStore.open(path)
    columns = ", ".join(f"{name} {np.dtype(spec['dtype'])}{tuple(spec['shape'])}"
                        for name, spec in store.index["columns"].items() if name not in EPISODE_COLUMNS)
    size = sum((store.path / f"{name}.bin").stat().st_size for name in store.columns)
    return (f"{store.path}: format {STORE_FORMAT} version {STORE_VERSION}, env {store.env_id}, "
            f"{store.n_episodes} episodes, {store.n_transitions} transitions, {size / 2**20:.1f} MiB; "
            f"columns: {columns}; policies: {', '.join(store.policies)}")


def export(source: Sequence[str], destination: str, env_id: str | None = None) -> str:
    """Read ``source`` (any readable format) and write it to ``destination``; returns what was written."""
    records = load_dataset_records(list(source), env_id)
    if not records:
        raise MazerunError(f"{', '.join(source)} holds no episodes")
    steps = sum(len(record) for record in records)
    if is_minari(destination):
        env = make_env(records[0].env_id)
        try:
            where = write_minari(records, destination[len(MINARI_PREFIX):], env)
        finally:
            env.close()
    elif is_d3rlpy(destination):
        where = Path(destination[len(D3RLPY_PREFIX):])
        write_d3rlpy(records, where)
    elif is_hdf5(destination):
        write_hdf5(records, Path(destination))
        where = Path(destination)
    else:
        raise MazerunError(f"export destination {destination!r} is neither an .h5/.hdf5 file, minari:<id> "
                           "nor d3rlpy:<file>")
    return f"wrote {len(records)} episodes ({steps} steps) of {records[0].env_id} to {where}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mazerun.datasets",
        description="Convert offline datasets: trajectory_data, HDF5 files, local Minari datasets, d3rlpy files and "
                    "columnar stores.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sources_help = "trajectory_data directories, record files, .h5 files, minari:<id>, d3rlpy:<file> or stores"
    command = commands.add_parser("export", help="write any sources to HDF5 (D4RL's layout), Minari or d3rlpy")
    command.add_argument("source", nargs="+", help=sources_help)
    command.add_argument("destination", help="<file>.h5, minari:<dataset id> (e.g. minari:mazerun/lunar-noisy-v0) "
                                             "or d3rlpy:<file> (an MDPDataset file)")
    command.add_argument("--env", default=None, help="env id of sources that do not name one")
    for name, text in (("convert", "write a new columnar store from any sources"),
                       ("append", "append the episodes of any sources to an existing store (a sweep's stores)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("source", nargs="+", help=sources_help)
        command.add_argument("destination", help="the store directory")
        command.add_argument("--env", default=None, help="env id of sources that do not name one")
    info = commands.add_parser("info", help="describe a columnar store")
    info.add_argument("store")
    d4rl = commands.add_parser("d4rl", help="D4RL-style random, medium, medium-replay and expert datasets of a SAC run")
    d4rl.add_argument("sac_run", help="a run of `run algorithm=sac` (its snapshots and last.pt's replay buffer)")
    d4rl.add_argument("--out", required=True, help="the directory the four datasets and references.json go to")
    d4rl.add_argument("--episodes", type=int, default=100, help="episodes of random, medium and expert each")
    d4rl.add_argument("--seed", type=int, default=0, help="episode i is seeded seed + i")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress lines of a long conversion
    try:
        if arguments.command == "info":
            outcome = describe(arguments.store)
        elif arguments.command == "d4rl":
            from mazerun.compose.d4rl import make_d4rl_datasets

            if arguments.episodes < 1:
                raise MazerunError(f"--episodes={arguments.episodes}: record at least 1 episode per dataset")
            references = make_d4rl_datasets(arguments.sac_run, arguments.out, episodes=arguments.episodes,
                                            seed=arguments.seed)
            outcome = f"wrote {', '.join(references['datasets'])} and references.json to {arguments.out}"
        elif arguments.command == "export":
            outcome = export(arguments.source, arguments.destination, arguments.env)
        else:
            outcome = write_store(arguments.source, arguments.destination, append=arguments.command == "append",
                                  env_id=arguments.env)
    except MazerunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print("error: stopped; nothing was written", file=sys.stderr)
        return interrupts.exit_code(interrupt)
    interrupts.done()  # written: a stop while the line below prints is too late to undo anything
    print(outcome)
    return 0
