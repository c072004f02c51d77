"""What installed packages add to mazerun: algorithms, policies and config groups, declared as entry points.

A package (see ``examples/mazerun_awr``) declares in its ``pyproject.toml``::

    [project.entry-points."mazerun.algorithms"]
    awr = "mazerun_awr.awr"                  # a module with Config and Algorithm (mazerun.algorithms.protocol)
    [project.entry-points."mazerun.policies"]
    my_expert = "my_package.experts:MyExpert"  # a Policy class or factory: (env_id, action_space) -> Policy
    [project.entry-points."mazerun.configs"]
    awr = "mazerun_awr"                      # a package holding algorithm/awr.yaml (and policy/, expert/, tuned/...)

The registries (:mod:`mazerun.algorithms`, :mod:`mazerun.acting.policies`) merge these with the
built-ins; mazerun's Hydra plugin (``hydra_plugins/mazerun_searchpath``) puts every config
package on Hydra's search path. Entry points are read once, when a name is first looked up, and
a plugin's module is imported only when a run uses it. A plugin that takes a built-in's name,
or that fails to import, stops the run with one line that names its package.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Iterable

from mazerun.core.errors import MazerunError

ALGORITHM_PLUGINS = "mazerun.algorithms"
POLICY_PLUGINS = "mazerun.policies"
CONFIG_PLUGINS = "mazerun.configs"


def config_dir() -> Path:
    """mazerun's own config groups: conf/ ships inside the wheel as mazerun/conf; a source checkout keeps it at the
    top level."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parent / "conf"


def package_of(entry: EntryPoint) -> str:
    """The installed distribution that declares ``entry`` (what to fix or uninstall)."""
    distribution = getattr(entry, "dist", None)
    return distribution.name if distribution is not None else "an unknown package"


def describe(entry: EntryPoint) -> str:
    """A plugin as error messages name it: its name, what it points at, and its package."""
    return f"{entry.name!r} ({entry.value}, package {package_of(entry)})"


@functools.cache
def plugin_entries(group: str) -> dict[str, EntryPoint]:
    """The entry points of ``group`` by name; the same name from two packages is refused."""
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=group):
        earlier = found.get(entry.name)
        if earlier is not None and earlier.value != entry.value:
            raise MazerunError(f"two installed packages register {entry.name!r} in entry point group {group}: "
                               f"{describe(earlier)} and {describe(entry)}; uninstall one of them")
        found[entry.name] = entry
    return found


def plugins_beside(builtins: Iterable[str], group: str, kind: str) -> dict[str, EntryPoint]:
    """The plugins of ``group``, refusing one that takes the name of a built-in ``kind`` (one of ``builtins``)."""
    plugins = plugin_entries(group)
    for name in sorted(set(builtins) & plugins.keys()):
        entry = plugins[name]
        raise MazerunError(f"the {kind} plugin {describe(entry)} takes the name of mazerun's built-in {kind} {name}; "
                           f"rename it in that package's [project.entry-points.\"{group}\"], or pip uninstall "
                           f"{package_of(entry)}")
    return plugins


def load_plugin(entry: EntryPoint, kind: str) -> Any:
    """What ``entry`` names (a module, or ``module:attribute``), imported now."""
    try:
        return entry.load()
    except Exception as error:  # a plugin's import may raise anything: it is reported, whatever it is
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise MazerunError(f"the {kind} plugin {describe(entry)} fails to import: {type(error).__name__}"
                           f"{': ' + reason if reason else ''}; fix that package or pip uninstall "
                           f"{package_of(entry)}") from error


def config_packages() -> dict[str, str]:
    """Plugin name -> the package holding its config groups (``algorithm/<name>.yaml``...), for ``pkg://`` paths."""
    return {name: entry.value for name, entry in plugin_entries(CONFIG_PLUGINS).items()}


def package_dirs(package: str) -> list[Path]:
    """The directories of an installed package (several for a namespace package), found without importing it; none
    when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    return [Path(location) for location in (spec.submodule_search_locations or [])] if spec is not None else []


def config_package_dirs() -> list[Path]:
    """The directories of the config packages; one that is not installed is refused."""
    directories = []
    for name, package in config_packages().items():
        found = package_dirs(package)
        if not found:
            entry = plugin_entries(CONFIG_PLUGINS)[name]
            raise MazerunError(f"the config plugin {describe(entry)} names no installed package; fix that package's "
                               f"[project.entry-points.\"{CONFIG_PLUGINS}\"] or pip uninstall {package_of(entry)}")
        directories += found
    return directories
