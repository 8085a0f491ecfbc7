"""Every shipped config loads, or is listed here as not meant to be combined (config loading only: no model,
no data, no Ray; seconds).

The FedMLLM grid is base x scenario x method, layered as experiments/fedmllm_table.py layers it: cpu.yaml,
cpu.yaml + cpu-adaptive.yaml (after the method, for the adaptive server optimizers), gpu.yaml, and gpu.yaml
with each dataset layer (datasets/*.yaml) after it. The real datasets the GPU configs read from local folders
are stood in for by tiny fixture folders.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from fedsim.config import ConfigError
from fedsim.data.real import REAL_DATASETS
from fedsim.validation import load_config
from conftest import experiment_module
from real_fixtures import make_dataset

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FEDMLLM = EXPERIMENTS / "fedmllm"
SCENARIOS = sorted(p.stem for p in (FEDMLLM / "scenarios").glob("*.yaml"))
METHODS = sorted(p.stem for p in (FEDMLLM / "methods").glob("*.yaml"))


TABLE = experiment_module("fedmllm_table")


DATASETS = sorted(p.stem for p in (FEDMLLM / "datasets").glob("*.yaml"))  # layered after gpu.yaml
BASES = ["cpu", "cpu-adaptive", "gpu"] + [f"gpu+{dataset}" for dataset in DATASETS]


def _layers(base: str, scenario: str, method: str) -> list[Path]:
    if base == "cpu-adaptive":
        return [Path(p) for p in TABLE.layers(scenario, method)]  # cpu.yaml, scenario, method, cpu-adaptive.yaml
    base, *dataset = base.split("+")
    return [FEDMLLM / f"{base}.yaml", *(FEDMLLM / "datasets" / f"{d}.yaml" for d in dataset),
            FEDMLLM / "scenarios" / f"{scenario}.yaml", FEDMLLM / "methods" / f"{method}.yaml"]


COMBINATIONS = [(base, scenario, method) for base in BASES for scenario in SCENARIOS
                for method in METHODS if base != "cpu-adaptive" or method in TABLE.ADAPTIVE]

# (base, scenario) -> (the key the refusal names, why the combination is not meant to be made), for every method.
NOT_MEANT = {
    **{(base, "modality-task-5-5"): (
        "data.num_train",
        "the synthetic-benchmark version of the medical cross setting (its data.task: vqa and its text-only "
        "clients are synthetic); gpu.yaml reads all rows of a real dataset (data.num_train: 0), which would leave "
        "the synthetic text source with 0 rows. Its GPU counterparts are medical-cross-*.yaml")
       for base in BASES if base.startswith("gpu")},
    **{(base, "multilingual-domain"): (
        "data.scenarios.multilingual",
        "the multilingual step translates the synthetic benchmark's templates only; gpu.yaml's data is real "
        "(hateful_memes_test_seen, or crisismmd_all)")
       for base in BASES if base.startswith("gpu")},
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
    assert {base for base, _ in NOT_MEANT} <= set(BASES)
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


def _load(base: str, scenario: str, method: str, data_root: Path):
    layers = _layers(base, scenario, method)
    return load_config(layers, _fixture_paths(layers, data_root))


@pytest.mark.parametrize("base, scenario, dataset, rounds, metric", [
    ("gpu", "aligned-5.0", "hateful_memes_test_seen", 25, "roc_auc"),
    ("gpu+crisismmd", "missing-0.5", "crisismmd_all", 40, "macro_f1"),
    ("gpu", "medical-cross-3-7", "vqa_rad", 50, "accuracy"),
    ("gpu+crisismmd", "medical-hybrid-0.6", "vqa_rad", 50, "accuracy"),
])
def test_gpu_grid_runs_each_dataset_as_the_paper(base, scenario, dataset, rounds, metric, data_root):
    """Rounds per dataset (Hateful-Memes 25, CrisisMMD 40, medical 50), lr 2e-5 with the 1% warm-up, and
    the dataset forms FedMLLM scores (Hateful-Memes test_seen, CrisisMMD's 8 classes)."""
    cfg = _load(base, scenario, "fedavg", data_root)
    assert (cfg.data.dataset, cfg.federation.rounds) == (dataset, rounds)
    assert (cfg.training.lr, cfg.training.lr_schedule, cfg.training.warmup_fraction) == (2e-5, "cosine", 0.01)
    assert REAL_DATASETS[dataset].metric == metric


@pytest.mark.parametrize("scenario, holders", [("medical-cross-3-7", {"image_clients": 3}),
                                               ("medical-cross-5-5", {"image_clients": 5}),
                                               ("medical-cross-7-3", {"image_clients": 7}),
                                               ("medical-hybrid-0.8", {"p": 0.8}),
                                               ("medical-hybrid-0.7", {"p": 0.7}),
                                               ("medical-hybrid-0.6", {"p": 0.6})])
def test_medical_modality_task_levels(scenario, holders, data_root):
    cfg = _load("gpu", scenario, "fedavg", data_root)
    task = cfg.data.scenarios["modality_task"]
    assert {key: task.get(key) for key in holders} == holders and task["text_dataset"] == "medalpaca"
    assert cfg.partition.scheme == "iid"  # each source split evenly at random, as the authors' code does


@pytest.mark.parametrize("base", ["cpu", "gpu"])
def test_local_baseline_trains_every_client_every_round(base, data_root):
    local = _load(base, "aligned-5.0", "local", data_root)
    assert local.algorithm.server.name == "local_only"
    assert local.clients_per_round() == local.partition.num_clients == 10
    sampled = _load(base, "aligned-5.0", "local-only", data_root)
    assert sampled.clients_per_round() < sampled.partition.num_clients  # the base's cohort size


def test_grid_server_layers_are_the_fedmllm_code_forms(data_root):
    server = {method: _load("cpu", "aligned-5.0", method, data_root).algorithm.server
              for method in ("fedadagrad", "fedmllm", "fedavgm", "fedyogi", "fedadam")}
    assert server["fedadagrad"].beta1 == server["fedmllm"].beta1 == 0.0  # no momentum
    assert (server["fedavgm"].momentum_form, server["fedavgm"].moment_init) == ("ema", "first_delta")
    for name in ("fedyogi", "fedadam"):
        assert (server[name].moment_init, server[name].second_moment_of) == ("first_delta", "momentum")
    assert _load("cpu", "hybrid-0.6", "fedavg", data_root).data.scenarios["hybrid"]["coin"] == "sample"


STUDIES = sorted(EXPERIMENTS.glob("quickstart.yaml")) + sorted((EXPERIMENTS / "studies").rglob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[str(p.relative_to(EXPERIMENTS)) for p in STUDIES])
def test_study_loads_at_every_sweep_point(path):
    grid = load_config(path).sweep.grid
    keys = list(grid)
    for values in itertools.product(*(grid[key] for key in keys)):
        load_config(path, [f"{key}={value}" for key, value in zip(keys, values)])
