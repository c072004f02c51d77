"""conf/algorithm/*.yaml are generated from the algorithms' Config dataclasses: one source for every default.

A YAML that disagrees with its dataclass (a default changed in one place only, a key added or renamed, an
explanation edited) fails here until ``python -m mazerun.compose.algorithm_yaml`` writes it again.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli
from omegaconf import OmegaConf

from mazerun.algorithms import ALGORITHMS, algorithm_module
from mazerun.compose.algorithm_yaml import COMMAND, built_in_algorithms, field_docstrings, main, plain, render

GENERATOR = (sys.executable, "-m", "mazerun.compose.algorithm_yaml")
CONF = REPO / "conf" / "algorithm"


def test_every_built_in_algorithm_has_a_yaml_and_every_yaml_an_algorithm() -> None:
    assert sorted(path.stem for path in CONF.glob("*.yaml")) == sorted(built_in_algorithms())


@pytest.mark.parametrize("name", built_in_algorithms())
def test_the_yaml_is_what_its_dataclass_generates(name: str) -> None:
    assert (CONF / f"{name}.yaml").read_text() == render(name), f"conf/algorithm/{name}.yaml is stale; run {COMMAND}"


@pytest.mark.parametrize("name", built_in_algorithms())
def test_the_yaml_holds_every_default_and_explains_every_key(name: str) -> None:
    """The generated text loads as the dataclass's defaults, and every key has its docstring as the comment above."""
    config_class = algorithm_module(name).Config
    text = render(name)
    assert OmegaConf.to_container(OmegaConf.create(text)) == OmegaConf.to_container(OmegaConf.structured(config_class))
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            assert lines[number - 1].lstrip().startswith("# "), f"{name}.yaml: {line!r} has no comment"
    for field in dataclasses.fields(config_class):
        docstring = field_docstrings(config_class)[field.name]
        assert f"# {plain(docstring.splitlines()[0])}" in text


def test_the_check_command_passes_on_the_conf_run_reads() -> None:
    checked = subprocess.run([*GENERATOR, "--check"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == f"{CONF}: every algorithm's YAML matches its dataclass\n"


def test_the_command_writes_the_yamls_and_check_names_a_stale_one(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    directory = tmp_path / "algorithm"
    assert main(["--conf-dir", str(tmp_path)]) == 0
    for name in built_in_algorithms():
        assert (directory / f"{name}.yaml").read_text() == (CONF / f"{name}.yaml").read_text()
    capsys.readouterr()

    stale = directory / "cql.yaml"
    stale.write_text(stale.read_text().replace("alpha: 1.5", "alpha: 2.0"))
    (directory / "iql.yaml").unlink()
    assert main(["--check", "--conf-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: {stale}, {directory / 'iql.yaml'} differ from their dataclasses; "
                                       f"run {COMMAND}\n")
    assert "alpha: 2.0" in stale.read_text()  # --check writes nothing

    assert main(["--conf-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {stale}", f"wrote {directory / 'iql.yaml'}"]
    assert stale.read_text() == (CONF / "cql.yaml").read_text()


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_cfg_job_shows_every_setting_with_its_default(name: str, tmp_path: Path) -> None:
    """What `run algorithm=<name> --cfg job` prints: every key of the dataclass, at its default (Hydra prints
    values only; each key's meaning is the comment above it in conf/algorithm/<name>.yaml)."""
    result = run_cli(f"algorithm={name}", "--cfg", "job", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)["algorithm"]
    config_class = algorithm_module(name).Config
    assert shown == OmegaConf.to_container(OmegaConf.structured(config_class))
