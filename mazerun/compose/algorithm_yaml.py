"""conf/algorithm/<name>.yaml written from each algorithm's ``Config`` dataclass: every default has one source.

Hydra composes ``run algorithm=cql`` from conf/algorithm/cql.yaml, and the run is then checked against
``CQLConfig``. Rather than restate the dataclass, the YAML is generated from it: every field in its order, its
default, and its docstring as the comment above it (the header is the module's first line and the class
docstring), so that the file still tells a user what each key means. ::

    python -m mazerun.compose.algorithm_yaml            # rewrite the YAML of every built-in algorithm
    python -m mazerun.compose.algorithm_yaml --check    # exit 1, naming each YAML that differs from its dataclass

Change a default or its explanation in the dataclass, then regenerate; tests/test_algorithm_yaml.py fails while
a YAML and its dataclass disagree. Hand-written settings per env stay in conf/tuned/ (Hydra merges them over
these). This module sits in ``compose`` because it reads the algorithms (through the registry), which the
``config`` layer below them may not.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from mazerun.algorithms import ALGORITHMS, algorithm_module
from mazerun.config.plugins import config_dir
from mazerun.config.tuned import yaml_scalar
from mazerun.core.errors import MazerunError
from mazerun.core.files import atomic_write_bytes

COMMAND = "python -m mazerun.compose.algorithm_yaml"
BUILT_IN_PACKAGE = "mazerun.algorithms."
"""Algorithms of this package have their YAML in its conf/; a plugin's lives in its own search path."""
INDENT = "  "


def built_in_algorithms() -> list[str]:
    """The registered algorithms whose YAML this package ships."""
    return [name for name in ALGORITHMS if algorithm_module(name).__name__.startswith(BUILT_IN_PACKAGE)]


def _class_definition(klass: type) -> ast.ClassDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    return next(node for node in tree.body if isinstance(node, ast.ClassDef))


def class_docstring(klass: type) -> str | None:
    """The docstring written in ``klass``'s own body (a dataclass without one gets a generated signature)."""
    return ast.get_docstring(_class_definition(klass))


def field_docstrings(config_class: type) -> dict[str, str]:
    """Each field's docstring (the string under it), from the class that last wrote one along the inheritance.

    Python keeps no attribute docstrings at run time, so they are read from the source. A subclass that only
    changes a default (``n_updates: int = 20000``) keeps its base's explanation.
    """
    found: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = _class_definition(klass).body
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                found[statement.target.id] = inspect.cleandoc(following.value.value)
    return {field.name: found[field.name] for field in dataclasses.fields(config_class) if field.name in found}


def plain(text: str) -> str:
    """reStructuredText markup as plain backquotes: ``:class:`~a.B``` and ````x```` become ```a.B``` and ```x```."""
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def comment(text: str, indent: str = "") -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in plain(text).splitlines()]


def field_lines(config: Any, indent: str = "") -> list[str]:
    """Every field of the dataclass instance ``config``: its docstring as a comment, then ``key: default``."""
    docstrings = field_docstrings(type(config))
    lines: list[str] = []
    for field in dataclasses.fields(config):
        if field.name not in docstrings:
            raise MazerunError(f"{type(config).__qualname__}.{field.name} has no docstring; write one under the "
                               f"field (it becomes the key's comment in conf/algorithm/), then run {COMMAND}")
        lines += comment(docstrings[field.name], indent)
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            lines += [f"{indent}{field.name}:", *field_lines(value, indent + INDENT)]
        else:
            lines.append(f"{indent}{field.name}: {yaml_scalar(value)}")
    return lines


def render(name: str) -> str:
    """The text of conf/algorithm/<name>.yaml: the header, then every setting of the algorithm's ``Config``."""
    module = algorithm_module(name)
    config_class = module.Config
    summary = (module.__doc__ or "").strip().split("\n\n")[0]
    header = [*comment(summary), *comment(class_docstring(config_class) or "")]
    source = f"{config_class.__module__}.{config_class.__qualname__}"
    for kind, values in getattr(config_class, "kind_defaults", {}).items():
        taken = ", ".join(f"{key}={yaml_scalar(value)}" for key, value in values.items())
        header += comment(textwrap.fill(f"On {kind} observations a key left at its default here "
                                        f"takes instead: {taken}.", width=110))
    header += [f"# Generated from {source} by `{COMMAND}`:",
               "# change a default or its explanation there, then run that again."]
    return "\n".join([*header, "", *field_lines(config_class())]) + "\n"


def stale(directory: Path) -> list[str]:
    """The built-in algorithms whose YAML under ``directory`` is missing or differs from its dataclass."""
    return [name for name in built_in_algorithms()
            if not (path := directory / f"{name}.yaml").is_file() or path.read_text() != render(name)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a YAML differs from its dataclass")
    parser.add_argument("--conf-dir", type=Path, default=None,
                        help="the conf/ directory to write or check (default: the one `run` reads)")
    arguments = parser.parse_args(argv)
    directory = (arguments.conf_dir or config_dir()) / "algorithm"
    try:
        differing = stale(directory)
        if not differing:
            print(f"{directory}: every algorithm's YAML matches its dataclass")
        elif arguments.check:
            files = ", ".join(f"{directory / name}.yaml" for name in differing)
            verb = "differs from its dataclass" if len(differing) == 1 else "differ from their dataclasses"
            print(f"error: {files} {verb}; run {COMMAND}", file=sys.stderr)
            return 1
        else:
            directory.mkdir(parents=True, exist_ok=True)
            for name in differing:
                atomic_write_bytes(directory / f"{name}.yaml", render(name).encode())
                print(f"wrote {directory / name}.yaml")
    except MazerunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
