"""Typed experiment configuration: omegaconf structured configs with validation.

``load_config(path, overrides)`` merges a YAML file and ``key=value`` overrides onto the schema below and
checks every value before any work starts. Errors name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Module names matched as name suffixes by peft; when empty, ``target_regex`` (a full-name regex) is used.
    # The default regex keeps LoRA in the language model: vision towers have q_proj/v_proj too.
    target_modules: list[str] = field(default_factory=list)
    target_regex: Optional[str] = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj)$"
    # Extra modules trained in full and shipped with the adapter (e.g. the multimodal projector).
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    # ``tiny`` (built-in preset), a hub name such as ``HuggingFaceTB/SmolVLM-256M-Instruct``, or a local path.
    name: str = "tiny"
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: CUDA when a device is visible, else CPU
    prepare_kbit_training: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # where the tiny preset is built; default ~/.cache/fedsim
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    task: str = "classification"  # classification (multiple choice) or vqa (short answer)
    num_train: int = 2000
    num_test: int = 300
    image_size: int = 32
    max_length: int = 128


@dataclass
class PartitionConfig:
    scheme: str = "iid"  # iid | dirichlet | quantity
    num_clients: int = 20
    alpha: float = 0.5  # Dirichlet concentration (dirichlet) or power-law skew (quantity)
    min_samples: int = 1


@dataclass
class TrainingConfig:
    """Local training on each client."""

    local_epochs: int = 1
    local_steps: int = 0  # > 0 replaces epochs with a fixed number of optimizer steps
    batch_size: int = 8
    lr: float = 3e-3
    lr_schedule: str = "constant"  # constant | cosine (decays across rounds, as in FedMLLM)
    min_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0


@dataclass
class ClientAlgoConfig:
    name: str = "plain"  # plain | fedprox | fedmllm_reg | scaffold
    mu: float = 0.01  # proximal strength (fedprox, fedmllm_reg)
    weight: float = 0.1  # w of FedMLLM's adaptive regularization
    window: int = 4  # s of FedMLLM's adaptive regularization: layers s..L-1-s are regularized


@dataclass
class ServerAlgoConfig:
    name: str = "fedavg"  # fedavg | fedavgm | fedadagrad | fedyogi | fedadam | scaffold | local_only | zero_shot
    lr: Optional[float] = None  # server learning rate eta; None takes the algorithm's default
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    weighting: str = "auto"  # auto (the algorithm's default) | samples | uniform


@dataclass
class AlgorithmConfig:
    client: ClientAlgoConfig = field(default_factory=ClientAlgoConfig)
    server: ServerAlgoConfig = field(default_factory=ServerAlgoConfig)


@dataclass
class FederationConfig:
    rounds: int = 10
    clients_per_round: int = 0  # K; 0 means use ``fraction``
    fraction: float = 0.2  # K = max(1, round(fraction * N)) when clients_per_round is 0


@dataclass
class EvalConfig:
    every: int = 1  # evaluate the global model every this many rounds (and always after the last)
    batch_size: int = 32
    max_samples: int = 0  # 0: the whole test split
    zero_shot: bool = True  # evaluate the untouched backbone before round 1
    max_new_tokens: int = 8


@dataclass
class RuntimeConfig:
    engine: str = "sequential"
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default


@dataclass
class OutputConfig:
    dir: Optional[str] = None  # default runs/<experiment>-<timestamp>
    save_adapter: bool = True
    progress: str = "auto"  # auto (a bar only on a terminal) | always | never


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def clients_per_round(self) -> int:
        n = self.partition.num_clients
        if self.federation.clients_per_round > 0:
            return self.federation.clients_per_round
        return max(1, min(n, round(self.federation.fraction * n)))


# Fixed choices; algorithm and dataset names are checked against their registries in ``validate``.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.quant_type": ("nf4", "fp4"),
    "model.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.device": ("auto", "cpu", "cuda"),
    "data.task": ("classification", "vqa"),
    "partition.scheme": ("iid", "dirichlet", "quantity"),
    "training.lr_schedule": ("constant", "cosine"),
    "algorithm.server.weighting": ("auto", "samples", "uniform"),
    "runtime.engine": ("sequential",),
    "output.progress": ("auto", "always", "never"),
}

POSITIVE = (
    "model.lora.r", "model.lora.alpha", "data.num_train", "data.num_test", "data.image_size",
    "data.max_length", "partition.num_clients", "training.batch_size", "training.lr",
    "eval.every", "eval.batch_size", "eval.max_new_tokens",
)
NON_NEGATIVE = (
    "federation.rounds", "federation.clients_per_round", "training.local_epochs", "training.local_steps",
    "training.weight_decay", "training.max_grad_norm", "training.min_lr", "algorithm.client.mu",
    "algorithm.client.weight", "algorithm.client.window", "algorithm.server.tau", "eval.max_samples",
    "runtime.num_threads", "partition.min_samples",
)
UNIT_INTERVAL = ("model.lora.dropout", "federation.fraction", "training.beta1", "training.beta2",
                 "algorithm.server.beta1", "algorithm.server.beta2")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected {expected}")


def _check_choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        _fail(key, value, "one of " + ", ".join(sorted(allowed)))


def validate(cfg: ExperimentConfig) -> None:
    """Check ranges, choices and combinations that the type system cannot express."""
    from fedsim.algorithms import CLIENT_STRATEGIES, SERVER_STRATEGIES
    from fedsim.data import DATASETS

    for key, allowed in CHOICES.items():
        _check_choice(key, _get(cfg, key), allowed)
    _check_choice("algorithm.client.name", cfg.algorithm.client.name, list(CLIENT_STRATEGIES))
    _check_choice("algorithm.server.name", cfg.algorithm.server.name, list(SERVER_STRATEGIES))
    _check_choice("data.dataset", cfg.data.dataset, list(DATASETS))
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            _fail(key, _get(cfg, key), "a value > 0")
    for key in NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            _fail(key, _get(cfg, key), "a value >= 0")
    for key in UNIT_INTERVAL:
        if not 0 <= _get(cfg, key) <= 1:
            _fail(key, _get(cfg, key), "a value in [0, 1]")
    if cfg.algorithm.server.lr is not None and not cfg.algorithm.server.lr > 0:
        _fail("algorithm.server.lr", cfg.algorithm.server.lr, "a value > 0 or null")
    if cfg.training.local_epochs == 0 and cfg.training.local_steps == 0:
        _fail("training.local_epochs", 0, "local_epochs > 0 or training.local_steps > 0")
    if cfg.federation.clients_per_round > cfg.partition.num_clients:
        _fail("federation.clients_per_round", cfg.federation.clients_per_round,
              f"at most partition.num_clients ({cfg.partition.num_clients})")
    if cfg.partition.num_clients * max(1, cfg.partition.min_samples) > cfg.data.num_train:
        _fail("partition.num_clients", cfg.partition.num_clients,
              f"at most data.num_train / partition.min_samples ({cfg.data.num_train} / "
              f"{max(1, cfg.partition.min_samples)})")
    client, server = cfg.algorithm.client.name, cfg.algorithm.server.name
    if (client == "scaffold") != (server == "scaffold"):
        _fail("algorithm.client.name", client,
              "'scaffold' on both algorithm.client.name and algorithm.server.name, or on neither "
              f"(server is {server!r})")
    if not cfg.model.lora.target_regex and not cfg.model.lora.target_modules:
        _fail("model.lora.target_modules", [], "a non-empty list, or model.lora.target_regex")


def _schema_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.structured(ExperimentConfig)
        try:
            node = OmegaConf.select(node, parent) if parent else node
            valid = list(node.keys()) if isinstance(node, DictConfig) else []
        except OmegaConfBaseException:
            valid = []
        hint = difflib.get_close_matches(leaf, valid, n=1)
        msg = f"unknown config key '{key}' in {source}"
        if hint:
            msg += f" (did you mean '{(parent + '.' if parent else '') + hint[0]}'?)"
        if valid:
            msg += f"; valid keys here: {', '.join(valid)}"
        return ConfigError(msg)
    if isinstance(err, ValidationError):
        return ConfigError(f"config key '{key}' in {source}: {err.msg}")
    return ConfigError(f"invalid config in {source}: {err}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Merge a YAML file and dotlist overrides onto the schema, validate, and return typed dataclasses."""
    merged = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _schema_error(err, str(path)) from None
        if "name" not in OmegaConf.load(path):
            merged.name = path.stem
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _schema_error(err, f"override {item!r}") from None
    cfg: ExperimentConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
