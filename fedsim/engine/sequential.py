"""The reference engine: one process, the backbone loaded once, clients trained one after another.

Written for clarity; it is the correctness oracle for the distributed runtime
(``runtime.engine=sequential``). Data flows config -> partition -> cohort -> local training ->
aggregation -> metrics, in that order, in ``run_sequential``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedsim.algorithms import ServerStrategy, build_server_strategy
from fedsim.client import ClientTrainer
from fedsim.config import ExperimentConfig, to_yaml
from fedsim.data import DatasetSplits, load_dataset_splits
from fedsim.evaluation import Evaluator
from fedsim.messages import NamedTensors, nbytes
from fedsim.models.adapter import adapter_sha256, get_weights, save_adapter, set_weights
from fedsim.models.loading import LoadedModel, load_model
from fedsim.output import RunWriter
from fedsim.partition import partition
from fedsim.sampling import sample_cohort
from fedsim.seeding import derive_seed
from fedsim.training import round_lr

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """Everything a run builds before its first round."""

    splits: DatasetSplits
    shards: list[np.ndarray]
    loaded: LoadedModel
    evaluator: Evaluator


def build_federation(cfg: ExperimentConfig) -> Federation:
    splits = load_dataset_splits(cfg.data, derive_seed(cfg.seed, "data"))
    shards = partition(np.asarray(splits.train["label"]), cfg.partition, derive_seed(cfg.seed, "partition"))
    loaded = load_model(cfg.model, derive_seed(cfg.seed, "lora_init"))
    evaluator = Evaluator(loaded.processor, splits.test, splits.num_classes, cfg.eval, cfg.data.max_length,
                          loaded.device)
    return Federation(splits, shards, loaded, evaluator)


def evaluate_weights(fed: Federation, weights: NamedTensors) -> dict[str, float]:
    set_weights(fed.loaded.model, weights)
    return fed.evaluator.evaluate(fed.loaded.model)


def evaluate_personalized(fed: Federation, personal: dict[int, NamedTensors], initial: NamedTensors,
                          initial_metrics: dict[str, float] | None) -> dict[str, float]:
    """Mean over every client's own adapter (clients never sampled still hold the initial one)."""
    if initial_metrics is None and len(personal) < len(fed.shards):
        initial_metrics = evaluate_weights(fed, initial)
    per_client = [evaluate_weights(fed, personal[c]) if c in personal else initial_metrics
                  for c in range(len(fed.shards))]
    return {key: float(np.mean([m[key] for m in per_client])) for key in per_client[0]}


def progress_disabled(mode: str) -> bool | None:
    return {"auto": None, "always": False, "never": True}[mode]  # None: tqdm shows a bar only on a terminal


def run_sequential(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    writer = RunWriter(run_dir)
    writer.write_config(to_yaml(cfg))
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)

    fed = build_federation(cfg)
    num_clients, cohort_size = cfg.partition.num_clients, cfg.clients_per_round()
    initial = get_weights(fed.loaded.model)
    server: ServerStrategy = build_server_strategy(cfg.algorithm.server, num_clients)
    server.init(initial)
    trainer = ClientTrainer(cfg, fed.loaded, fed.splits.train, fed.shards)

    zero_shot = evaluate_weights(fed, initial) if cfg.eval.zero_shot or not server.trains else None
    personal: dict[int, NamedTensors] = {}  # local-only baseline: each client's own adapter
    client_state: dict[int, NamedTensors] = {}  # per-client algorithm state (SCAFFOLD control variates)
    rounds = cfg.federation.rounds if server.trains else 0
    bytes_up = bytes_down = updates = 0
    metrics: dict[str, float] = dict(zero_shot or {})
    train_seconds = 0.0

    bar = tqdm(range(1, rounds + 1), desc="rounds", unit="round", disable=progress_disabled(cfg.output.progress))
    for round_idx in bar:
        round_started = time.perf_counter()
        cohort = sample_cohort(num_clients, cohort_size, cfg.seed, round_idx)
        lr = round_lr(cfg.training, round_idx, rounds)
        extras = server.broadcast_extras()
        round_up = round_down = 0
        losses = []
        for done, client_id in enumerate(cohort, start=1):
            start = personal.get(client_id, initial) if server.personalized else server.global_weights
            update, state = trainer.train(client_id, round_idx, start, extras, client_state.get(client_id), lr,
                                          server.version)
            if state is not None:
                client_state[client_id] = state
            if server.personalized:
                personal[client_id] = {name: start[name] + update.delta[name] for name in start}
            else:  # a local-only client sends and receives nothing
                round_down += nbytes(start) + nbytes(extras)
                round_up += nbytes(update.delta) + nbytes(update.extras)
            server.accumulate(update, server.weight_of(update))
            losses.append(update.metrics["train_loss"])
            bar.set_postfix(round=round_idx, clients=f"{done}/{len(cohort)}", loss=f"{np.mean(losses):.3f}")
        server.finalize()
        train_seconds += time.perf_counter() - round_started
        updates += len(cohort)
        bytes_up, bytes_down = bytes_up + round_up, bytes_down + round_down

        record: dict[str, Any] = {"round": round_idx, "clients": cohort, "train_loss": float(np.mean(losses)),
                                  "lr": lr, "bytes_up": round_up, "bytes_down": round_down}
        if round_idx % cfg.eval.every == 0 or round_idx == rounds:
            if server.personalized:
                metrics = evaluate_personalized(fed, personal, initial, zero_shot)
            else:
                metrics = evaluate_weights(fed, server.global_weights)
            record["eval"] = metrics
        record["wall_seconds"] = time.perf_counter() - round_started
        writer.log_round(record)
        log.info("round %d/%d: loss %.4f%s", round_idx, rounds, record["train_loss"],
                 f", eval {metrics}" if "eval" in record else "")

    if server.personalized:
        final_adapters = {f"client{c}/{n}": t for c, w in sorted(personal.items()) for n, t in w.items()}
    else:
        final_adapters = server.global_weights
        if cfg.output.save_adapter:
            save_adapter(fed.loaded.model, final_adapters, writer.adapter_dir)
    wall = time.perf_counter() - started
    summary = {
        "experiment": cfg.name,
        "engine": "sequential",
        "algorithm": {"server": cfg.algorithm.server.name, "client": cfg.algorithm.client.name},
        "num_clients": num_clients,
        "clients_per_round": cohort_size,
        "rounds": rounds,
        "client_updates": updates,
        "final_metrics": metrics,
        "zero_shot_metrics": zero_shot or {},
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "updates_per_second": updates / train_seconds if train_seconds else 0.0,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "adapter_bytes": nbytes(initial),
        "trainable_parameters": sum(t.numel() for t in initial.values()),
        "adapter_sha256": adapter_sha256(final_adapters),
        "run_dir": str(writer.dir),
    }
    writer.write_summary(summary)
    return summary
