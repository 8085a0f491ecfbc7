"""What a run directory holds: its files and folders, and every field of metrics.jsonl, summary.json and the
checkpoint's JSON files, each with its type, when it is written and what it means.

docs/outputs.md is rendered from these tables (``outputs_reference``, written by ``python -m fedsim.reference
--write``). tests/test_outputs_reference.py runs real federations and fails when one writes a file or field
these tables do not describe, leaves out one they say it writes, or writes a value of another type; the Ray
tests run the same check on the fields only the Ray engine writes. The names and meanings were read from the
code that writes them (fedsim/engine/loop.py, fedsim/output.py, fedsim/checkpoint.py, fedsim/statestore.py,
fedsim/evaluation.py, actors/): a change there that the tables miss fails that test, not a reader.

This module imports nothing heavy (no torch): the page is generated in a fraction of a second.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterator

from fedsim.output import RECORDED_LIBRARIES
from fedsim.runlock import LOCK_FILE


class When(enum.Enum):
    """When an entry is written; the value is the page's wording. tests/outputs_check.py decides each one for
    a finished run, from its config.yaml and summary.json."""

    ALWAYS = "always"
    SYNC = "synchronous runs"
    ASYNC = "asynchronous runs"
    EVAL_ROUND = "evaluation rounds (every `eval.every`-th, and the last)"
    PRIVACY = "`privacy.mode` central or local"
    TRAINED = "runs that trained (every server but `zero_shot`)"
    BATCHED = "`runtime.clients_per_batch` other than 1 (`auto` included)"
    RAY = "the Ray engine"
    CHECKPOINT = "`checkpoint.every` > 0 (every that many rounds and after the last)"
    ADAPTER = ("`output.save_adapter` (the default) with a server that trains one global adapter (not `local_only`, "
               "`zero_shot`)")
    CLIENT_STATES = ("a client state was kept: SCAFFOLD's control variates, `local_only`'s own adapters, error "
                     "feedback of `topk` or `randk` compression")
    LOCKED = "runs started by `fedsim run` or `fedsim sweep` (not an engine called from Python)"
    TRACKERS = "`output.trackers` names a tracker"
    TENSORBOARD = "`output.trackers` holds tensorboard"
    MLFLOW = "`output.trackers` holds mlflow"
    WANDB = "`output.trackers` holds wandb"
    TENSORBOARD_HERE = ("`output.trackers` holds tensorboard and `output.tracker_dir` is not set (a sweep sets it: "
                        "the files go to the sweep directory)")
    MLFLOW_HERE = ("`output.trackers` holds mlflow and `output.tracker_dir` is not set (a sweep sets it: the files go "
                   "to the sweep directory)")


METRIC_NAMES = "evaluation metric names"  # a map keyed by them: see EVAL_METRICS and the naming rules


@dataclass(frozen=True)
class Field:
    """A field of a JSON object. ``type``: ``int``, ``float``, ``str``, ``bool``, ``object``, ``list[T]``,
    ``map[str, T]`` or ``any`` (a component's own state, not described here), ``or null`` after it when it may
    be null (never ``|``: GitHub would split the table cell there, code span or not). An ``object``'s fields (a
    ``list[object]``'s items') are ``fields``; a map's keys vary, ``keys`` says what they are, and ``fields``
    describe its values (if objects)."""

    name: str
    type: str
    meaning: str
    when: When = When.ALWAYS
    fields: tuple[Field, ...] = ()
    keys: str = ""

    @property
    def is_map(self) -> bool:
        return self.type.startswith("map[")


@dataclass(frozen=True)
class Row:
    """A field with its path (``a.b`` for an object's field, ``a[].b`` for a list item's, ``a.*.b`` for a map
    value's) and the row of the field it is nested in."""

    path: str
    field: Field
    parent: Row | None = None

    @property
    def conditions(self) -> tuple[When, ...]:
        """What must hold for it to be written: its own condition and those of the fields it is nested in."""
        inherited = self.parent.conditions if self.parent else ()
        return inherited + ((self.field.when,) if self.field.when is not When.ALWAYS else ())


def flatten(fields: tuple[Field, ...], parent: Row | None = None) -> Iterator[Row]:
    """Each field's row, depth first."""
    for item in fields:
        prefix = "" if parent is None else parent.path + (".*." if parent.field.is_map else
                                                          "[]." if parent.field.type.startswith("list[") else ".")
        row = Row(prefix + item.name, item, parent)
        yield row
        yield from flatten(item.fields, row)


@dataclass(frozen=True)
class RunFile:
    """A file or folder (``/`` at the end) of the run directory; ``<...>`` stands for a part that varies.
    ``opaque``: a folder laid out by another library, whose contents are not listed here."""

    path: str
    meaning: str
    when: When = When.ALWAYS
    opaque: bool = False


@dataclass(frozen=True)
class EvalMetric:
    name: str
    tasks: str  # the kind of test split that reports it
    meaning: str


# ---------------------------------------------------------------------------------------------- evaluation
EVAL_METRICS = (
    EvalMetric("accuracy", "all",
               "multiple choice: share of rows whose highest-scored option is the answer; open questions: share of "
               "generated answers that match the reference exactly (after normalization); a test split of several "
               "sources: also the unweighted mean of their accuracies"),
    EvalMetric("macro_f1", "multiple choice", "F1 averaged, unweighted, over the classes that occur in the references "
                                              "or the predictions"),
    EvalMetric("roc_auc", "multiple choice with two options",
               "ROC-AUC of the second option's probability (softmax over the options' log-likelihoods); NaN when "
               "the references hold a single class"),
    EvalMetric("token_f1", "open questions", "mean token F1 of the generated answers against the references"),
    EvalMetric("closed_accuracy", "open questions, with yes/no references in the split",
               "exact-match accuracy over the questions whose reference is yes or no"),
    EvalMetric("open_accuracy", "open questions, with other references in the split",
               "exact-match accuracy over the other questions"),
    EvalMetric("open_token_f1", "open questions, with other references in the split",
               "token F1 over the other questions"),
)
EVAL_ABLATIONS = ("no_image", "no_text")  # eval.ablations: fedsim.evaluation.ABLATIONS
BACKDOOR_METRIC = "asr_<trigger>/accuracy"
EVAL_NAMING = f"""A test split of one source reports its metrics under their own names. A split that mixes sources
(the `modality_task` scenario) reports each source's as `<source>/<metric>`, and `accuracy`, the unweighted
mean of the sources' accuracies. Each ablation of `eval.ablations` ({', '.join(f'`{a}`' for a in EVAL_ABLATIONS)}:
the split with that modality removed from every row) adds every metric of the full split prefixed with
its name (`no_image/accuracy`, `no_image/<source>/<metric>`); with `eval.ablations_every`, only on the
evaluations it picks. A `backdoor` attack adds `{BACKDOOR_METRIC}`: the share of triggered test rows (those
whose label is not the target) classified as `attack.target_label`, the attack's success rate. Personalized
runs (`local_only`) report each metric's mean over the clients' own adapters."""

# ---------------------------------------------------------------------------------------------- metrics.jsonl
RECORD = (
    Field("round", "int", "the round (asynchronous: the global version this record closes)"),
    Field("clients", "list[int]",
          "synchronous: the clients that reported before the round closed, in the order their updates were taken "
          "(a client whose task then failed or whose update was rejected included); asynchronous: the clients whose "
          "updates were accepted since the previous record"),
    Field("train_loss", "float", "mean training loss of the updates accepted (NaN when none was)"),
    Field("lr", "float", "the round's client learning rate (`training.lr` under `training.lr_schedule`)",
          When.SYNC),
    Field("failed", "int", "clients dispatched this round that never reported: dropouts the scheduler drew and "
                           "tasks that failed", When.SYNC),
    Field("late", "int", "clients that reported after the round closed, or to a round that missed its quorum",
          When.SYNC),
    Field("bytes_up", "int", "bytes uploaded (after `compression`): synchronous, by the clients that reported this "
                             "round, late ones included; asynchronous, by the updates received since the previous "
                             "record"),
    Field("bytes_down", "int", "bytes downloaded (the global adapter): synchronous, by the clients dispatched this "
                               "round; asynchronous, by the dispatches since the previous record"),
    Field("wall_seconds", "float", "wall time of the round (asynchronous: since the previous record), its evaluation "
                                   "and checkpoint left out"),
    Field("simulated_seconds", "float", "the virtual clock (`scheduler`) when the round closed or the version "
                                        "was made"),
    Field("epsilon", "float", "privacy spent so far: epsilon at `privacy.delta` after the noised server steps up to "
                              "this record (one per global version)", When.PRIVACY),
    Field("eval", "map[str, float]", "the evaluation of the model after this round (personalized runs: "
                                      "the clients' own adapters)", When.EVAL_ROUND, keys=METRIC_NAMES),
)

# ---------------------------------------------------------------------------------------------- summary.json
WORKER = (
    Field("worker", "int", "the worker's index"),
    Field("tasks", "int", "client tasks it finished"),
    Field("restarts", "int", "times it was lost (its process or node died) or restarted for hanging; 0 on the "
                             "sequential engine"),
    Field("busy_seconds", "float", "time it spent in client tasks"),
    Field("busy_fraction", "float", "`busy_seconds` over the wall time of the rounds (synchronous: round starts to "
                                    "publishes, evaluations left out; asynchronous: the whole loop)", When.TRAINED),
    Field("failed_tasks", "int", "client tasks that raised on it", When.RAY),
    Field("hung", "int", "of its restarts, those for making no progress within the call timeout", When.RAY),
    Field("node_id", "str", "the Ray node it runs on (at the end of the run)", When.RAY),
    Field("node_ip", "str", "that node's IP address", When.RAY),
    Field("node_resources", "list[str]", "that node's custom resources named `fedsim_*` (`cluster/local.py` marks "
                                         "its nodes so)", When.RAY),
    Field("pid", "int", "its process id", When.RAY),
    Field("gpu_ids", "list[str]", "the GPUs Ray assigned it", When.RAY),
    Field("cuda_visible_devices", "str or null", "`CUDA_VISIBLE_DEVICES` inside the worker", When.RAY),
    Field("device", "str", "the torch device its model is on", When.RAY),
    Field("torch_threads", "int", "torch's CPU threads in the worker", When.RAY),
    Field("gpu_memory_fraction", "float or null", "the cap on its GPU memory (fractional `runtime.gpus_per_worker`); "
                                                 "null without one", When.RAY),
)
STUDY_AXES = (
    Field("privacy", "object or null", "differential privacy; null when `privacy.mode` is none", fields=(
        Field("mode", "str", "`privacy.mode`: central or local"),
        Field("epsilon", "float", "epsilon spent by the whole run, at `delta`"),
        Field("delta", "float", "`privacy.delta`"),
        Field("steps", "int", "noised server steps accounted (one per global version)"),
        Field("noise_multiplier", "float", "`privacy.noise_multiplier`"),
        Field("accountant", "str", "`privacy.accountant`: rdp or pld"),
        Field("sampling", "str", "the sampling the accountant assumed: `<privacy.sampling>, q = K/N` (central), or "
                                 "q = 1, a client taking part in every step (local)"),
        Field("clip_norm", "float", "the clip norm at the end (central with `privacy.adaptive_clip`: where it "
                                    "adapted to), else `privacy.clip_norm`"),
    )),
    Field("attack", "object or null", "the attack; null when `attack.kind` is none", fields=(
        Field("kind", "str", "`attack.kind`"),
        Field("fraction", "float", "`attack.fraction`"),
        Field("attackers", "list[int]", "the attacking clients' ids, drawn from the seed"),
    )),
    Field("compression", "object or null", "uplink compression; null when `compression.kind` is none", fields=(
        Field("kind", "str", "`compression.kind`"),
        Field("density", "float", "`compression.density`"),
        Field("error_feedback", "bool", "`compression.error_feedback`"),
        Field("bytes_per_update", "int", "bytes one encoded update takes on the uplink"),
    )),
)
SUMMARY = (
    Field("experiment", "str", "the config's `name`"),
    Field("engine", "str", "the engine that ran it: sequential or ray"),
    Field("mode", "str", "sync or async: whether the server strategy is asynchronous"),
    Field("algorithm", "object", "the algorithm", fields=(
        Field("server", "str", "`algorithm.server.name`"),
        Field("client", "str", "`algorithm.client.name`"),
    )),
    Field("num_clients", "int", "`partition.num_clients`"),
    Field("clients_per_round", "int", "clients per round (asynchronous: the default concurrency), from "
                                      "`federation.clients_per_round` or `federation.fraction`"),
    Field("rounds", "int", "rounds run (asynchronous: global versions); 0 for `zero_shot`"),
    Field("global_version", "int", "the global model's version at the end: server steps taken (a synchronous round "
                                   "without an accepted update takes none)"),
    Field("client_updates", "int", "client updates the server accepted"),
    Field("headline_metric", "str", "the metric the data's benchmark reports: roc_auc for Hateful-Memes, macro_f1 "
                                    "for CrisisMMD, accuracy otherwise"),
    Field("chance_metrics", "map[str, float]",
          "what guessing scores on the test rows evaluated, for the metrics that have a chance level (fedsim/"
          "chance.py): accuracy 1 / options, roc_auc 0.5; {} when none has (open questions)", keys=METRIC_NAMES),
    Field("final_metrics", "map[str, float]", "the last evaluation (the zero-shot one when no round ran)",
          keys=METRIC_NAMES),
    Field("personalized_clients_evaluated", "int or null",
          "personalized runs (`local_only`, `zero_shot`): how many clients' own adapters each evaluation scored "
          "(`eval.personalized_clients`, 0: all); null otherwise"),
    Field("zero_shot_metrics", "map[str, float]", "the evaluation before training (`eval.zero_shot`, and runs with "
                                                  "no round); {} without one", keys=METRIC_NAMES),
    Field("wall_seconds", "float", "wall time of the federation: rounds, evaluations, checkpoints and the adapter "
                                   "written (loading the model and data before it not counted)"),
    Field("train_seconds", "float", "wall time of the rounds, evaluations and checkpoints left out"),
    Field("updates_per_second", "float", "`client_updates` / `train_seconds` (0 when no time was spent)"),
    Field("simulated_seconds", "float", "the virtual clock at the end"),
    Field("bytes_up", "int", "bytes uploaded over the run (after `compression`)"),
    Field("bytes_down", "int", "bytes downloaded over the run"),
    Field("adapter_bytes", "int", "bytes of the trainable adapter tensors: what one download costs"),
    Field("dropped_updates", "int", "updates that never reached the server: late ones and dropouts "
                                    "(`dropped_by_reason` splits them)"),
    Field("dropped_by_reason", "object", "`dropped_updates` by reason", fields=(
        Field("late", "int", "reported after their round closed"),
        Field("no_quorum", "int", "reported in time to a round that closed at its deadline without its quorum "
                                  "(`scheduler.deadline_s`, `scheduler.quorum`)"),
        Field("dropout", "int", "dispatched, never reported: the scheduler's dropouts and client tasks that failed"),
    )),
    Field("failed_updates", "map[str, int]", "client tasks that failed (after their retry), by reason",
          keys="`exception:<type>` (what the task raised) or `worker_lost` (its worker died too often)"),
    Field("rejected_updates", "int", "updates the server rejected"),
    Field("rejected_by_reason", "map[str, int]", "`rejected_updates` by reason",
          keys="`non_finite` or `norm` (the update guard, `runtime.max_update_norm`), `overflow`, `mismatch`, "
               "`invalid_weight`, `ahead_of_server`, `missing_base`, or an unexpected error's type name"),
    Field("stale_updates", "int", "asynchronous updates dropped as too stale (`algorithm.server.max_staleness`)"),
    Field("staleness", "object", "how many versions behind the server asynchronous updates were", fields=(
        Field("histogram", "map[str, int]", "updates offered (accepted or stale) per staleness; {} in synchronous "
                                             "runs", keys="staleness, in versions"),
        Field("mean", "float", "their mean staleness (0.0 without any)"),
    )),
    Field("adapter_sha256", "str", "SHA-256 of the final adapter's tensors in name order (personalized runs: of "
                                   "every client's own adapter), for determinism checks"),
    Field("workers", "list[object]", "one entry per worker (the sequential engine: one)", fields=WORKER),
    Field("batching", "object", "clients trained together in one batch", fields=(
        Field("clients_per_batch", "int", "`runtime.clients_per_batch`, `auto` resolved"),
        Field("extra_client_bytes", "object", "what each client beyond the first adds to a batch, measured; {} when "
                                              "clients train one at a time", fields=(
            Field("activations", "int", "bytes of the activations saved for backward", When.BATCHED),
            Field("adapter_and_optimizer", "int", "bytes of its adapter, gradients and optimizer state",
                  When.BATCHED),
        )),
    )),
    Field("busy_fraction", "float", "mean of the workers' `busy_fraction`", When.TRAINED),
    Field("worker_restarts", "int", "worker losses over the run (each counted once)", When.RAY),
    Field("server_restarts", "int", "aggregator actors lost and recreated from the last checkpoint", When.RAY),
    Field("tasks_rerun", "object", "client tasks run again because their worker was lost", When.RAY, fields=(
        Field("unfinished", "int", "lost before they finished"),
        Field("finished", "int", "lost after they finished, their results with them"),
    )),
    Field("held_at_once", "object", "the most the driver's node held at once", When.RAY, fields=(
        Field("results", "int", "finished results waiting for the loop"),
        Field("states", "int", "client states fetched for tasks"),
        Field("bound", "int", "the bound on waiting results (a multiple of what the workers hold at once)"),
    )),
    *STUDY_AXES,
    Field("resumed_after_round", "int or null", "the checkpoint's round this run continued from "
                                               "(`fedsim run --resume`); null for a run from the start"),
    Field("versions", "object", "installed versions of the libraries a run's numbers depend on (null: not "
                                "installed)", fields=tuple(Field(name, "str or null", f"`{name}`")
                                                           for name in RECORDED_LIBRARIES)),
    Field("run_dir", "str", "the run directory"),
)

# ---------------------------------------------------------------------------------------------- checkpoint/
STATE = (
    Field("format", "int", "the checkpoint format (fedsim.checkpoint.FORMAT): another one is refused on resume"),
    Field("round", "int", "the round (asynchronous: global version) it was taken after"),
    Field("tally", "object", "the loop's counters, from which summary.json's totals continue", fields=(
        Field("updates", "int", "updates accepted"),
        Field("bytes_up", "int", "bytes uploaded"),
        Field("bytes_down", "int", "bytes downloaded"),
        Field("failed", "int", "clients that dropped out (dispatched, never reported)"),
        Field("failed_by_reason", "map[str, int]", "client tasks that failed, by reason",
              keys="as in summary.json's `failed_updates`"),
        Field("late", "int", "updates reported after their round closed"),
        Field("no_quorum", "int", "of those, reported in time to a round that missed its quorum"),
        Field("simulated_s", "float", "the virtual clock"),
        Field("train_seconds", "float", "wall time of the rounds so far"),
    )),
    Field("metrics", "map[str, float]", "the last evaluation ({} before any)", keys=METRIC_NAMES),
    Field("zero_shot", "map[str, float] or null", "the zero-shot evaluation; null without one", keys=METRIC_NAMES),
    Field("current_version", "int", "the global version"),
    Field("aggregator", "object", "the aggregator's counts", fields=(
        Field("outcomes", "map[str, int]", "updates by outcome", keys="accepted, rejected, stale"),
        Field("rejected", "map[str, int]", "rejections by reason", keys="as in summary.json's `rejected_by_reason`"),
        Field("clip", "map[str, float]", "adaptive clipping's state ({} without it)",
              keys="the state's own (fedsim.privacy.AdaptiveClip)"),
    )),
    Field("accountant", "map[str, any] or null", "the privacy accountant's state; null without privacy",
          keys="the accountant's own (fedsim.privacy.PrivacyAccountant)"),
    Field("planner", "map[str, any]", "the asynchronous scheduler's state: its clock, counters and dispatches in "
                                      "flight", When.ASYNC, keys="the planner's own (fedsim.scheduler.AsyncPlanner)"),
    Field("in_flight", "map[str, object]", "the client tasks in flight, to be submitted again on resume",
          When.ASYNC, keys="dispatch number", fields=(
              Field("client_id", "int", "the client"),
              Field("seed_round", "int", "the coordinate its randomness derives from (its dispatch number)"),
              Field("base_version", "int", "the global version it trains from (in published.safetensors)"),
              Field("lr", "float", "its learning rate"),
          )),
)
SEAL = (
    Field("round", "int", "the checkpoint's round, as in state.json"),
    Field("files", "map[str, object]", "each other file of the checkpoint", keys="file name", fields=(
        Field("size", "int", "its size in bytes"),
        Field("sha256", "str", "its SHA-256, checked on resume"),
    )),
)

# ---------------------------------------------------------------------------------------------- trackers.json
TRACKER_STATE = (
    Field("tensorboard", "object", "{}: TensorBoard needs nothing to continue (its folder follows from the config)",
          When.TENSORBOARD),
    Field("mlflow", "object", "the MLflow run", When.MLFLOW, fields=(
        Field("tracking_uri", "str", "the tracking store: `MLFLOW_TRACKING_URI`, else the `mlruns/` file store"),
        Field("run_id", "str", "the MLflow run's id"),
    )),
    Field("wandb", "object", "the W&B run", When.WANDB, fields=(
        Field("id", "str", "the W&B run's id"),
    )),
)

# ---------------------------------------------------------------------------------------------- the directory
FILES = (
    RunFile("config.yaml", "the resolved config: files, overrides and defaults; `fedsim run --resume` reads it"),
    RunFile("metrics.jsonl", "a JSON object per round (asynchronous: per global version), appended and fsynced "
                             "line by line: [fields](#metricsjsonl)"),
    RunFile("summary.json", "written once the run ends: [fields](#summaryjson)"),
    RunFile(LOCK_FILE, "held (flock) by the process writing the run directory, for its whole life; it holds that "
                       "process's pid, host and start time, named when another process is refused; a stale one "
                       "(its holder dead) never blocks", When.LOCKED),
    RunFile("adapter/", "the final global adapter in peft format: `PeftModel.from_pretrained(base, "
                        "\"RUN_DIR/adapter\")` loads it", When.ADAPTER),
    RunFile("adapter/adapter_config.json", "peft's adapter config", When.ADAPTER),
    RunFile("adapter/adapter_model.safetensors", "the adapter's weights", When.ADAPTER),
    RunFile("adapter/README.md", "the model card peft writes beside them", When.ADAPTER),
    RunFile("checkpoint/", "the last checkpoint, from which `fedsim run --resume RUN_DIR` continues: "
                           "[layout](#checkpoint)", When.CHECKPOINT),
    RunFile("checkpoint/server.safetensors", "the server strategy's state: global adapter, optimizer slots, "
                                             "version, FedBuff's buffer", When.CHECKPOINT),
    RunFile("checkpoint/clients.safetensors", "which client states it holds: `client` and `generation`, int64 "
                                              "vectors naming files of `client_states/`", When.CHECKPOINT),
    RunFile("checkpoint/published.safetensors", "the global versions asynchronous tasks in flight train from, as "
                                                "`<version>/weights/<name>` and `<version>/extras/<name>` "
                                                "(empty for synchronous runs)", When.CHECKPOINT),
    RunFile("checkpoint/state.json", "everything else needed to continue: [fields](#checkpointstatejson)",
            When.CHECKPOINT),
    RunFile("checkpoint/COMPLETE", "written last, once the others are fsynced: [fields](#checkpointcomplete); a "
                                   "checkpoint without it is incomplete", When.CHECKPOINT),
    RunFile("client_states/", "the clients' stored states: [layout](#client_states)", When.CLIENT_STATES),
    RunFile("client_states/<thousands>/", "a folder per thousand clients: `0000` for clients 0 to 999, `0001` for "
                                          "1000 to 1999, ...", When.CLIENT_STATES),
    RunFile("client_states/<thousands>/<client>.<generation>.safetensors",
            "one client's state, immutable: storing a new one writes the next generation", When.CLIENT_STATES),
    RunFile("trackers.json", "what each tracker of `output.trackers` needs to continue its run on `fedsim run "
                             "--resume`: [fields](#trackersjson)", When.TRACKERS),
    RunFile("tensorboard/", "TensorBoard's logs (`tensorboard --logdir RUN_DIR/tensorboard`)", When.TENSORBOARD_HERE),
    RunFile("tensorboard/<run directory's name>/", "the run's event files: a scalar per metrics.jsonl number per "
                                                   "round, the config as hyperparameters, summary.json's numbers "
                                                   "(`summary/...`) and text", When.TENSORBOARD_HERE, opaque=True),
    RunFile("mlruns/", "MLflow's file store, unless `MLFLOW_TRACKING_URI` names another: the run's params, metrics "
                       "and artifacts (summary.json, adapter/)", When.MLFLOW_HERE, opaque=True),
    RunFile(".mlflow-experiment.lock", "held while a run finds or creates its MLflow experiment, so that runs "
                                       "sharing a store create it once", When.MLFLOW_HERE),
    RunFile("wandb/", "the W&B run, offline unless `WANDB_MODE` says otherwise (`wandb sync` uploads it)",
            When.WANDB, opaque=True),
)

# ---------------------------------------------------------------------------------------------- the page
HEADER = """# Output reference

<!-- Generated by `python -m fedsim.reference --write` from fedsim/run_files.py: do not edit by hand;
tests/test_outputs_reference.py fails when this page differs from what the code generates, or when a run writes
a file or field that it does not describe, or leaves out one that it says is written. -->

What a run writes to its run directory (`output.dir`, default `runs/<experiment>-<timestamp>`). Every file
but `metrics.jsonl` is written to a temporary name, fsynced and renamed into place, and folders (`adapter/`,
`checkpoint/`) are staged beside their place and renamed in, so a crash or power loss leaves each one whole:
the old version or the new. `metrics.jsonl` is appended a flushed, fsynced line at a time, so a crash leaves
every finished round readable (`fedsim.output.read_metrics` skips a last line cut short). Reading the files
while a run writes them is safe. The configuration keys named here are described in the
[configuration reference](configuration.md).
"""
LAYOUT_NOTE = """After a crash, names starting with a dot may be left beside these: a temporary file
(`.<name>-<random>`) that never replaced its target, or a checkpoint being written (`.checkpoint~<random>`)
or set aside (`.checkpoint~<random>.old`). `fedsim run --resume` takes the newest complete checkpoint among
them, and the next checkpoint written deletes the others. `fedsim report RUN_DIR` writes its figures and
`index.html` to `RUN_DIR/report/` unless told `--out`; a sweep directory holds one run directory per point
([sweeps](sweeps.md))."""
CHECKPOINT_NOTE = """Written every `checkpoint.every` rounds (asynchronous: global versions) and after the last,
into a staging folder that replaces the previous checkpoint durably: the previous one is renamed aside, the
new one renamed in, and the old one deleted only then, with the client-state files only it referred to. A
crash at any moment leaves a complete checkpoint. Tensors are in safetensors and the rest in JSON, never
pickle. `fedsim run --resume RUN_DIR` continues from the newest complete one to the same `adapter_sha256`."""
CLIENT_STATES_NOTE = """Stateful algorithms (SCAFFOLD's control variates, `local_only`'s own adapters, error
feedback's residuals) keep one safetensors file per client state, as large as the adapter, in folders of at
most a thousand clients. A file is never changed: a client's new state is the next generation, renamed into
place, and the previous one is deleted at once unless a checkpoint still refers to it. A resumed run keeps
exactly its checkpoint's states and deletes the others. On Ray, the aggregator actor (on the driver's node)
keeps them: workers never touch this folder."""
CODE_SPAN = re.compile(r"(`[^`]*`)")


def outputs_reference() -> str:
    """docs/outputs.md."""
    record_rows = [[f"`{row.path}`", f"`{row.field.type}`", _record_cell(row.field, When.SYNC),
                    _record_cell(row.field, When.ASYNC), _meaning(row.field)] for row in flatten(RECORD)]
    sections = [
        HEADER.rstrip("\n"),
        "## Files and folders",
        _table(["path", "written", "content"], [[f"`{f.path}`", _file_written(f),
                                                  f.meaning + ("; its layout is the library's own" if f.opaque else "")]
                                                 for f in FILES]),
        LAYOUT_NOTE,
        "## metrics.jsonl",
        "One JSON object a line, a line per round (asynchronous runs: per global version), keys sorted; NaN is "
        "written as `NaN`, as Python's json module writes it. A resumed run first drops the lines of the rounds "
        "after its checkpoint: they run again.",
        _table(["field", "type", "synchronous records", "asynchronous records", "meaning"], record_rows),
        "## Evaluation metrics",
        "The keys of `eval` in metrics.jsonl, and of `final_metrics`, `zero_shot_metrics` and `chance_metrics` in "
        "summary.json, depend on the test split's task:",
        _table(["metric", "reported for", "meaning"], [[f"`{m.name}`", m.tasks, m.meaning] for m in EVAL_METRICS]),
        EVAL_NAMING,
        "## summary.json",
        "Written once, when the run ends; `fedsim run` prints part of it.",
        _fields_table(SUMMARY),
        "## checkpoint/",
        CHECKPOINT_NOTE,
        "### checkpoint/state.json",
        _fields_table(STATE),
        "### checkpoint/COMPLETE",
        _fields_table(SEAL),
        "## client_states/",
        CLIENT_STATES_NOTE,
        "## trackers.json",
        "Written as the run starts, when `output.trackers` names a tracker ([trackers](trackers.md)): for each one, "
        "what a resumed run needs to continue the same tracker run.",
        _fields_table(TRACKER_STATE),
    ]
    return "\n\n".join(sections) + "\n"


def _fields_table(fields: tuple[Field, ...]) -> str:
    return _table(["field", "type", "written", "meaning"],
                  [[f"`{row.path}`", f"`{row.field.type}`", _written(row), _meaning(row.field)]
                   for row in flatten(fields)])


def _written(row: Row) -> str:
    """When a field is written: its own condition, else that of the field it is nested in."""
    if row.field.when is not When.ALWAYS or row.parent is None:
        return row.field.when.value
    if row.parent.field.type.endswith(" or null"):
        return f"when `{row.parent.path}` is not null"
    return _written(row.parent)


def _file_written(entry: RunFile) -> str:
    folder = entry.path.rstrip("/").rpartition("/")[0] + "/"
    if any(f.path == folder and f.when is entry.when for f in FILES):
        return f"with `{folder}`"
    return entry.when.value


def _meaning(item: Field) -> str:
    keys = "keys: " + ("[evaluation metric names](#evaluation-metrics)" if item.keys == METRIC_NAMES else item.keys)
    return f"{item.meaning}; {keys}" if item.keys else item.meaning


def _record_cell(item: Field, mode: When) -> str:
    """Where a metrics.jsonl field is written in ``mode``'s records (SYNC or ASYNC)."""
    if item.when in (When.SYNC, When.ASYNC) and item.when is not mode:
        return "no"
    return "every record" if item.when in (When.ALWAYS, mode) else item.when.value


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A table cell: outside code spans, ``<`` (which would open an HTML tag) and ``|`` escaped."""
    parts = CODE_SPAN.split(text)  # code spans at the odd indices
    return "".join(part if index % 2 else part.replace("<", "&lt;").replace("|", r"\|")
                   for index, part in enumerate(parts))
