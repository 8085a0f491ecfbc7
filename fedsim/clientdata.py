"""Client data: the benchmark, its partition into client shards and its heterogeneity scenario.

Every engine and every Ray worker derives the same ``ClientData`` from the config's seed, so no client
data crosses the network.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import datasets
import numpy as np

from fedsim.config import ExperimentConfig
from fedsim.data import DatasetSplits, load_dataset_splits
from fedsim.partition import partition
from fedsim.scenarios import ModalityTask, apply_scenarios, build_steps
from fedsim.seeding import derive_seed


@dataclass
class ClientData:
    splits: DatasetSplits
    shards: list[np.ndarray]


def load_client_data(cfg: ExperimentConfig) -> ClientData:
    steps = dict(cfg.data.scenarios)
    task_step = steps.pop(ModalityTask.name, None)
    splits = load_dataset_splits(cfg.data, derive_seed(cfg.seed, "data"))
    if task_step is None:
        shards = partition(np.asarray(splits.train["label"]), cfg.partition, derive_seed(cfg.seed, "partition"))
    else:
        splits, shards = _modality_task(cfg, splits, build_steps({ModalityTask.name: task_step}, "data.scenarios")[0])
    if steps:
        splits = replace(splits, train=apply_scenarios(splits.train, shards, steps, cfg.seed))
    if cfg.data.test_scenarios:
        test = splits.test
        test = apply_scenarios(test, [np.arange(len(test))], dict(cfg.data.test_scenarios), cfg.seed,
                               key="data.test_scenarios", stream="test_scenario")
        splits = replace(splits, test=test)
    return ClientData(splits, shards)


def _modality_task(cfg: ExperimentConfig, image_splits: DatasetSplits, step: ModalityTask
                   ) -> tuple[DatasetSplits, list[np.ndarray]]:
    """Each source's training rows are partitioned by ``cfg.partition`` over the clients that hold it
    (``step.holders``: clients 0..image_clients-1 the configured dataset and the others the text-only source,
    or a per-client draw under ``p``, where a client may hold both); train and test splits are the two
    sources concatenated."""
    step.check("data.scenarios", cfg.partition.num_clients)
    text_splits = load_dataset_splits(step.text_data(cfg.data), derive_seed(cfg.seed, "data", 1))
    holders = step.holders(cfg.partition.num_clients, cfg.seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(cfg.partition.num_clients)]
    offset = 0
    for group, splits in enumerate((image_splits, text_splits)):
        clients = np.flatnonzero(holders[:, group])
        if not len(clients):
            source = (cfg.data.dataset, step.text_dataset)[group]
            raise ValueError(f"data.scenarios.modality_task.p={step.p}: with seed {cfg.seed} no client holds "
                             f"{source!r}; choose another seed or a larger p")
        group_cfg = replace(cfg.partition, num_clients=len(clients))
        for client, shard in zip(clients, partition(np.asarray(splits.train["label"]), group_cfg,
                                                    derive_seed(cfg.seed, "partition", group))):
            parts[client].append(shard + offset)
        offset += len(splits.train)
    shards = [np.concatenate(p).astype(np.int64) for p in parts]
    merged = DatasetSplits(
        train=datasets.concatenate_datasets([image_splits.train, text_splits.train]),
        test=datasets.concatenate_datasets([image_splits.test, text_splits.test]),
        num_classes=max(image_splits.num_classes, text_splits.num_classes),
        task=image_splits.task if image_splits.task == text_splits.task else "mixed",
        metric="accuracy")
    return merged, shards
