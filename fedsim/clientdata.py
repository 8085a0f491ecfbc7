"""Client data: what each client holds, derived from the config's seed on every engine and Ray worker, so
no client data crosses the network.

Two kinds, one interface (``ClientData``):

- ``PartitionedClients``: a benchmark's training split (``data.num_train`` rows, or a real dataset) cut into
  client shards by ``partition`` and shaped by the heterogeneity scenario;
- ``GeneratedClients``: synthetic data specified per client (``data.samples_per_client``), each row derived
  from (seed, client, row) on demand, so a million registered clients cost a few bytes each until one trains.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from fedsim.config import ExperimentConfig
from fedsim.data import DatasetSplits, load_dataset_splits
from fedsim.data.synthetic import TASK_NUM_CLASSES, Cues, client_sample, generate_test
from fedsim.partition import partition
from fedsim.scenarios import ModalityTask, apply_scenarios, build_steps
from fedsim.seeding import derive_seed, rng_for

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

# Per-client draws (sizes, label mixes) are made this many clients at a time from one generator per block:
# a client's value costs one block's draw (about a millisecond), all N clients' values N / BLOCK draws.
BLOCK = 1 << 16


class ClientData:
    """The test split and, per client, its training rows."""

    test: datasets.Dataset
    metric: str  # the headline metric (DatasetSplits.metric)
    num_clients: int

    def shard_sizes(self) -> np.ndarray:
        """Training rows per client, int64, shape (num_clients,)."""
        raise NotImplementedError

    def shard(self, client: int) -> np.ndarray:
        """The row ids ``samples`` takes for ``client``."""
        raise NotImplementedError

    def samples(self, client: int, rows: np.ndarray) -> list[dict]:
        """The rows of ``client`` (ids from its ``shard``), in fedsim's common schema."""
        raise NotImplementedError


class PartitionedClients(ClientData):
    """Shards kept as one flat array of row ids and each client's offset into it: 8 bytes per row and per
    client, where a list of N arrays costs a Python object (~100 bytes) per client."""

    def __init__(self, splits: DatasetSplits, shards: list[np.ndarray]):
        self.splits = splits
        self.test, self.metric, self.num_clients = splits.test, splits.metric, len(shards)
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
        self.rows = np.concatenate(shards).astype(np.int64) if shards else np.zeros(0, np.int64)

    @property
    def shards(self) -> list[np.ndarray]:
        return [self.shard(c) for c in range(self.num_clients)]

    def shard_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def shard(self, client: int) -> np.ndarray:
        return self.rows[self.offsets[client]:self.offsets[client + 1]]

    def samples(self, client: int, rows: np.ndarray) -> list[dict]:
        return [self.splits.train[int(i)] for i in rows]


class GeneratedClients(ClientData):
    """``data.samples_per_client`` synthetic rows per client, derived on demand.

    ``partition.scheme`` shapes the clients as it does a fixed split, with the population infinite:
    ``iid`` gives every client ``samples_per_client`` rows; ``quantity`` gives a client
    ``m + (samples_per_client - m) * Gamma(alpha) / alpha`` rows, rounded, with m = ``partition.min_samples``
    (mean ``samples_per_client``: the fixed split's Dirichlet quantity skew, m + Dir(alpha) shares of the
    rest, in the limit of many clients); ``dirichlet`` gives each client a
    label mix drawn from Dir(alpha * 1) over the task's classes, and every row a label drawn from that mix.
    """

    def __init__(self, cfg: ExperimentConfig):
        data, part = cfg.data, cfg.partition
        self.seed = derive_seed(cfg.seed, "data")  # the stream the fixed split is generated from
        self.cfg, self.num_clients = cfg, part.num_clients
        self.cues = Cues.from_config(data)
        self.num_classes = TASK_NUM_CLASSES[data.task]
        self.test = _test_split(cfg, generate_test(data.task, data.num_test, self.seed, data.test_seed,
                                                   data.image_size, self.cues))
        self.metric = "accuracy"

    def _block(self, name: str, block: int) -> np.ndarray:
        part, count = self.cfg.partition, BLOCK
        rng = rng_for(self.cfg.seed, "client_data", ("sizes", "mixes").index(name), block)
        if name == "sizes":
            need = max(1, part.min_samples)
            scale = rng.gamma(part.alpha, 1 / part.alpha, count)
            return need + np.rint((self.cfg.data.samples_per_client - need) * scale).astype(np.int64)
        return rng.dirichlet(np.full(self.num_classes, part.alpha), count)

    @lru_cache(maxsize=4)
    def _cached_block(self, name: str, block: int) -> np.ndarray:
        return self._block(name, block)

    def shard_sizes(self) -> np.ndarray:
        if self.cfg.partition.scheme != "quantity":
            return np.full(self.num_clients, self.cfg.data.samples_per_client, dtype=np.int64)
        blocks = range(-(-self.num_clients // BLOCK))
        return np.concatenate([self._block("sizes", b) for b in blocks])[:self.num_clients]

    def shard_size(self, client: int) -> int:
        if self.cfg.partition.scheme != "quantity":
            return self.cfg.data.samples_per_client
        return int(self._cached_block("sizes", client // BLOCK)[client % BLOCK])

    def shard(self, client: int) -> np.ndarray:
        return np.arange(self.shard_size(client))

    def labels(self, client: int) -> np.ndarray | None:
        """Under label skew, the label of each of the client's rows; otherwise None (labels as generated)."""
        if self.cfg.partition.scheme != "dirichlet":
            return None
        mix = self._cached_block("mixes", client // BLOCK)[client % BLOCK]
        return rng_for(self.cfg.seed, "client_data", 2, client).choice(self.num_classes, self.shard_size(client),
                                                                       p=mix)

    def samples(self, client: int, rows: np.ndarray) -> list[dict]:
        data, labels = self.cfg.data, self.labels(client)
        return [client_sample(data.task, self.seed, client, int(row), data.image_size, self.cues,
                              None if labels is None else int(labels[row])) for row in rows]


def load_client_data(cfg: ExperimentConfig) -> ClientData:
    if cfg.data.samples_per_client:
        return GeneratedClients(cfg)
    steps = dict(cfg.data.scenarios)
    task_step = steps.pop(ModalityTask.name, None)
    splits = load_dataset_splits(cfg.data, derive_seed(cfg.seed, "data"))
    if task_step is None:
        shards = partition(np.asarray(splits.train["label"]), cfg.partition, derive_seed(cfg.seed, "partition"))
    else:
        splits, shards = _modality_task(cfg, splits, build_steps({ModalityTask.name: task_step}, "data.scenarios")[0])
    if steps:
        splits = replace(splits, train=apply_scenarios(splits.train, shards, steps, cfg.seed))
    return PartitionedClients(replace(splits, test=_test_split(cfg, splits.test)), shards)


def _test_split(cfg: ExperimentConfig, test: datasets.Dataset) -> datasets.Dataset:
    """The test split under ``data.test_scenarios`` (as one client)."""
    if not cfg.data.test_scenarios:
        return test
    return apply_scenarios(test, [np.arange(len(test))], dict(cfg.data.test_scenarios), cfg.seed,
                           key="data.test_scenarios", stream="test_scenario")


def _modality_task(cfg: ExperimentConfig, image_splits: DatasetSplits, step: ModalityTask
                   ) -> tuple[DatasetSplits, list[np.ndarray]]:
    """Each source's training rows are partitioned by ``cfg.partition`` over the clients that hold it
    (``step.holders``: clients 0..image_clients-1 the configured dataset and the others the text-only source,
    or a per-client draw under ``p``, where a client may hold both); train and test splits are the two
    sources concatenated."""
    import datasets

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
