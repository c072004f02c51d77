"""Every command README.md and the comments of conf/ show runs as written, through the real CLI.

Placeholders (``outputs/<bc run>``, ``<records>``...) are filled with runs that module-scoped
fixtures make once; tiny budgets are appended as overrides (Hydra lets the last value of a key
win), so a default that the checks refuse, or a README command that no longer parses, fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml
from _pytest.mark import ParameterSet
from conftest import DATASETS, EXPORT, MAZERUN, REPO, install_example, run_cli, spawn_cli

from mazerun.algorithms import ALGORITHMS, algorithm_module

TIMEOUT = 240
"""Seconds one command may take on 2 shared cores (they take 1-10)."""

EXCLUDED: dict[str, str] = {
    "hydra/launcher=ray": "the Ray launcher is the `ray` extra, which the test extra leaves out (a few hundred MB, "
                          "a local cluster of daemons)",
    "hydra/launcher=submitit_slurm": "needs a SLURM cluster (sbatch, a partition)",
    "<trajectory_data | .pkl": "a syntax line: its alternatives are not one command",
}
"""A substring of each command that cannot run here, and why; every other command runs."""

MIN_README_COMMANDS = 61
MIN_CONF_COMMANDS = 8
"""What the extraction found when this test was written: a README reformat that breaks it fails loudly."""

# --- extraction --------------------------------------------------------------------------------------

COMMAND_START = re.compile(r"(run|python -m mazerun\S*|torchrun\s.*?-m mazerun)(\s|$)")
CONF_BACKTICKED = re.compile(r"`(run(?:\s[^`]*)?)`")
CONF_BARE = re.compile(r"(?<![\w`<./-])run\s+([^;()`]*)")
WORD = re.compile(r"(?:<[^>]*>|[^\s<])+")
"""A word of a comment; a placeholder such as ``<bc run>`` stays one word."""
ARGUMENT = re.compile(r"-.+|[\w.@/+~-]+=.*")
"""A flag or an override; prose after a command (``(total_steps is the total)``) is neither."""


def comment_start(line: str) -> int | None:
    """Where ``line``'s comment starts: a ``#`` outside quotes at the start of a word (shell and YAML alike)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return index
    return None


def readme_commands(markdown: str) -> list[str]:
    """The `run`, `python -m mazerun...` and `torchrun ... -m mazerun` lines of the code blocks, continuations joined."""
    commands: list[str] = []
    in_block, pending = False, ""
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        command = line[:comment_start(line)].rstrip()
        if COMMAND_START.match(command):
            commands.append(command)
    return commands


def conf_commands(text: str) -> list[str]:
    """The `run` commands of YAML comments: in backticks, or bare up to ``;``, a bracket, a backtick or prose."""
    commands: list[str] = []
    for line in text.splitlines():
        start = comment_start(line)
        if start is None:
            continue
        comment = line[start:]
        commands += [match.group(1).strip() for match in CONF_BACKTICKED.finditer(comment)]
        for match in CONF_BARE.finditer(comment):
            arguments: list[str] = []
            for word in WORD.findall(match.group(1)):
                follows_flag = bool(arguments) and arguments[-1] in ("-cn", "--config-name")
                if word == "..." or not (ARGUMENT.fullmatch(word) or follows_flag):
                    break
                arguments.append(word)
            if arguments:
                commands.append(" ".join(["run", *arguments]))
    return commands


README_COMMANDS = readme_commands((REPO / "README.md").read_text())
CONF_COMMANDS = [command for path in sorted((REPO / "conf").rglob("*.yaml")) for command in conf_commands(path.read_text())]
COMMANDS = list(dict.fromkeys(README_COMMANDS + CONF_COMMANDS))


def test_extraction_by_hand() -> None:
    markdown = "\n".join([
        "run prose=1 is not in a block",
        "```",
        "run a=1 b='#x'   # a comment",
        "run -m c=1,2 \\",
        "    d=2          # continued",
        "pip install mazerun",
        "python bench/bc.py",
        "torchrun --nproc_per_node=2 -m mazerun e=3",
        "python -m mazerun.datasets info <store>",
        "```",
    ])
    assert readme_commands(markdown) == [
        "run a=1 b='#x'", "run -m c=1,2 d=2", "torchrun --nproc_per_node=2 -m mazerun e=3",
        "python -m mazerun.datasets info <store>",
    ]
    conf = "\n".join([
        "# `run` alone; scratch: run algorithm=ppo; clone: run algorithm=ppo input_dir=outputs/<bc run> (a note)",
        "key: 1  # `run -cn conf_train`: an earlier run or a checkpoint (run x=1 ...) and run.log",
        "# a training run: policy=torch_policy input_dir=outputs/<run>",
    ])
    assert conf_commands(conf) == [
        "run", "run algorithm=ppo", "run algorithm=ppo input_dir=outputs/<bc run>", "run -cn conf_train", "run x=1",
    ]


def test_extraction_finds_every_command() -> None:
    """Fewer commands than before means the extraction broke; every exclusion must still name a command."""
    assert len(README_COMMANDS) >= MIN_README_COMMANDS, README_COMMANDS
    assert len(CONF_COMMANDS) >= MIN_CONF_COMMANDS, CONF_COMMANDS
    for key in EXCLUDED:
        assert any(key in command for command in COMMANDS), f"{key!r} matches no command any more"


# --- tiny budgets -----------------------------------------------------------------------------------

EPISODES = ["runner.max_episode_steps=60", "runner.eval_repeats=1"]
"""Every run: short episodes and one evaluation episode."""
BUDGETS: dict[str, list[str]] = {
    "record": ["n_episodes=2"],
    "bc": ["n_updates=2", "eval_every=2"],
    "cql": ["n_updates=2", "eval_every=2"],
    "iql": ["n_updates=2", "eval_every=2"],
    # 16 steps x 16 envs = 256 per rollout: a multiple of every batch_size (64, CartPole's tuned 256)
    "ppo": ["total_steps=512", "n_steps=16", "eval_every=512"],
    "dagger": ["total_steps=256", "n_steps=16", "n_updates=2", "refit_updates=2", "eval_every=256"],  # 16 steps a copy: a GRU's chunk
    "sac": ["total_steps=64", "learning_starts=16", "batch_size=16", "buffer_size=1000", "eval_every=64"],
    "td3_bc": ["n_updates=2", "eval_every=2"],
    "awr": ["n_updates=2", "eval_every=2"],  # the plugin examples/mazerun_awr
}
"""Keys of an algorithm (or record stage) and their tiny values; ``algorithm.`` or ``pipeline.stages.<stage>.`` goes before."""
EVOLUTION = ["hpo.max_steps=4", "hpo.evo_steps=2", "hpo.population_size=2", "hpo.eval_loop=1"]


def pipeline_stages(pipeline: str) -> dict[str, str]:
    """Stage name -> its algorithm (or ``record``), from the pipeline's defaults list."""
    defaults = yaml.safe_load((REPO / "conf" / "pipeline" / f"{pipeline}.yaml").read_text())["defaults"]
    return {key.split("@stages.")[1]: value for entry in defaults if isinstance(entry, dict) for key, value in entry.items()}


def overrides_of(arguments: list[str]) -> dict[str, str]:
    return dict(argument.split("=", 1) for argument in arguments if "=" in argument and not argument.startswith("-"))


def trained_algorithm(arguments: list[str]) -> str | None:
    """``algorithm=``'s choice, else bc under ``-cn conf_train``; None: a recording (or a pipeline)."""
    config = next((value for flag, value in zip(arguments, arguments[1:]) if flag in ("-cn", "--config-name")), None)
    return overrides_of(arguments).get("algorithm", "bc" if config == "conf_train" else None)


def tiny_budgets(arguments: list[str]) -> list[str]:
    """Overrides that shrink what ``arguments`` run (a recording, an algorithm, a population, a pipeline, a sweep)."""
    overrides, algorithm = overrides_of(arguments), trained_algorithm(arguments)
    budgets = list(EPISODES)
    if "pipeline" in overrides:
        for stage, kind in pipeline_stages(overrides["pipeline"]).items():
            budgets += [f"pipeline.stages.{stage}.{budget}" for budget in BUDGETS[kind]]
    elif algorithm is not None:
        budgets += [f"algorithm.{budget}" for budget in BUDGETS[algorithm]]
        budgets += EVOLUTION if overrides.get("hpo") == "evolution" else []
    else:
        budgets += [f"runner.{budget}" for budget in BUDGETS["record"]]
    if overrides.get("hydra/sweeper") == "optuna":
        budgets.append("hydra.sweeper.n_trials=2")
    return budgets


# --- fixtures: one run of each kind a placeholder names -----------------------------------------------

def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stderr[-3000:]}"


def tiny_run(directory: Path, *arguments: str, then: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Path:
    """`run <arguments>` into ``directory`` with its tiny budgets, then the overrides ``then`` (which win)."""
    check(run_cli(*arguments, *tiny_budgets(list(arguments)), *then, f"hydra.run.dir={directory}",
                  cwd=directory.parent, env=env, timeout=TIMEOUT))
    return directory


def datasets(*arguments: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    """`python -m mazerun.datasets <arguments>`, which must succeed."""
    check(run_cli(*arguments, program=DATASETS, cwd=cwd, env=env, timeout=TIMEOUT))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def lunar_recording(runs: Path) -> Path:
    """4 heuristic episodes: enough for a validation split."""
    return tiny_run(runs / "lunar", "env=LunarLander-v3", "policy=heuristic", then=("runner.n_episodes=4",))


@pytest.fixture(scope="module")
def lunar_records(lunar_recording: Path) -> Path:
    return lunar_recording / "trajectory_data"


@pytest.fixture(scope="module")
def bot_recording(runs: Path) -> Path:
    """12 bot episodes (about 50 steps): more than the longest chunk a command trains on (rollout_len=32)."""
    return tiny_run(runs / "bot", "env=BabyAI-GoToLocal-v0", "policy=bot", then=("runner.n_episodes=12",))


@pytest.fixture(scope="module")
def bot_records(bot_recording: Path) -> Path:
    return bot_recording / "trajectory_data"


@pytest.fixture(scope="module")
def bc_run(runs: Path, lunar_records: Path) -> Path:
    return tiny_run(runs / "bc", "-cn", "conf_train", f"runner.dataset.dir_or_file={lunar_records}")


@pytest.fixture(scope="module")
def recurrent_bc_run(runs: Path, bot_records: Path) -> Path:
    return tiny_run(runs / "gru", "-cn", "conf_train", "env=BabyAI-GoToLocal-v0", "model.memory=gru",
                    f"runner.dataset.dir_or_file={bot_records}")


@pytest.fixture(scope="module")
def ppo_run(runs: Path) -> Path:
    """One rollout, half the commands' budget: continuing it trains on."""
    return tiny_run(runs / "ppo", "algorithm=ppo", then=("algorithm.total_steps=256",))


@pytest.fixture(scope="module")
def sac_run(runs: Path) -> Path:
    """Half the commands' budget on Pendulum: continuing it trains on."""
    return tiny_run(runs / "sac", "algorithm=sac", "env=Pendulum-v1", then=("algorithm.total_steps=32",))


@pytest.fixture(scope="module")
def hopper_datasets(runs: Path) -> Path:
    """`datasets d4rl` of a tiny SAC run on Hopper (2 episodes each): what README's Hopper dataset lines read."""
    sac = tiny_run(runs / "hopper_sac", "algorithm=sac", "env=Hopper-v5")
    datasets("d4rl", str(sac), "--out", str(runs / "hopper_sets"), "--episodes", "2", cwd=runs)
    return runs / "hopper_sets"


@pytest.fixture(scope="module")
def continuous_records(runs: Path) -> Path:
    """2 heuristic episodes of LunarLanderContinuous-v3 (Box actions)."""
    return tiny_run(runs / "continuous", "env=LunarLanderContinuous-v3", "policy=heuristic") / "trajectory_data"


@pytest.fixture(scope="module")
def continuous_bc_run(runs: Path, continuous_records: Path) -> Path:
    return tiny_run(runs / "continuous_bc", "-cn", "conf_train", f"runner.dataset.dir_or_file={continuous_records}")


@pytest.fixture(scope="module")
def td3_bc_run(runs: Path, continuous_records: Path) -> Path:
    return tiny_run(runs / "td3_bc", "-cn", "conf_train", "algorithm=td3_bc",
                    f"runner.dataset.dir_or_file={continuous_records}")


@pytest.fixture(scope="module")
def evolution_run(runs: Path, lunar_records: Path) -> Path:
    """Half the commands' learn steps: continuing it searches on."""
    return tiny_run(runs / "evolution", "-cn", "conf_train", "algorithm=cql", "hpo=evolution",
                    f"runner.dataset.dir_or_file={lunar_records}", then=("hpo.max_steps=2",))


@pytest.fixture(scope="module")
def stopped_pipeline_run(runs: Path) -> Path:
    """bc_ppo stopped by Ctrl-C as its ppo stage starts: record and bc finished, ppo not.

    A stop at a fixed line, not after some PPO iterations: those take a tenth of a second, and a
    stage that reached the commands' budget would be refused as trained, not continued.
    """
    directory = runs / "stopped"
    arguments = ["pipeline=bc_ppo", *tiny_budgets(["pipeline=bc_ppo"]), "pipeline.stages.ppo.total_steps=1000000"]
    with spawn_cli(*arguments, f"hydra.run.dir={directory}", cwd=runs) as process:
        deadline = time.monotonic() + TIMEOUT
        for line in process.stderr:
            if line.startswith("stage 3/3") or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130, stderr
    stages = json.loads((directory / "pipeline.json").read_text())["stages"]
    assert [stage["finished"] for stage in stages] == [True, True, False], stages
    return directory


@pytest.fixture(scope="module")
def pipeline_run(runs: Path, stopped_pipeline_run: Path) -> Path:
    """The stopped pipeline continued to its end: a finished one, without recording and cloning again."""
    return tiny_run(runs / "pipeline", "pipeline=bc_ppo", f"input_dir={stopped_pipeline_run}")


@pytest.fixture(scope="module")
def awr_plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the commands that name the plugin examples/mazerun_awr: it is pip-installed there."""
    return install_example("mazerun_awr", tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def awr_run(runs: Path, lunar_records: Path, awr_plugin: dict[str, str]) -> Path:
    """Half the commands' updates: continuing it trains on."""
    return tiny_run(runs / "awr", "-cn", "conf_train", "algorithm=awr", f"runner.dataset.dir_or_file={lunar_records}",
                    then=("algorithm.n_updates=1",), env=awr_plugin)


@pytest.fixture(scope="module")
def lunar_h5(runs: Path, lunar_records: Path) -> Path:
    datasets("export", str(lunar_records), str(runs / "lunar.h5"), cwd=runs)
    return runs / "lunar.h5"


@pytest.fixture(scope="module")
def cartpole_h5(runs: Path) -> Path:
    """A CartPole recording exported to HDF5, its env_id attribute removed: a file that names no env."""
    recording = tiny_run(runs / "cartpole", "env=CartPole-v1")
    datasets("export", str(recording / "trajectory_data"), str(runs / "cartpole.h5"), cwd=runs)
    with h5py.File(runs / "cartpole.h5", "r+") as file:
        del file.attrs["env_id"]
    return runs / "cartpole.h5"


@pytest.fixture(scope="module")
def minari_root(runs: Path, lunar_records: Path) -> Path:
    """A MINARI_DATASETS_PATH holding the README's dataset id."""
    root = runs / "minari"
    datasets("export", str(lunar_records), "minari:mazerun/lunar-noisy-v0", cwd=runs,
             env={"MINARI_DATASETS_PATH": str(root)})
    return root


@pytest.fixture(scope="module")
def lunar_d3rlpy(runs: Path, lunar_records: Path) -> Path:
    datasets("export", str(lunar_records), f"d3rlpy:{runs / 'lunar_d3rlpy.h5'}", cwd=runs)
    return runs / "lunar_d3rlpy.h5"


@pytest.fixture(scope="module")
def seed_sweep(runs: Path, lunar_records: Path) -> Path:
    """Two seeds of a tiny BC run, laid out as `run -m` lays out a sweep."""
    arguments = ["-m", "-cn", "conf_train", "runner.seed=0,1", f"runner.dataset.dir_or_file={lunar_records}"]
    check(run_cli(*arguments, *tiny_budgets(arguments), f"hydra.sweep.dir={runs / 'sweep'}", cwd=runs,
                  timeout=TIMEOUT))
    return runs / "sweep"


@pytest.fixture(scope="module")
def store(runs: Path, lunar_records: Path) -> Path:
    datasets("convert", str(lunar_records), str(runs / "lunar.store"), cwd=runs)
    return runs / "lunar.store"


@pytest.fixture
def store_copy(store: Path, tmp_path: Path) -> Path:
    """A store of the test's own, for a command that appends to it."""
    return Path(shutil.copytree(store, tmp_path / "existing.store"))


@pytest.fixture(scope="module")
def exported_onnx(runs: Path, recurrent_bc_run: Path) -> Path:
    """The recurrent BabyAI clone as ONNX, its interface JSON beside it."""
    check(run_cli(str(recurrent_bc_run), "--format", "onnx", "--out", str(runs / "gru.onnx"), program=EXPORT,
                  cwd=runs, timeout=TIMEOUT))
    return runs / "gru.onnx"


@pytest.fixture(scope="module")
def gym_id() -> str:
    return "CartPole-v1"


PLACEHOLDERS: dict[str, str] = {
    "<abs path>": "lunar_recording",
    "outputs/<recording>": "lunar_recording",
    "<records>": "lunar_records",
    "<bot records>": "bot_records",
    "<10k bot demos>": "bot_records",
    "outputs/<bc run>": "bc_run",
    "outputs/<any training run>": "bc_run",
    "outputs/<a trained run>": "bc_run",
    "outputs/<recurrent bc run>": "recurrent_bc_run",
    "outputs/<recurrent run>": "recurrent_bc_run",
    "outputs/<ppo run>": "ppo_run",
    "outputs/<sac run>": "sac_run",
    "outputs/<continuous bc run>": "continuous_bc_run",
    "outputs/<td3_bc run>": "td3_bc_run",
    "<continuous records>": "continuous_records",
    "outputs/<awr run>": "awr_run",
    "outputs/<evolution run>": "evolution_run",
    "outputs/<a stopped pipeline run>": "stopped_pipeline_run",
    "outputs/<a pipeline run>": "pipeline_run",
    "multirun/<a sweep>": "seed_sweep",
    "<store>": "store",
    "<sources>...": "store",
    "<existing store>": "store_copy",
    "<id>": "gym_id",
    "<an exported .onnx>": "exported_onnx",
}
"""Placeholder -> the fixture whose value replaces it."""

DATA_FILES: dict[str, str] = {"data/lunar.h5": "lunar_h5", "data/cartpole.h5": "cartpole_h5",
                              "data/lunar.store": "store", "data/lunar_d3rlpy.h5": "lunar_d3rlpy",
                              "data/hopper/medium-replay": "hopper_datasets/medium-replay",
                              "data/hopper/medium/trajectory_data": "hopper_datasets/medium/trajectory_data"}
"""Files the README names relative to the working directory -> the fixture linked there (or a path below it)."""

OFFLINE = (*(name for name in ALGORITHMS if algorithm_module(name).Config().needs_dataset), "awr")
"""Algorithms that read records (built-ins, and the plugin examples/mazerun_awr): without
runner.dataset.dir_or_file, the newest recording under outputs/."""


def fill(command: str, request: pytest.FixtureRequest) -> str:
    """``command`` with every placeholder replaced; one no fixture fills fails the test."""
    for placeholder, fixture in PLACEHOLDERS.items():
        if placeholder in command:
            command = command.replace(placeholder, str(request.getfixturevalue(fixture)))
    if unfilled := re.search(r"<[^>]*>", command):
        pytest.fail(f"no fixture fills {unfilled.group()} in {command}")
    return command


def prepare_workdir(argv: list[str], workdir: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """Lay out what ``argv`` reads relative to ``workdir``; returns the environment it runs in.

    A `datasets export/convert` writes its last argument, which must not exist yet; every
    ``data/`` file and ``minari:`` id it or a `run` names otherwise is read. An offline
    training run without ``runner.dataset.dir_or_file`` reads the newest recording under
    ``outputs/``: the README records one of the env it trains on just before.
    """
    written = None
    if argv[1:3] == ["-m", "mazerun.datasets"] and argv[3] in ("export", "convert"):
        written = argv[-1]
    elif argv[1:4] == ["-m", "mazerun.datasets", "d4rl"]:
        written = argv[argv.index("--out") + 1]
    read = [argument.split("=", 1)[-1].removeprefix("d3rlpy:") for argument in argv if argument != written]
    for name in sorted({path for path in read if path.startswith("data/")}):
        if name not in DATA_FILES:
            pytest.fail(f"no fixture makes {name}")
        fixture, _, below = DATA_FILES[name].partition("/")
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).symlink_to(Path(request.getfixturevalue(fixture)) / below)
    reads_minari = any(path.startswith("minari:") for path in read)
    overrides = overrides_of(argv)
    if trained_algorithm(argv) in OFFLINE and not {"runner.dataset.dir_or_file", "pipeline"} & overrides.keys():
        recording = "bot_recording" if "BabyAI" in " ".join(argv) else "lunar_recording"
        run_dir = workdir / "outputs" / "2026-01-01" / "00-00-00-000000"  # named as Hydra names one
        shutil.copytree(request.getfixturevalue(recording), run_dir)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    return {
        "MINARI_DATASETS_PATH": str(request.getfixturevalue("minari_root") if reads_minari else workdir / "minari"),
        "SDL_VIDEODRIVER": "dummy",  # no display here: runner.render=true draws into SDL's dummy window
        "PET_MASTER_PORT": str(port),  # torchrun's --master_port: its 29500 may be another suite's
    }


def program_of(argv: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """The process a command's first word names (this venv's), and the arguments that follow it."""
    first, rest = argv[0], argv[1:]
    if first == "run":
        return MAZERUN, rest
    if first == "python":
        return (sys.executable,), rest
    return (str(Path(sys.executable).parent / first),), rest


def case(command: str) -> ParameterSet:
    marks = [pytest.mark.skip(reason=reason) for key, reason in EXCLUDED.items() if key in command]
    short = command if len(command) <= 110 else f"{command[:60]}...{command[-45:]}"  # -k finds both ends
    return pytest.param(command, marks=marks, id=short)


@pytest.mark.parametrize("command", [case(command) for command in COMMANDS])
def test_command_exits_0(command: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    argv = shlex.split(fill(command, request))
    env = prepare_workdir(argv, tmp_path, request)
    if "awr" in command:
        env.update(request.getfixturevalue("awr_plugin"))
    program, arguments = program_of(argv)
    budgets = tiny_budgets(arguments) if "mazerun" in (*program, *arguments) else []  # not mazerun.datasets
    result = run_cli(*arguments, *budgets, program=program, cwd=tmp_path, env=env, timeout=TIMEOUT)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
