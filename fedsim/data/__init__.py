"""Datasets in fedsim's common schema, looked up by the name used in ``data.dataset``."""

from __future__ import annotations

from typing import Callable

from fedsim.data.real import REAL_DATASETS
from fedsim.data.schema import FEATURES, DatasetSplits
from fedsim.data.synthetic import load_synthetic


def _synthetic(cfg, seed: int) -> DatasetSplits:
    return load_synthetic(cfg.task, cfg.num_train, cfg.num_test, cfg.image_size, seed)


DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "synthetic": _synthetic, **{name: adapter.load for name, adapter in REAL_DATASETS.items()}}


def check_data_source(cfg) -> None:
    """Fail early (ValueError naming the key or path) when a ``DataConfig`` cannot name readable data."""
    if cfg.dataset == "synthetic":
        for key in ("num_train", "num_test"):
            if getattr(cfg, key) <= 0:
                raise ValueError(f"config key 'data.{key}' has invalid value {getattr(cfg, key)}: the synthetic "
                                 "benchmark needs a number of rows > 0")
        for key in ("path", "hub"):
            if getattr(cfg, key) is not None:
                raise ValueError(f"config key 'data.{key}' is set, but data.dataset is 'synthetic', which is "
                                 f"generated from the seed; choose a real dataset ({', '.join(sorted(REAL_DATASETS))})")
        return
    REAL_DATASETS[cfg.dataset].check_source(cfg)


def load_dataset_splits(cfg, seed: int) -> DatasetSplits:
    """Build the train/test splits named by a ``DataConfig``."""
    return DATASETS[cfg.dataset](cfg, seed)


__all__ = ["DATASETS", "FEATURES", "DatasetSplits", "check_data_source", "load_dataset_splits"]
