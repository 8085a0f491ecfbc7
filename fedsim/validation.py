"""A config ready to run: ``load_config`` merges the YAML layers and overrides, then ``validate`` checks them.

``fedsim.config`` is pure data (the schema, merging, per-value checks); this module sits above it and above
the registries it checks names and combinations against: algorithms, scheduler, datasets and scenarios.
Every bad value surfaces here as a ConfigError naming the key, before any model or data work.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from fedsim.algorithms import CLIENT_STRATEGIES, SERVER_STRATEGIES
from fedsim.algorithms.server import AdaptiveServer
from fedsim.config import ConfigError, ExperimentConfig, check_choice, check_values, fail, merge_config
from fedsim.data import DATASETS, check_data_source
from fedsim.scenarios import check_scenarios
from fedsim.scheduler import check_scheduler_config


def load_config(path: str | Path | Sequence[str | Path] | None = None,
                overrides: list[str] | None = None) -> ExperimentConfig:
    """Merge YAML files (one, or several as layers, later ones winning) and dotlist overrides onto the
    schema, validate, and return typed dataclasses. Without a ``name`` key in any file, the experiment is
    named after the files' stems joined by '-'."""
    cfg = merge_config(path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Check ranges, choices, registry names and combinations that the type system cannot express."""
    check_values(cfg)
    check_choice("algorithm.client.name", cfg.algorithm.client.name, list(CLIENT_STRATEGIES))
    check_choice("algorithm.server.name", cfg.algorithm.server.name, list(SERVER_STRATEGIES))
    check_choice("data.dataset", cfg.data.dataset, list(DATASETS))
    check_scheduler_config(cfg.scheduler)
    _check_algorithm(cfg)
    _check_model(cfg)
    check_data(cfg)


def check_data(cfg: ExperimentConfig) -> None:
    """The data sources (``data`` and a ``modality_task`` text source) can be read here, and the scenarios fit
    them; ConfigError naming the key or path. Run on the driver, and on every node of a cluster by the Ray
    runtime, since a path on the driver's disk may be missing on a worker node."""
    try:
        check_data_source(cfg.data)
        check_scenarios(cfg.data.scenarios, "data.scenarios", cfg.partition.num_clients, cfg.data)
        check_scenarios(cfg.data.test_scenarios, "data.test_scenarios", 1, cfg.data)
    except ValueError as err:
        raise ConfigError(str(err)) from None


FULL_COMMIT = re.compile(r"[0-9a-f]{40}")


def _check_model(cfg: ExperimentConfig) -> None:
    """``model.trust_remote_code`` runs the repository's Python code on every node: a hub model must name the
    exact commit that was reviewed, since a branch or tag can move to other code. A local folder is fetched
    from nowhere, so there is nothing to pin."""
    model = cfg.model
    if not model.trust_remote_code or FULL_COMMIT.fullmatch(model.revision or ""):
        return
    from fedsim.models.loading import is_local_model  # transformers and peft: imported for this case only

    if not is_local_model(model):
        fail("model.revision", model.revision, "a full 40-hex commit hash with model.trust_remote_code=true: the "
             "model's own code runs on every node, and a branch or tag can move to other code (a local model "
             "folder needs none: nothing is fetched)")


def _check_algorithm(cfg: ExperimentConfig) -> None:
    client, server = cfg.algorithm.client.name, cfg.algorithm.server.name
    strategy = SERVER_STRATEGIES[server]
    if cfg.scheduler.compute_time == "measured" and strategy.asynchronous:
        fail("scheduler.compute_time", "measured", "'modeled' with an asynchronous strategy "
             f"({server}): its dispatch order needs task durations before training")
    if (client == "scaffold") != (server == "scaffold"):
        fail("algorithm.client.name", client,
             "'scaffold' on both algorithm.client.name and algorithm.server.name, or on neither "
             f"(server is {server!r})")
    if client == "scaffold" and cfg.training.optimizer != "sgd":
        fail("training.optimizer", cfg.training.optimizer, "'sgd' with SCAFFOLD: its control variate "
             "(theta_global - theta) / (K * lr) is the mean local gradient only under plain SGD steps")
    if client == "scaffold" and cfg.training.momentum > 0:
        fail("training.momentum", cfg.training.momentum, "0 with SCAFFOLD: its control variate assumes plain "
             "SGD steps, without momentum")
    tau = cfg.algorithm.server.tau
    if issubclass(strategy, AdaptiveServer) and not (math.isfinite(tau) and tau > 0):
        fail("algorithm.server.tau", tau, f"a finite value > 0 with {server}: its step is m / (sqrt(v) + tau)")
