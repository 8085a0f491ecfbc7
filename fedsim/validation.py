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

from fedsim.algorithms import CLIENT_STRATEGIES, SERVER_STRATEGIES, RobustStrategy
from fedsim.algorithms.server import AdaptiveServer
from fedsim.config import ConfigError, ExperimentConfig, check_choice, check_values, fail, merge_config
from fedsim.data import DATASETS, check_data_source
from fedsim.plugins import import_plugins, resolved
from fedsim.scenarios import check_scenarios
from fedsim.scheduler import check_scheduler_config
from fedsim.trackers import TRACKERS


def load_config(path: str | Path | Sequence[str | Path] | None = None,
                overrides: list[str] | None = None) -> ExperimentConfig:
    """Merge YAML files (one, or several as layers, later ones winning) and dotlist overrides onto the
    schema, validate, and return typed dataclasses. Without a ``name`` key in any file, the experiment is
    named after the files' stems joined by '-'."""
    cfg = merge_config(path, overrides)
    cfg.plugins = resolved(cfg.plugins)
    import_plugins(cfg.plugins)  # before the checks: the config may name the classes they register
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
    _check_privacy(cfg)
    _check_attack(cfg)
    _check_compression(cfg)
    _check_model(cfg)
    _check_trackers(cfg)
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


def _check_trackers(cfg: ExperimentConfig) -> None:
    """Known, distinct trackers whose libraries are installed: a missing one is found here, not after the model
    has loaded and the run has begun."""
    trackers = list(cfg.output.trackers)
    if len(set(trackers)) != len(trackers):
        fail("output.trackers", trackers, "a list of distinct tracker names")
    for name in trackers:
        check_choice("output.trackers", name, list(TRACKERS))
        if not TRACKERS[name].installed():
            fail("output.trackers", name, f"trackers whose library is installed: {name} needs pip install "
                 f"'{TRACKERS[name].requirement}'")


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
    if issubclass(strategy, RobustStrategy):
        _check_robust(cfg, strategy)
    tau = cfg.algorithm.server.tau
    if issubclass(strategy, AdaptiveServer) and not (math.isfinite(tau) and tau > 0):
        fail("algorithm.server.tau", tau, f"a finite value > 0 with {server}: its step is m / (sqrt(v) + tau)")


# Central DP's sensitivity bound (one client moves the noised sum by at most S) holds for these: a weighted
# mean of clipped updates under a fixed denominator, then the server rule (post-processing).
CENTRAL_DP_SERVERS = ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "fedbuff")


def _check_robust(cfg: ExperimentConfig, strategy: type[RobustStrategy]) -> None:
    server = cfg.algorithm.server
    if server.weighting == "samples":
        fail("algorithm.server.weighting", "samples", f"auto or uniform with {server.name}: robust rules weigh "
             "every client alike")
    for key in ("trim", "f", "multikrum_m"):
        if not getattr(server, key) >= 0:
            fail(f"algorithm.server.{key}", getattr(server, key), "an integer >= 0")
    if server.name == "norm_bound" and not server.norm_bound > 0:
        fail("algorithm.server.norm_bound", server.norm_bound, "a value > 0")
    k = cfg.clients_per_round()
    need, rule = strategy.min_cohort(server)
    if k < need:
        key = "trim" if server.name == "trimmed_mean" else "f"
        fail(f"algorithm.server.{key}", getattr(server, key), f"a value for which {server.name} can run with "
             f"federation's {k} clients a round: it needs {rule}")
    if server.name == "multikrum" and not server.multikrum_m <= k - server.f:
        fail("algorithm.server.multikrum_m", server.multikrum_m, f"at most K - f = {k - server.f} (0: K - f)")


def _check_privacy(cfg: ExperimentConfig) -> None:
    dp, server = cfg.privacy, cfg.algorithm.server
    if dp.mode == "none":
        return
    for key, value in (("privacy.clip_norm", dp.clip_norm), ("privacy.noise_multiplier", dp.noise_multiplier)):
        if not (math.isfinite(value) and value > 0):
            fail(key, value, f"a finite value > 0 with privacy.mode={dp.mode}")
    if not 0 < dp.delta < 1:
        fail("privacy.delta", dp.delta, "a value in (0, 1)")
    if dp.sampling == "fixed" and dp.accountant != "rdp":
        fail("privacy.sampling", dp.sampling, "poisson with privacy.accountant=pld: sampling without replacement "
             "is accounted by the RDP accountant only")
    _check_shared(cfg, "privacy.mode", dp.mode)
    if cfg.algorithm.client.name == "scaffold":
        fail("privacy.mode", dp.mode, "none with SCAFFOLD: its control variates leave the clients unclipped and "
             "unnoised")
    if dp.mode == "local":
        if dp.adaptive_clip:
            fail("privacy.adaptive_clip", True, "false with privacy.mode=local: the clip norm adapts on the server, "
                 "from the clipped-update count of central DP")
        return
    if server.name not in CENTRAL_DP_SERVERS:
        fail("algorithm.server.name", server.name, "one of " + ", ".join(CENTRAL_DP_SERVERS) + " with "
             "privacy.mode=central: its sensitivity to one client is bounded for a weighted mean of clipped updates "
             "(robust rules, FedAsync's single-update steps and SCAFFOLD's are not covered)")
    if server.weighting == "samples":
        fail("algorithm.server.weighting", "samples", "auto or uniform with privacy.mode=central: under sample "
             "weighting one client's share of the sum, hence its sensitivity, grows with its data")
    if dp.adaptive_clip:
        for key in ("target_quantile", "clip_lr"):
            value = getattr(dp, key)
            if not (0 < value < 1 if key == "target_quantile" else value > 0):
                fail(f"privacy.{key}", value, "a value in (0, 1)" if key == "target_quantile" else "a value > 0")
        if dp.count_noise_std < 0:
            fail("privacy.count_noise_std", dp.count_noise_std, "a value >= 0 (0: K/20)")
        from fedsim.aggregator import count_noise_std  # the aggregator's own resolution of 0
        if not 2 * count_noise_std(cfg) > dp.noise_multiplier:
            fail("privacy.count_noise_std", dp.count_noise_std, f"a value > privacy.noise_multiplier / 2 "
                 f"({dp.noise_multiplier / 2:g}; 0 means K/20 = {count_noise_std(cfg):g}): adaptive clipping spends "
                 "part of the budget on the count, and less noise there would leave none for the update")


def _check_shared(cfg: ExperimentConfig, key: str, value: str) -> None:
    """Attacks and compression act on updates sent to a server: a run that shares none has nothing to act on."""
    strategy = SERVER_STRATEGIES[cfg.algorithm.server.name]
    if strategy.personalized or not strategy.trains:
        fail(key, value, f"none with algorithm.server.name={cfg.algorithm.server.name}: no update is sent")


def _check_attack(cfg: ExperimentConfig) -> None:
    attack = cfg.attack
    if not 0 <= attack.fraction <= 1:
        fail("attack.fraction", attack.fraction, "a value in [0, 1]")
    if attack.kind == "none":
        return
    _check_shared(cfg, "attack.kind", attack.kind)
    if attack.kind in ("sign_flip", "gaussian") and not attack.scale > 0:
        fail("attack.scale", attack.scale, f"a value > 0 with attack.kind={attack.kind}")
    if attack.kind == "scale" and not attack.scale >= 0:
        fail("attack.scale", attack.scale, "a boost >= 0 (0: K / server lr, replacing the global model)")
    if attack.kind in ("label_flip", "backdoor") and cfg.data.dataset == "synthetic" and cfg.data.task != "classification":
        fail("attack.kind", attack.kind, f"an update attack (sign_flip, gaussian, scale, free_rider) with "
             f"data.task={cfg.data.task}: flipping labels and backdoors need multiple-choice labels")
    if attack.kind == "backdoor":
        if not 0 < attack.poison_fraction <= 1:
            fail("attack.poison_fraction", attack.poison_fraction, "a value in (0, 1]")
        if attack.target_label < 0:
            fail("attack.target_label", attack.target_label, "an option index >= 0")


def _check_compression(cfg: ExperimentConfig) -> None:
    comp = cfg.compression
    if comp.kind != "none":
        _check_shared(cfg, "compression.kind", comp.kind)
    if comp.kind in ("topk", "randk") and not 0 < comp.density <= 1:
        fail("compression.density", comp.density, f"a value in (0, 1] with compression.kind={comp.kind}")
