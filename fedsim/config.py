"""Typed experiment configuration: the schema as dataclasses, YAML merging, and per-value checks.

This module is pure data: it imports no registry. ``merge_config(paths, overrides)`` merges YAML files and
``key=value`` overrides onto the schema below; ``check_values(cfg)`` checks choices and ranges that need no
registry. The checks that need the algorithm, scheduler, dataset and scenario registries live one level up,
in ``fedsim.validation``, whose ``load_config`` (merge, then validate everything) is the entry point for a
config that is ready to run. Errors name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


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
    # Runs the model repository's own Python code: a hub model then needs ``revision`` pinned to a full commit.
    trust_remote_code: bool = False
    # A hub model's branch, tag or commit; pin a commit so that every node and every rerun loads the same
    # weights (None: the default branch as it is today).
    revision: Optional[str] = None
    # Weights load from safetensors only; true also accepts pickled ones (.bin), which can run code when loaded.
    allow_pickle_weights: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # ``synthetic`` (generated from the seed) or a real dataset adapter (fedsim/data/real/), read from a
    # local folder (``path``) or a hub dataset (``hub``).
    dataset: str = "synthetic"
    path: Optional[str] = None
    hub: Optional[str] = None
    revision: Optional[str] = None  # the hub dataset's branch, tag or commit (None: the default branch)
    task: str = "classification"  # synthetic: classification (multiple choice) | vqa (short answer) | textqa
    # Synthetic: rows generated. Real datasets: at most this many rows, a seeded subsample (0: all rows).
    num_train: int = 2000
    num_test: int = 300
    # Synthetic: the seed of the test split (None: the run's seed). Fixed, every seed and every scenario is
    # scored on the same items, so that differences between runs pair item by item.
    test_seed: Optional[int] = None
    # Synthetic: > 0 gives each client its own rows, derived from (seed, client, row) when it trains, instead
    # of a split of num_train rows: any number of clients, a few bytes each (partition.scheme shapes their
    # sizes and label mixes; fedsim.clientdata.GeneratedClients).
    samples_per_client: int = 0
    image_size: int = 32
    max_length: int = 128
    # Heterogeneity steps applied to the training split (fedsim/scenarios.py), as {step: {param: value}},
    # e.g. {missing: {beta: 0.3}, domain: {styles: [noise, blur]}}. Empty: aligned (both modalities
    # everywhere; label skew comes from ``partition``).
    scenarios: dict[str, Any] = field(default_factory=dict)
    # The same steps for the test split (treated as one client); empty keeps it complete, so that runs
    # under different scenarios are compared on the same test set.
    test_scenarios: dict[str, Any] = field(default_factory=dict)
    # How prompts refer to modalities: plain (they do not) | modality (they name the ones present, as in
    # FedMLLM's baseline) | agnostic (FedMLLM's prompt augmentation: answer whatever modalities are given)
    prompt: str = "plain"
    # Synthetic classification (fedsim/data/synthetic.py): each modality carries one attribute of the label
    # reliably (P right = cue_reliability: the image's colour for warm/cool, the note's word for
    # fragile/sturdy) and the other weakly, so that it alone reaches image_share / text_share, in
    # [cue_reliability / 2, cue_reliability] (the item's size, the note's weather word). The defaults: 88.4%
    # with both modalities, 66% with either alone (the Bayes ceilings, Cues.bayes_accuracy).
    image_share: float = 0.66
    text_share: float = 0.66
    cue_reliability: float = 0.94
    # Synthetic: render the note's describing word into the image as a glyph strip (like a meme's caption),
    # so that the image alone carries the whole label and missing text costs almost nothing.
    text_in_image: bool = False


@dataclass
class PartitionConfig:
    scheme: str = "iid"  # iid | dirichlet | quantity
    num_clients: int = 20
    alpha: float = 0.5  # Dirichlet concentration: of labels over clients (dirichlet), of client sizes (quantity)
    min_samples: int = 1


@dataclass
class TrainingConfig:
    """Local training on each client."""

    local_epochs: int = 1
    local_steps: int = 0  # > 0 replaces epochs with a fixed number of optimizer steps
    batch_size: int = 8
    # adamw | sgd. SCAFFOLD needs sgd: its control variate (theta_global - theta) / (K * lr) estimates the
    # mean local gradient only under plain SGD steps.
    optimizer: str = "adamw"
    lr: float = 3e-3
    momentum: float = 0.0  # sgd only (heavy ball, torch.optim.SGD's momentum)
    lr_schedule: str = "constant"  # constant | cosine (decays across rounds, as in FedMLLM)
    min_lr: float = 0.0
    # > 0: the FedMLLM code's warm-up over the first warmup_fraction x rounds rounds, then its cosine form
    # (fedsim/training.py round_lr has the formula; under 1 round of warm-up, round 1 runs above lr).
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0


@dataclass
class ClientAlgoConfig:
    name: str = "plain"  # plain | fedprox | fedmllm_reg | scaffold
    mu: float = 0.01  # proximal strength (fedprox, fedmllm_reg)
    weight: float = 0.1  # w of FedMLLM's adaptive regularization
    # s of FedMLLM's adaptive regularization as a fraction of the L decoder layers: layers s..L-1-s are
    # regularized, with s = round(window * L). The paper's s=4 of L=28 is 1/7.
    window: float = 1 / 7


@dataclass
class ServerAlgoConfig:
    # fedavg | fedavgm | fedadagrad | fedyogi | fedadam | scaffold | local_only | zero_shot (synchronous)
    # median | trimmed_mean | krum | multikrum | bulyan | norm_bound (synchronous, Byzantine-robust)
    # fedbuff | fedasync (asynchronous)
    name: str = "fedavg"
    lr: Optional[float] = None  # server learning rate eta; None takes the algorithm's default
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    weighting: str = "auto"  # auto (the algorithm's default) | samples | uniform
    # Server momentum forms (fedsim/algorithms/server.py gives the formulas). FedAvgM: heavy_ball
    # v <- beta1 v + delta (Hsu et al.) | ema m <- beta1 m + (1 - beta1) delta (the FedMLLM/OpenFedLLM code).
    momentum_form: str = "heavy_ball"
    # First moment at the first server step of fedavgm/fedadagrad/fedyogi/fedadam: zero (m0 = 0, Reddi et
    # al.) | first_delta (m = delta at the first step, as the FedMLLM/OpenFedLLM code does).
    moment_init: str = "zero"
    # What the adaptive servers' second moment v is built from: delta (Reddi et al.) | momentum (m, as the
    # FedMLLM/OpenFedLLM code does for FedYogi and FedAdam).
    second_moment_of: str = "delta"
    # Asynchronous strategies (fedbuff, fedasync): an update trained from version v and applied at version
    # t has staleness s = t - v and weight (1 + s) ** -staleness_exponent; beyond max_staleness it is dropped.
    buffer_size: int = 10  # FedBuff's K: updates per server step
    staleness_exponent: float = 0.5
    max_staleness: int = 0  # 0: no bound
    mixing: float = 0.5  # FedAsync's alpha, in (0, 1]
    # FedAsync's update with a_s = mixing * staleness_weight: ``mix`` is Xie et al.'s
    # x <- (1 - a_s) x + a_s (x_base + delta); ``delta`` is FLSim's x <- x + lr * a_s * delta, which drops the
    # a_s (x_base - x) term (zero when fresh) and needs no old global version.
    fedasync_rule: str = "mix"
    # Byzantine-robust rules (median | trimmed_mean | krum | multikrum | bulyan | norm_bound), which take the
    # round's updates together (fedsim/algorithms/robust.py): values trimmed from each end per coordinate,
    # attackers tolerated by krum/multikrum/bulyan, updates averaged by multikrum (0: K - f), clip norm.
    trim: int = 1
    f: int = 1
    multikrum_m: int = 0
    norm_bound: float = 1.0


@dataclass
class AlgorithmConfig:
    client: ClientAlgoConfig = field(default_factory=ClientAlgoConfig)
    server: ServerAlgoConfig = field(default_factory=ServerAlgoConfig)


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018); fedsim/privacy.py has the rules."""

    mode: str = "none"  # none | central (noise once on the server's sum) | local (noise on each client's update)
    clip_norm: float = 1.0  # S: the L2 bound of every update (adaptive_clip: the starting value)
    noise_multiplier: float = 1.0  # sigma: noise std sigma * S on the sum (central) or on each update (local)
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | pld (dp-accounting's)
    # poisson: q = K/N per step, the standard approximation for fixed-size cohorts | fixed: sampling
    # without replacement (RDP accountant only)
    sampling: str = "poisson"
    adaptive_clip: bool = False  # the clip norm follows target_quantile of update norms (Andrew et al. 2021)
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise_std: float = 0.0  # noise on the clipped-update count; 0: K/20, the paper's choice


@dataclass
class AttackConfig:
    """Byzantine clients, drawn once from the run's seed (fedsim/attacks.py)."""

    kind: str = "none"  # none | sign_flip | gaussian | scale | free_rider | label_flip | backdoor
    fraction: float = 0.0  # of all clients
    # sign_flip: c in -c * delta; gaussian: the std of the noise sent; scale: the boost (0: K / server lr,
    # the model replacement of Bagdasaryan et al.)
    scale: float = 1.0
    # backdoor: the modality that carries the trigger (image: a patch, text: a word), the label it maps to,
    # and the share of an attacker's rows (those that hold that modality) it plants it in
    trigger: str = "image"
    target_label: int = 0
    poison_fraction: float = 0.5


@dataclass
class CompressionConfig:
    """How client updates are encoded for upload (fedsim/compression.py); bytes_up counts the encoding."""

    kind: str = "none"  # none | topk | randk | int8 | fp16 | nf4
    density: float = 0.1  # topk / randk: the fraction of coordinates sent
    error_feedback: bool = True  # topk / randk: keep what was not sent in the client's state and add it next time


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
    # Also score the test split with a modality removed, reported as ``<ablation>/<metric>``:
    # no_image (every image dropped) and/or no_text (every text dropped).
    ablations: list[str] = field(default_factory=list)
    # Score the ablations at every this many rounds' evaluation and after the last (0: at every evaluation):
    # a learning curve of the full split at a fraction of the cost, the ablations where they are read.
    ablations_every: int = 0
    # Personalized runs (local_only): score the own adapters of this many clients, a sample drawn from the
    # seed and the round, at each evaluation (0: every client's; each costs a pass over the test split).
    personalized_clients: int = 0


@dataclass
class SchedulerConfig:
    """Who trains when, on which simulated device, and how long it takes on the virtual clock."""

    # always | bernoulli (p per round / dispatch) | trace (on/off intervals file) | fedscale (client_behave_trace)
    availability: str = "always"
    availability_p: float = 1.0
    # trace: JSON {client id: [[start_s, end_s], ...]} of online intervals; fedscale: FedScale's behave trace
    availability_trace: Optional[str] = None
    speed: str = "constant"  # per-client slowdown factor: constant | lognormal (sigma) | uniform [low, high]
    speed_sigma: float = 0.5
    speed_low: float = 1.0
    speed_high: float = 4.0
    device_trace: Optional[str] = None  # JSON {client id: {"speed": f, "bandwidth_mbps": b}} overrides draws
    # fedsim: device_trace as above | fedscale: device_trace is FedScale's client_device_capacity, every
    # client replays one of its devices (speed and bandwidth draws unused)
    device_trace_format: str = "fedsim"
    bandwidth_mbps: float = 100.0  # median link speed, megabits per second
    bandwidth_sigma: float = 0.0  # lognormal spread of per-client bandwidth; 0: all equal
    compute_time: str = "modeled"  # modeled: samples x seconds_per_sample (deterministic) | measured
    seconds_per_sample: float = 0.01
    overcommit: float = 1.0  # sync: dispatch ceil(K * overcommit), keep the first K to finish
    dropout: float = 0.0  # probability that a dispatched client fails and never reports
    deadline_s: float = 0.0  # sync: simulated seconds after which a round closes (0: none)
    quorum: float = 1.0  # sync: fraction of K needed to close a round at its deadline
    concurrency: int = 0  # async: clients in flight; 0 means clients_per_round


@dataclass
class RuntimeConfig:
    engine: str = "ray"  # ray (the distributed runtime) | sequential (the in-process reference)
    num_threads: int = 0  # torch intra-op threads per process; 0 leaves the default (Ray workers: cpus_per_worker)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractional: 0.25 puts four workers on one GPU
    queue_per_worker: int = 1  # tasks queued on a worker beyond the one it runs
    # Clients a worker trains together, one forward pass per step over the shared backbone with each sample
    # through its own client's LoRA weights (fedsim.models.multiclient); 1: one client at a time. ``auto``:
    # the clients trained at once (a round's dispatch, or the asynchronous concurrency) split evenly into one
    # batch per worker, or into more, as even, where their adapters, optimizer states and activations would
    # not fit in batch_memory_gb (fedsim.clients_per_batch.auto_batch_size); summary.json records the B chosen.
    clients_per_batch: Union[int, str] = 1
    # The memory budget of clients_per_batch=auto, GiB per worker; 0: half the memory free on the worker's
    # device once its model is loaded (on CPU, split among the run's workers).
    batch_memory_gb: float = 0.0
    # Where workers go, as a Ray placement group of one bundle per worker: pack (as few nodes as possible)
    # or spread (across nodes). A replacement for a lost worker takes the same bundle, which Ray moves to a
    # live node.
    placement: str = "pack"
    # A run that asks for more CPUs/GPUs than the cluster has requests them from the autoscaler and waits up
    # to this long for nodes to join (a GPU node boots in minutes); 0: fail at once, naming what is missing.
    resource_timeout_s: float = 1800.0
    # A worker call (a batch of client tasks, an evaluation shard) that makes no progress for this long is
    # taken for hung: its worker is restarted and the call runs again, with the same seeds, elsewhere.
    # 0: derived from the calls measured so far (20x the longest, at least 300 s; 1800 s before the first).
    task_timeout_s: float = 0.0
    max_update_norm: float = 0.0  # reject updates whose L2 norm exceeds this (0: no bound)
    # Client states (SCAFFOLD's c_i, personal adapters) live in files under RUN_DIR/client_states/; the most
    # recently used ones are also kept in memory, up to this many MiB (0: read every state from disk).
    state_cache_mb: float = 256.0
    # Each worker keeps the training samples it has encoded (chat template, tokenizer, image processor: as
    # costly as a third of a forward and backward pass on the tiny preset) for the next task of their client,
    # the most recently used up to this many MiB (0: encode every batch afresh).
    sample_cache_mb: float = 256.0
    address: Optional[str] = None  # Ray cluster; default RAY_ADDRESS, else a local instance


@dataclass
class CheckpointConfig:
    # Write RUN_DIR/checkpoint/ every this many rounds (asynchronous runs: global versions) and after the
    # last (0: never); ``fedsim run --resume RUN_DIR`` continues from it.
    every: int = 5


@dataclass
class SweepConfig:
    # ``fedsim sweep`` runs the cross product of these values, {dotted key: [values, ...]}, one run per
    # point; ``--grid key=v1,v2`` on its command line replaces a key's values. ``fedsim run`` ignores it.
    grid: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputConfig:
    dir: Optional[str] = None  # default runs/<experiment>-<timestamp>
    save_adapter: bool = True
    progress: str = "auto"  # auto (a bar only on a terminal) | always | never
    # Experiment trackers that also receive the run's metrics, config, summary and adapter: any of tensorboard,
    # mlflow, wandb, each an optional extra (pip install 'fedsim[mlflow]'); offline by default (docs/trackers.md).
    trackers: list[str] = field(default_factory=list)
    # Where TensorBoard's logs (tensorboard/<run name>/) and MLflow's file store (mlruns/) go (None: the run
    # directory); ``fedsim sweep`` sets it to the sweep directory, so that its runs share them.
    tracker_dir: Optional[str] = None
    # The group of runs the trackers file this one under: MLflow's experiment and the W&B group (None: no
    # W&B group, and the experiment's name for MLflow); ``fedsim sweep`` sets it to the sweep's name.
    tracker_group: Optional[str] = None


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    # Your own modules (server or client strategies, datasets, scenario steps, trackers: docs/extending.md),
    # imported in every process of the run before the config is checked: module names importable there, or
    # paths of .py files (made absolute when the config loads).
    plugins: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def clients_per_round(self) -> int:
        n = self.partition.num_clients
        if self.federation.clients_per_round > 0:
            return self.federation.clients_per_round
        return max(1, min(n, round(self.federation.fraction * n)))


# Fixed choices; algorithm and dataset names are checked against their registries in fedsim.validation.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.quant_type": ("nf4", "fp4"),
    "model.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.device": ("auto", "cpu", "cuda"),
    "data.task": ("classification", "vqa", "textqa"),
    "data.prompt": ("plain", "modality", "agnostic"),
    "partition.scheme": ("iid", "dirichlet", "quantity"),
    "training.lr_schedule": ("constant", "cosine"),
    "training.optimizer": ("adamw", "sgd"),
    "algorithm.server.fedasync_rule": ("mix", "delta"),
    "algorithm.server.momentum_form": ("heavy_ball", "ema"),
    "algorithm.server.moment_init": ("zero", "first_delta"),
    "algorithm.server.second_moment_of": ("delta", "momentum"),
    "algorithm.server.weighting": ("auto", "samples", "uniform"),
    "runtime.engine": ("ray", "sequential"),
    "runtime.placement": ("pack", "spread"),
    "output.progress": ("auto", "always", "never"),
    "privacy.mode": ("none", "central", "local"),
    "privacy.accountant": ("rdp", "pld"),
    "privacy.sampling": ("poisson", "fixed"),
    "attack.kind": ("none", "sign_flip", "gaussian", "scale", "free_rider", "label_flip", "backdoor"),
    "attack.trigger": ("image", "text"),
    "compression.kind": ("none", "topk", "randk", "int8", "fp16", "nf4"),
}

POSITIVE = (
    "runtime.num_workers", "algorithm.server.buffer_size",
    "model.lora.r", "model.lora.alpha", "data.image_size",
    "data.max_length", "partition.num_clients", "training.batch_size", "training.lr",
    "eval.every", "eval.batch_size", "eval.max_new_tokens",
)
NON_NEGATIVE = (
    "data.num_train", "data.num_test", "data.samples_per_client",
    "federation.rounds", "federation.clients_per_round", "training.local_epochs", "training.local_steps",
    "training.weight_decay", "training.max_grad_norm", "training.min_lr", "algorithm.client.mu",
    "algorithm.client.weight", "algorithm.server.tau", "eval.max_samples", "eval.ablations_every",
    "runtime.num_threads", "partition.min_samples", "runtime.cpus_per_worker", "runtime.gpus_per_worker",
    "runtime.queue_per_worker", "runtime.max_update_norm", "runtime.batch_memory_gb", "algorithm.server.staleness_exponent",
    "algorithm.server.max_staleness", "checkpoint.every", "runtime.resource_timeout_s", "runtime.task_timeout_s",
    "runtime.state_cache_mb", "runtime.sample_cache_mb",
)
UNIT_INTERVAL = ("model.lora.dropout", "federation.fraction", "training.beta1", "training.beta2",
                 "algorithm.server.beta1", "algorithm.server.beta2", "algorithm.server.mixing",
                 "training.warmup_fraction")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def fail(key: str, value: Any, expected: str) -> None:
    """Raise the ConfigError every check uses: the key, the bad value, what is allowed."""
    raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected {expected}")


def check_choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        fail(key, value, "one of " + ", ".join(sorted(allowed)))


def check_values(cfg: ExperimentConfig) -> None:
    """Check the choices, ranges and combinations that need no registry (``fedsim.validation`` does the rest)."""
    for key, allowed in CHOICES.items():
        check_choice(key, _get(cfg, key), allowed)
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            fail(key, _get(cfg, key), "a value > 0")
    for key in NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            fail(key, _get(cfg, key), "a value >= 0")
    for key in UNIT_INTERVAL:
        if not 0 <= _get(cfg, key) <= 1:
            fail(key, _get(cfg, key), "a value in [0, 1]")
    _check_training(cfg.training)
    if not 0 <= cfg.algorithm.client.window < 0.5:
        fail("algorithm.client.window", cfg.algorithm.client.window,
             "a fraction of the decoder layers in [0, 0.5): layers round(window*L)..L-1-round(window*L) "
             "are regularized")
    if not cfg.algorithm.server.mixing > 0:
        fail("algorithm.server.mixing", cfg.algorithm.server.mixing, "a value in (0, 1]")
    if cfg.algorithm.server.lr is not None and not cfg.algorithm.server.lr > 0:
        fail("algorithm.server.lr", cfg.algorithm.server.lr, "a value > 0 or null")
    if cfg.federation.clients_per_round > cfg.partition.num_clients:
        fail("federation.clients_per_round", cfg.federation.clients_per_round,
             f"at most partition.num_clients ({cfg.partition.num_clients})")
    if cfg.data.samples_per_client:
        _check_generated_clients(cfg)
    elif cfg.data.num_train and cfg.partition.num_clients * max(1, cfg.partition.min_samples) > cfg.data.num_train:
        fail("partition.num_clients", cfg.partition.num_clients,
             f"at most data.num_train / partition.min_samples ({cfg.data.num_train} / "
             f"{max(1, cfg.partition.min_samples)})")
    if not cfg.model.lora.target_regex and not cfg.model.lora.target_modules:
        fail("model.lora.target_modules", [], "a non-empty list, or model.lora.target_regex")
    batch = cfg.runtime.clients_per_batch
    if batch != "auto" and not (isinstance(batch, int) and batch >= 1):
        fail("runtime.clients_per_batch", batch, "an integer >= 1, or auto")
    if batch != 1 and cfg.model.lora.modules_to_save:
        fail("runtime.clients_per_batch", batch, "1 with model.lora.modules_to_save: clients trained together "
             "share everything but their LoRA A/B weights")
    ablations = list(cfg.eval.ablations)  # the names fedsim.evaluation.ABLATIONS knows
    if any(a not in ("no_image", "no_text") for a in ablations) or len(set(ablations)) != len(ablations):
        fail("eval.ablations", ablations, "a list of distinct names among no_image, no_text")
    if not 0 <= cfg.eval.personalized_clients <= cfg.partition.num_clients:
        fail("eval.personalized_clients", cfg.eval.personalized_clients,
             f"an integer in [0, partition.num_clients ({cfg.partition.num_clients})]: 0 scores every client's "
             "own adapter, k a seeded sample of k clients")


def _check_generated_clients(cfg: ExperimentConfig) -> None:
    if cfg.data.dataset != "synthetic":
        fail("data.samples_per_client", cfg.data.samples_per_client,
             f"0 with data.dataset {cfg.data.dataset!r}: rows per client are generated, for the synthetic "
             "benchmark only; a real dataset is split over clients by partition.scheme")
    if cfg.data.scenarios:
        fail("data.scenarios", dict(cfg.data.scenarios), "no steps with data.samples_per_client: the scenarios "
             "reshape a fixed training split; set data.num_train instead of data.samples_per_client")
    if cfg.partition.scheme == "quantity" and cfg.data.samples_per_client < max(1, cfg.partition.min_samples):
        fail("data.samples_per_client", cfg.data.samples_per_client,
             f"at least partition.min_samples ({cfg.partition.min_samples}): the mean of sizes that start there")
    if cfg.partition.scheme in ("dirichlet", "quantity") and not cfg.partition.alpha > 0:
        fail("partition.alpha", cfg.partition.alpha, f"a value > 0 for partition.scheme {cfg.partition.scheme!r}")


def _check_training(cfg: TrainingConfig) -> None:
    if cfg.local_epochs == 0 and cfg.local_steps == 0:
        fail("training.local_epochs", 0, "local_epochs > 0 or training.local_steps > 0")
    if not 0 <= cfg.momentum < 1:
        fail("training.momentum", cfg.momentum, "a value in [0, 1)")
    if cfg.momentum > 0 and cfg.optimizer != "sgd":
        fail("training.momentum", cfg.momentum, f"0 with training.optimizer {cfg.optimizer!r}: momentum is "
             "SGD's (heavy ball); set training.optimizer=sgd to use it (AdamW takes training.beta1)")


def _section_keys(dotted: str) -> list[str]:
    """The keys the schema allows under ``dotted`` (empty if it is not a section)."""
    try:
        node = OmegaConf.select(_schema(), dotted) if dotted else _schema()
    except OmegaConfBaseException:
        return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _schema_error(err: OmegaConfBaseException, source: str, key_hint: str = "") -> ConfigError:
    key = getattr(err, "full_key", None) or key_hint
    if isinstance(err, ConfigKeyError):
        parent, _, leaf = key.rpartition(".")
        valid = _section_keys(parent)
        hint = difflib.get_close_matches(leaf, valid, n=1)
        msg = f"unknown config key '{key}' in {source}"
        if hint:
            msg += f" (did you mean '{(parent + '.' if parent else '') + hint[0]}'?)"
        if valid:
            msg += f"; valid keys here: {', '.join(valid)}"
        return ConfigError(msg)
    # omegaconf appends its own diagnostics after the first line; the first line is the user's business.
    detail = str(getattr(err, "msg", None) or err).splitlines()[0]
    if key and _section_keys(key):
        return ConfigError(f"config key '{key}' in {source} is a section: set its keys "
                           f"({', '.join(_section_keys(key))}), not a single value")
    if key:
        return ConfigError(f"config key '{key}' in {source}: {detail}")
    return ConfigError(f"invalid config in {source}: {detail}")


def refuse_interpolation(value: Any, key: str, source: str) -> None:
    """ConfigError naming the key of any string in ``value`` (a YAML mapping, list or scalar) holding '${'.
    OmegaConf resolves '${oc.env:VAR}' from the environment and '${other.key}' from another key when it
    builds the config: a config (perhaps from someone else's run directory) must mean what it says."""
    if isinstance(value, dict):
        for name, item in value.items():
            refuse_interpolation(item, f"{key}.{name}" if key else str(name), source)
    elif isinstance(value, list):
        for item in value:
            refuse_interpolation(item, key, source)
    elif isinstance(value, str) and "${" in value:
        fail(key, value, f"a plain value, not an OmegaConf interpolation (in {source}: a '${{' in a value is "
                         "refused, since OmegaConf would resolve it)")


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        # checked before OmegaConf reads it: it would resolve (or fail to parse) a '${' in a value
        refuse_interpolation(yaml.safe_load(path.read_text()), "", f"config file {path}")
        loaded = OmegaConf.load(path)
    except ConfigError:
        raise
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} could not be read as a YAML mapping of config keys: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of config keys at its top level, "
                          f"not a {type(loaded).__name__}")
    return loaded


def _merge(base: DictConfig, layers: list[tuple[DictConfig, str, str]]) -> DictConfig:
    """``base`` with each ``(layer, source, key_hint)`` merged on in order; errors name the layer at fault."""
    try:
        return OmegaConf.merge(base, *(layer for layer, _, _ in layers))  # one copy of base, not one per layer
    except OmegaConfBaseException:
        for layer, source, key_hint in layers:
            try:
                base = OmegaConf.merge(base, layer)
            except OmegaConfBaseException as err:
                raise _schema_error(err, source, key_hint) from None
        raise


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    """The schema as an omegaconf node, built once (slow): merging copies it and never changes it."""
    return OmegaConf.structured(ExperimentConfig)


def merge_config(path: str | Path | Sequence[str | Path] | None = None,
                 overrides: list[str] | None = None) -> ExperimentConfig:
    """Merge YAML files (one, or several as layers, later ones winning) and dotlist overrides onto the
    schema and return typed dataclasses, NOT validated: use ``fedsim.validation.load_config`` for a config
    to run. Without a ``name`` key in any file, the experiment is named after the files' stems joined by '-'."""
    paths = [] if path is None else [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    layers = [(_load_yaml(layer), str(layer), "") for layer in paths]
    if paths and not any("name" in loaded for loaded, _, _ in layers):
        stems = "-".join(p.stem for p in paths)
        refuse_interpolation(stems, "name", "the files' stems")
        layers.append((OmegaConf.create({"name": stems}), "the files' stems", "name"))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        refuse_interpolation(value, key, f"override {item!r}")
        layers.append((OmegaConf.from_dotlist([item]), f"override {item!r}", key))
    merged = _merge(_schema(), layers)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _schema_error(err, "the merged config") from None


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
