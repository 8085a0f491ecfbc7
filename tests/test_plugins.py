"""The config's ``plugins``: the user's modules are imported before the config is checked, in the driver and
in Ray's actors, and a resumed run imports none of them until the command line repeats them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fedsim.algorithms import SERVER_STRATEGIES
from fedsim.cli import main
from fedsim.config import ConfigError, to_yaml
from fedsim.validation import load_config

from conftest import REPO

QUICKSTART = REPO / "experiments" / "quickstart.yaml"
NAME = "plugin_fedavg"


def write_plugin(folder: Path, marker: Path | None = None) -> Path:
    """A server strategy in a file of its own; importing it touches ``marker``, so a test can tell whether it
    ran."""
    plugin = folder / "my_strategy.py"
    touch = f"Path({str(marker)!r}).touch()\n" if marker else ""
    plugin.write_text(f"""from pathlib import Path

from fedsim.algorithms.server import FedAvg, register

{touch}

@register
class PluginFedAvg(FedAvg):
    name = {NAME!r}
""")
    return plugin


@pytest.fixture
def unregistered():
    """Whatever the test's plugins register is gone afterwards."""
    yield
    SERVER_STRATEGIES.pop(NAME, None)
    for module in [m for m in sys.modules if m.startswith("fedsim_plugin_")]:
        del sys.modules[module]


def test_plugins_register_before_the_config_is_checked_in_the_driver_and_in_rays_actors(
        tmp_path, monkeypatch, unregistered, ray_cluster):
    from actors.aggregator import AggregatorActor

    monkeypatch.chdir(tmp_path)
    write_plugin(tmp_path)
    with pytest.raises(ConfigError, match="algorithm.server.name"):
        load_config(QUICKSTART, [f"algorithm.server.name={NAME}"])
    cfg = load_config(QUICKSTART, [f"algorithm.server.name={NAME}", "plugins=[my_strategy.py]"])
    assert cfg.plugins == [str(tmp_path / "my_strategy.py")]  # absolute, for processes elsewhere
    assert NAME in SERVER_STRATEGIES
    # The aggregator actor is a process of its own: it builds the strategy only if it imported the plugin too.
    actor = AggregatorActor.options(num_cpus=0).remote()
    try:
        assert ray_cluster.get(actor.start.remote(cfg, {"w": torch.zeros(2)}, [1, 1]), timeout=120) == 0
    finally:
        ray_cluster.kill(actor)


def test_a_plugin_that_cannot_be_imported_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'plugins' has invalid value '.*missing\.py'.*no file"):
        load_config(QUICKSTART, [f"plugins=[{tmp_path / 'missing.py'}]"])
    with pytest.raises(ConfigError, match="config key 'plugins' has invalid value 'no_such_module'"):
        load_config(QUICKSTART, ["plugins=[no_such_module]"])


def test_a_resumed_run_imports_its_plugins_only_when_the_command_repeats_them(tmp_path, capsys, unregistered):
    marker = tmp_path / "imported"
    plugin = write_plugin(tmp_path, marker)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = load_config(QUICKSTART, [f"plugins=[{plugin}]", f"algorithm.server.name={NAME}"])
    (run_dir / "config.yaml").write_text(to_yaml(saved))
    for module in [m for m in sys.modules if m.startswith("fedsim_plugin_")]:
        del sys.modules[module]  # as in a new process: nothing imported yet
    SERVER_STRATEGIES.pop(NAME)
    marker.unlink()

    assert main(["run", "--resume", str(run_dir)]) == 2
    error = capsys.readouterr().err
    assert "imports plugins" in error and f"plugins={json.dumps([str(plugin)])}" in error
    assert not marker.exists()  # refused before any plugin code ran

    # Repeated, the plugins are imported; the run then stops for want of a checkpoint (none was written here).
    assert main(["run", "--resume", str(run_dir), f"plugins={json.dumps([str(plugin)])}"]) == 2
    assert marker.exists()
