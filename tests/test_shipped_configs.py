"""Every shipped config loads, or is listed here as not meant to be combined (config loading only: no model,
no data, no Ray; seconds).

The FedMLLM grid is base x scenario x method, layered as experiments/fedmllm_table.py layers it: cpu.yaml,
cpu.yaml + cpu-adaptive.yaml (after the method, for the adaptive server optimizers) and gpu.yaml. The real
datasets the GPU configs read from local folders are stood in for by tiny fixture folders.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from fedsim.config import ConfigError
from fedsim.data.real import REAL_DATASETS
from fedsim.validation import load_config
from real_fixtures import make_dataset

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FEDMLLM = EXPERIMENTS / "fedmllm"
SCENARIOS = sorted(p.stem for p in (FEDMLLM / "scenarios").glob("*.yaml"))
METHODS = sorted(p.stem for p in (FEDMLLM / "methods").glob("*.yaml"))


def _table_module():
    spec = importlib.util.spec_from_file_location("fedmllm_table", EXPERIMENTS / "fedmllm_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLE = _table_module()


def _layers(base: str, scenario: str, method: str) -> list[Path]:
    if base == "cpu-adaptive":
        return [Path(p) for p in TABLE.layers(scenario, method)]  # cpu.yaml, scenario, method, cpu-adaptive.yaml
    return [FEDMLLM / f"{base}.yaml", FEDMLLM / "scenarios" / f"{scenario}.yaml",
            FEDMLLM / "methods" / f"{method}.yaml"]


COMBINATIONS = [(base, scenario, method) for base in ("cpu", "cpu-adaptive", "gpu") for scenario in SCENARIOS
                for method in METHODS if base != "cpu-adaptive" or method in TABLE.ADAPTIVE]

# (base, scenario) -> (the key the refusal names, why the combination is not meant to be made), for every method.
NOT_MEANT = {
    ("gpu", "modality-task-5-5"): (
        "data.num_train",
        "the synthetic-benchmark version of the medical cross setting (its data.task: vqa and its text-only "
        "clients are synthetic); gpu.yaml reads all rows of a real dataset (data.num_train: 0), which would leave "
        "the synthetic text source with 0 rows. Its GPU counterpart is medical-cross-5-5.yaml"),
    ("gpu", "multilingual-domain"): (
        "data.scenarios.multilingual",
        "the multilingual step translates the synthetic benchmark's templates only; gpu.yaml's data is real "
        "(hateful_memes)"),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """One fixture folder per real dataset, standing in for the data/<name> folders the configs point at."""
    root = tmp_path_factory.mktemp("data")
    for name in REAL_DATASETS:
        make_dataset(name, root / name)
    return root


@functools.lru_cache(maxsize=None)
def _yaml(path: Path) -> DictConfig:
    return OmegaConf.load(path)


def _fixture_paths(layers: list[Path], data_root: Path) -> list[str]:
    """Overrides that point every local real-dataset folder of the merged layers at its fixture."""
    data = OmegaConf.merge(*(_yaml(layer) for layer in layers)).get("data", {})  # plain YAML, no schema: fast
    overrides = []
    if data.get("dataset") in REAL_DATASETS and data.get("path"):
        overrides.append(f"data.path={data_root / data.dataset}")
    task = data.get("scenarios", {}).get("modality_task") or {}
    if task.get("text_dataset") in REAL_DATASETS and task.get("text_path"):
        overrides.append(f"data.scenarios.modality_task.text_path={data_root / task['text_dataset']}")
    return overrides


def test_the_grid_covers_the_table_and_every_exception_is_shipped():
    assert set(TABLE.SCENARIOS) <= set(SCENARIOS) and set(TABLE.METHODS) | set(TABLE.ADAPTIVE) <= set(METHODS)
    assert {base for base, _ in NOT_MEANT} <= {"cpu", "cpu-adaptive", "gpu"}
    assert {scenario for _, scenario in NOT_MEANT} <= set(SCENARIOS)


@pytest.mark.parametrize("base, scenario, method", COMBINATIONS, ids=["/".join(c) for c in COMBINATIONS])
def test_fedmllm_combination_loads(base, scenario, method, data_root):
    layers = _layers(base, scenario, method)
    overrides = _fixture_paths(layers, data_root)
    if (base, scenario) in NOT_MEANT:
        with pytest.raises(ConfigError, match=NOT_MEANT[(base, scenario)][0].replace(".", r"\.")):
            load_config(layers, overrides)
        return
    cfg = load_config(layers, overrides)
    assert cfg.name == "-".join(p.stem for p in layers)
    if cfg.data.dataset != "synthetic":  # checked against its fixture, not a data/ folder that may exist here
        assert cfg.data.path.startswith(str(data_root))


STUDIES = sorted(EXPERIMENTS.glob("quickstart.yaml")) + sorted((EXPERIMENTS / "studies").rglob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[str(p.relative_to(EXPERIMENTS)) for p in STUDIES])
def test_study_loads_at_every_sweep_point(path):
    grid = load_config(path).sweep.grid
    keys = list(grid)
    for values in itertools.product(*(grid[key] for key in keys)):
        load_config(path, [f"{key}={value}" for key, value in zip(keys, values)])
