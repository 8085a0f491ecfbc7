"""Datasets in fedsim's common schema, looked up by the name used in ``data.dataset``."""

from __future__ import annotations

from typing import Callable

from fedsim.data.schema import FEATURES, DatasetSplits
from fedsim.data.synthetic import load_synthetic


def _synthetic(cfg, seed: int) -> DatasetSplits:
    return load_synthetic(cfg.task, cfg.num_train, cfg.num_test, cfg.image_size, seed)


DATASETS: dict[str, Callable[..., DatasetSplits]] = {"synthetic": _synthetic}


def load_dataset_splits(cfg, seed: int) -> DatasetSplits:
    """Build the train/test splits named by a ``DataConfig``."""
    return DATASETS[cfg.dataset](cfg, seed)


__all__ = ["DATASETS", "FEATURES", "DatasetSplits", "load_dataset_splits"]
