"""The config's ``plugins``: the user's own modules (strategies, datasets, scenario steps, trackers), imported
in every process of a run before anything looks a name up in a registry.

A module registers its classes when it is imported, in the process that imports it. The driver imports the
plugins before it checks the config (so a config may name their classes), and so do the Ray workers, the
aggregator actor, the data check on each node and every run of a sweep, since each is a process of its own.
A plugin is a module name importable there (on ``sys.path``, e.g. shipped with ``ray job submit
--working-dir``) or the path of a ``.py`` file, made absolute when the config is loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from fedsim.config import ConfigError


def is_file_plugin(plugin: str) -> bool:
    return plugin.endswith(".py")


def resolved(plugins: Sequence[str]) -> list[str]:
    """``plugins`` with every ``.py`` path made absolute: workers whose working folder differs find it too."""
    return [str(Path(p).resolve()) if is_file_plugin(p) else p for p in plugins]


def _module_name(path: Path) -> str:
    # one name per file, the same in every process (objects of its classes may travel between them), so that
    # two plugins called util.py in different folders do not collide
    return f"fedsim_plugin_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"


def import_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin once in this process; ConfigError naming the plugin when it cannot be imported."""
    for plugin in plugins:
        try:
            if not is_file_plugin(plugin):
                importlib.import_module(plugin)
                continue
            path = Path(plugin).resolve()
            name = _module_name(path)
            if name in sys.modules:
                continue
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before running it: dataclasses look their module up by name
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        except Exception as err:
            raise ConfigError(f"config key 'plugins' has invalid value {plugin!r}: it cannot be imported here "
                              f"({type(err).__name__}: {err}); expected a module name on sys.path or the path "
                              "of a .py file") from err
