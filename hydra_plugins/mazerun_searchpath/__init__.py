"""mazerun's Hydra plugin: the config groups of installed mazerun plugins join `run`'s own.

Hydra finds this module because it lies in the ``hydra_plugins`` namespace package, and asks
every :class:`SearchPathPlugin` to extend the config search path before composing. For `run`
(whose primary config directory is mazerun's conf/) it appends ``pkg://<package>`` for every
package an installed plugin declares in the entry point group ``mazerun.configs``, so that
``run algorithm=awr`` finds ``algorithm/awr.yaml`` inside that package. mazerun's own files come
first: a plugin's file of the same name is never read.

A policy plugin (group ``mazerun.policies``) needs no YAML: each one gets the options
``policy/<name>`` and ``expert/<name>`` with the schema's defaults, in Hydra's ConfigStore
(searched last, so a YAML the plugin ships wins). Other Hydra apps are left as they are.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin

from mazerun.config.plugins import POLICY_PLUGINS, config_dir, config_packages, plugin_entries
from mazerun.config.schemas import ExpertConfig, PolicyConfig


def is_mazerun(search_path: ConfigSearchPath) -> bool:
    """Whether the app composing is `run`: its primary config directory is mazerun's conf/."""
    mazerun_conf = config_dir().resolve()
    return any(element.provider == "main" and Path(element.path.removeprefix("file://")).resolve() == mazerun_conf
               for element in search_path.get_path())


class MazerunPluginsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not is_mazerun(search_path):
            return
        for name, package in sorted(config_packages().items()):
            search_path.append(provider=f"mazerun plugin {name}", path=f"pkg://{package}")
        store = ConfigStore.instance()
        for name in plugin_entries(POLICY_PLUGINS):
            store.store(group="policy", name=name, node=PolicyConfig(name=name), provider=f"mazerun plugin {name}")
            store.store(group="expert", name=name, node=ExpertConfig(name=name), provider=f"mazerun plugin {name}")
