"""Datasets in fedsim's common schema, looked up by the name used in ``data.dataset``."""

from __future__ import annotations

from typing import Callable

from fedsim.data.real import REAL_DATASETS
from fedsim.data.schema import DatasetSplits, features
from fedsim.data.synthetic import TASK_NUM_CLASSES, Cues, load_synthetic


def _synthetic(cfg, seed: int) -> DatasetSplits:
    cues = Cues.from_config(cfg)
    return load_synthetic(cfg.task, cfg.num_train, cfg.num_test, cfg.image_size, seed, cues, cfg.test_seed)


DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "synthetic": _synthetic, **{name: adapter.load for name, adapter in REAL_DATASETS.items()}}


SYNTHETIC_TASKS = tuple(TASK_NUM_CLASSES)  # the tasks a client can hold ("pretrain" is not one)
DATA_KEYS = {"dataset": "data.dataset", "task": "data.task", "path": "data.path", "hub": "data.hub",
             "revision": "data.revision", "num_train": "data.num_train", "num_test": "data.num_test",
             "test_seed": "data.test_seed"}


def check_data_source(cfg, keys: dict[str, str] | None = None) -> None:
    """Fail early (ValueError naming the key or path) when a ``DataConfig`` cannot name readable data.

    ``keys`` names each field's config key in messages (default ``DATA_KEYS``: data.dataset, data.path, ...),
    for a source configured elsewhere, such as the text source of ``data.scenarios.modality_task``."""
    keys = {**DATA_KEYS, **(keys or {})}
    if cfg.dataset not in DATASETS:
        raise ValueError(f"config key '{keys['dataset']}' has invalid value {cfg.dataset!r}: expected one of "
                         + ", ".join(sorted(DATASETS)))
    if cfg.dataset == "synthetic":
        if cfg.task not in SYNTHETIC_TASKS:
            raise ValueError(f"config key '{keys['task']}' has invalid value {cfg.task!r}: expected one of "
                             + ", ".join(SYNTHETIC_TASKS))
        for key in ("num_train", "num_test"):
            if getattr(cfg, key) <= 0:
                raise ValueError(f"config key '{keys[key]}' has invalid value {getattr(cfg, key)}: expected a "
                                 "number of rows > 0 for the synthetic benchmark (0 means all rows only for a "
                                 "real dataset)")
        for key in ("path", "hub", "revision"):
            if getattr(cfg, key) is not None:
                raise ValueError(f"config key '{keys[key]}' is set, but {keys['dataset']} is 'synthetic', which is "
                                 f"generated from the seed; choose a real dataset ({', '.join(sorted(REAL_DATASETS))})")
        Cues.from_config(cfg)  # raises naming data.image_share / text_share
        return
    if cfg.test_seed is not None:
        raise ValueError(f"config key '{keys['test_seed']}' is set, but {keys['dataset']} is {cfg.dataset!r}, whose test "
                         "split is the dataset's own; it applies to the synthetic benchmark only")
    REAL_DATASETS[cfg.dataset].check_source(cfg, keys["path"], keys["hub"])


def load_dataset_splits(cfg, seed: int) -> DatasetSplits:
    """Build the train/test splits named by a ``DataConfig``."""
    return DATASETS[cfg.dataset](cfg, seed)


__all__ = ["DATASETS", "DATA_KEYS", "SYNTHETIC_TASKS", "DatasetSplits", "check_data_source", "features",
           "load_dataset_splits"]
