"""run_federation on stand-in executor and aggregator (no model, no data, no Ray; a second): the summary,
the order tasks are handed out, failed client tasks, and what asynchronous mode asks the aggregator."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.algorithms import build_server_strategy
from fedsim.config import ExperimentConfig, ServerAlgoConfig
from fedsim.engine import sequential
from fedsim.engine.loop import ClientTaskFailed, personalized_sample, run_federation
from fedsim.messages import ClientTask


class StandInExecutor:
    def publish(self, version: int, handle: Any) -> None:
        pass

    def evaluate(self, handle: Any, ablations: bool = True) -> dict[str, float]:
        return {"accuracy": 0.5, "roc_auc": 0.6, "macro_f1": 0.4}

    def open_client_states(self, directory: Path, checkpointed: Any) -> None:
        pass

    def personalized_digest(self) -> str:
        return "0" * 64

    def stats(self) -> dict[str, Any]:
        return {}


class StandInAggregator:
    def snapshot(self) -> tuple[int, Any]:
        return 0, "initial"

    def stats(self) -> dict[str, Any]:
        return {"rejected_updates": 0, "rejected_by_reason": {}, "stale_updates": 0, "staleness_histogram": {},
                "mean_staleness": 0.0, "adapter_sha256": "0" * 64}


def _zero_shot_config() -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.federation.rounds = 0
    cfg.algorithm.server.name = "zero_shot"
    cfg.output.progress = "never"
    return cfg


def test_summary_names_the_headline_metric(tmp_path: Path) -> None:
    summary = run_federation(_zero_shot_config(), tmp_path / "run", "sequential", StandInExecutor(),
                             StandInAggregator(), [10] * 20, 100, personalized=False, asynchronous=False,
                             trains=False, headline_metric="roc_auc")
    assert summary["headline_metric"] == "roc_auc"
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["headline_metric"] == "roc_auc" and written["final_metrics"]["roc_auc"] == 0.6


def test_the_sequential_engine_passes_its_datas_metric(tmp_path: Path, monkeypatch) -> None:
    cfg = _zero_shot_config()
    strategy = build_server_strategy(ServerAlgoConfig(name="zero_shot"), cfg.partition.num_clients)
    parts = sequential.SequentialParts(StandInExecutor(), StandInAggregator(), strategy, [10] * 20, 100,
                                       headline_metric="macro_f1")
    monkeypatch.setattr(sequential, "build_sequential", lambda cfg: parts)
    assert sequential.run_sequential(cfg, tmp_path / "run")["headline_metric"] == "macro_f1"


class ScriptedExecutor(StandInExecutor):
    """No model: a task's update is its client id; clients in ``failing`` raise as a failed task does."""

    def __init__(self, failing: set[int] = frozenset()):
        self.failing = set(failing)
        self.submitted: list[ClientTask] = []
        self.settled: list[tuple[int, bool]] = []
        self.raised = 0

    def submit(self, task: ClientTask) -> None:
        self.submitted.append(task)

    def result(self, task: ClientTask) -> tuple[Any, dict[str, float]]:
        if task.client_id in self.failing:
            self.raised += 1
            raise ClientTaskFailed(task, "exception:ValueError")
        return task.client_id, {"train_loss": 1.0, "samples_processed": 8, "compute_seconds": 0.01}

    def settle(self, task: ClientTask, accepted: bool) -> None:
        self.settled.append((task.client_id, accepted))

    def discard(self, task: ClientTask) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"workers": [{"worker": 0, "busy_seconds": 0.0}]}


class CountingAggregator(StandInAggregator):
    """Applies updates by count: a new version per round (sync) or per ``buffer`` updates (async)."""

    def __init__(self, buffer: int = 0):
        self.version, self.buffer, self.pending = 0, buffer, 0
        self.applied: list[int] = []
        self.snapshots = 0

    def submit(self, update: Any, base: Any = None) -> str:
        self.applied.append(update)
        self.pending += 1
        if self.buffer and self.pending == self.buffer:
            self.version, self.pending = self.version + 1, 0
        return "accepted"

    def close_round(self) -> int:
        self.version += 1
        return self.version

    def snapshot(self) -> tuple[int, Any]:
        self.snapshots += 1
        return self.version, f"v{self.version}"


def _config(**overrides: Any) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.partition.num_clients, cfg.federation.clients_per_round, cfg.federation.rounds = 8, 4, 3
    cfg.checkpoint.every, cfg.output.save_adapter, cfg.output.progress = 0, False, "never"
    cfg.eval.zero_shot = False
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


SIZES = [5, 50, 20, 80, 10, 40, 30, 60]


def test_a_round_hands_out_its_largest_tasks_first_and_a_failed_task_is_a_dropout(tmp_path: Path) -> None:
    executor, aggregator = ScriptedExecutor(failing={3}), CountingAggregator()
    summary = run_federation(_config(), tmp_path / "run", "ray", executor, aggregator, SIZES, 100,
                             personalized=False, asynchronous=False, trains=True, headline_metric="accuracy")
    rounds: dict[int, list[int]] = {}
    for task in executor.submitted:
        rounds.setdefault(task.seed_round, []).append(task.client_id)
    for clients in rounds.values():
        assert [SIZES[c] for c in clients] == sorted((SIZES[c] for c in clients), reverse=True)
    failed = sum(clients.count(3) for clients in rounds.values())
    assert failed >= 1, "client 3 was never selected: choose another failing client"
    assert summary["failed_updates"] == {"exception:ValueError": failed}
    assert summary["dropped_by_reason"]["dropout"] == failed and summary["rounds"] == 3
    assert 3 not in aggregator.applied and len(aggregator.applied) == summary["client_updates"] == 12 - failed
    assert all(accepted for _, accepted in executor.settled) and len(executor.settled) == 12 - failed
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["failed"] for r in records) == failed


def test_async_mode_learns_new_versions_without_a_snapshot_per_update(tmp_path: Path) -> None:
    cfg = _config(algorithm__server=ServerAlgoConfig(name="fedbuff", buffer_size=2), federation__rounds=5)
    executor, aggregator = ScriptedExecutor(failing={0}), CountingAggregator(buffer=2)
    summary = run_federation(cfg, tmp_path / "run", "ray", executor, aggregator, SIZES, 100, personalized=False,
                             asynchronous=True, trains=True, headline_metric="accuracy")
    assert summary["global_version"] == 5 and len(aggregator.applied) == 10
    # the initial version, each of the 5 new ones (published to the workers), and the summary's
    assert aggregator.snapshots == 1 + 5 + 1
    assert executor.raised >= 1 and summary["failed_updates"] == {"exception:ValueError": executor.raised}


class PersonalizedExecutor(ScriptedExecutor):
    """Records which clients each personalized evaluation scores."""

    def __init__(self) -> None:
        super().__init__()
        self.evaluated: list[list[int]] = []

    def evaluate_personalized(self, clients: np.ndarray, fallback: Any) -> dict[str, float]:
        self.evaluated.append(clients.tolist())
        return {"accuracy": 0.5}


def _evaluated(cfg: ExperimentConfig, run_dir: Path) -> tuple[list[list[int]], dict[str, Any]]:
    executor = PersonalizedExecutor()
    summary = run_federation(cfg, run_dir, "sequential", executor, CountingAggregator(), SIZES, 100,
                             personalized=True, asynchronous=False, trains=True, headline_metric="accuracy")
    return executor.evaluated, summary


def test_personalized_evaluation_scores_a_seeded_sample_of_clients_each_round(tmp_path: Path) -> None:
    cfg = _config(eval__personalized_clients=3, federation__rounds=4)
    evaluated, summary = _evaluated(cfg, tmp_path / "a")
    assert summary["personalized_clients_evaluated"] == 3
    assert evaluated == [personalized_sample(cfg, r).tolist() for r in (1, 2, 3, 4)]
    assert all(c == sorted(set(c)) and len(c) == 3 and set(c) <= set(range(8)) for c in evaluated)
    assert len({tuple(c) for c in evaluated}) > 1  # drawn afresh each round
    assert _evaluated(cfg, tmp_path / "b")[0] == evaluated  # from the seed: the same in every run
    cfg.seed = 1
    assert _evaluated(cfg, tmp_path / "c")[0] != evaluated
    everyone = _config(federation__rounds=2)  # 0, the default: every client
    evaluated, summary = _evaluated(everyone, tmp_path / "d")
    assert evaluated == [list(range(8))] * 2 and summary["personalized_clients_evaluated"] == 8


def test_the_personalized_sample_costs_the_sample_not_the_population() -> None:
    cfg = _config(eval__personalized_clients=1000)
    cfg.partition.num_clients = 10**12  # Generator.choice(replace=False) would build [0, 10**12) here
    started = time.perf_counter()
    sample = personalized_sample(cfg, 7)
    assert time.perf_counter() - started < 1.0
    assert len(np.unique(sample)) == 1000 and 0 <= sample.min() and sample.max() < 10**12
    assert np.array_equal(personalized_sample(cfg, 7), sample)
    cfg.partition.num_clients, cfg.eval.personalized_clients = 4, 2  # uniform over the 6 pairs of 4 clients
    pairs = [tuple(personalized_sample(cfg, step)) for step in range(3000)]
    counts = [pairs.count(pair) for pair in sorted(set(pairs))]
    assert len(counts) == 6 and all(abs(count / 3000 - 1 / 6) < 0.03 for count in counts)


# -- the suite's own promise: `-m "not slow"` skips every end-to-end run ------------------------------------------

TESTS = Path(__file__).parent
ENGINE_NAMES = {"run_sequential", "run_ray", "ENGINES", "FederationLoop"}  # run_federation: this file's stand-ins
# Unmarked tests that reach an engine entry point without a model: (file, test) -> why that is cheap.
FAST_ENGINE_CALLS = {
    ("test_loop.py", "test_the_sequential_engine_passes_its_datas_metric"): "build_sequential replaced by stand-ins",
}


def _is_slow(decorators: list[ast.expr]) -> bool:
    return any("slow" in ast.unparse(d) for d in decorators)


def _engine_uses(node: ast.AST) -> list[ast.AST]:
    """Nodes in ``node`` that start a run: an engine entry point named (called or passed on), ``main(["run" |
    "sweep", ...])``, or a ``fedsim.cli`` child process."""
    uses = []
    for sub in ast.walk(node):
        name = sub.id if isinstance(sub, ast.Name) else sub.attr if isinstance(sub, ast.Attribute) else None
        if name in ENGINE_NAMES:
            uses.append(sub)
        elif (isinstance(sub, ast.Call) and ast.unparse(sub.func) == "main" and sub.args
              and isinstance(sub.args[0], ast.List) and sub.args[0].elts
              and ast.unparse(sub.args[0].elts[0]) in ("'run'", "'sweep'")):
            uses.append(sub)
        elif (isinstance(sub, ast.Call) and "subprocess." in ast.unparse(sub.func)
              and any(isinstance(c, ast.Constant) and c.value == "fedsim.cli" for c in ast.walk(sub))):
            uses.append(sub)
    return uses


def _refused(use: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether a use expects the run to be refused before any work: inside ``pytest.raises``, or an exit code
    compared with 2."""
    node = use
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Compare) and parent.left is node and ast.unparse(parent.comparators[0]) == "2":
            return True
        if isinstance(parent, ast.With) and node in parent.body and "pytest.raises" in ast.unparse(parent.items[0]):
            return True
        node = parent
    return False


def unmarked_engine_runs(path: Path) -> list[str]:
    """Tests of one file, not marked slow, that start an engine run, directly or through the file's helpers."""
    tree = ast.parse(path.read_text())
    if any(isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "pytestmark" and "slow" in ast.unparse(n.value)
           for n in tree.body):
        return []
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    starts = {name: any(not _refused(u, parents) for u in _engine_uses(f)) for name, f in functions.items()}
    changed = True
    while changed:  # a helper that calls a helper that starts a run starts one too
        changed = False
        for name, f in functions.items():
            calls = {ast.unparse(c.func) for c in ast.walk(f) if isinstance(c, ast.Call)}
            if not starts[name] and any(starts.get(c) for c in calls):
                starts[name] = changed = True
    return [name for name, f in functions.items() if name.startswith("test_") and starts[name]
            and not _is_slow(f.decorator_list) and (path.name, name) not in FAST_ENGINE_CALLS]


def test_every_test_that_starts_an_engine_run_is_marked_slow() -> None:
    unmarked = {path.name: names for path in sorted(TESTS.glob("test_*.py")) if (names := unmarked_engine_runs(path))}
    assert not unmarked, f"mark these @pytest.mark.slow (README: -m 'not slow' skips the end-to-end runs): {unmarked}"
    for file, test in FAST_ENGINE_CALLS:
        assert test in (TESTS / file).read_text(), f"stale entry in FAST_ENGINE_CALLS: {file}::{test}"


def test_the_engine_run_check_sees_direct_helper_and_child_process_runs(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "def go(cfg):\n    return run_sequential(cfg, 'run')\n\n"
        "def test_direct():\n    run_ray(cfg, 'run')\n\n"
        "def test_through_helper():\n    go(cfg)\n\n"
        "def test_child():\n    subprocess.run([sys.executable, '-m', 'fedsim.cli', 'run', 'x.yaml'])\n\n"
        "def test_cli():\n    assert main(['sweep', 'x.yaml']) == 0\n\n"
        "def test_refused():\n    assert main(['run', 'x.yaml', 'bad=1']) == 2\n"
        "    with pytest.raises(RuntimeError):\n        run_ray(cfg, 'run')\n\n"
        "@pytest.mark.slow\ndef test_marked():\n    go(cfg)\n")
    assert unmarked_engine_runs(tmp_path / "test_x.py") == ["test_direct", "test_through_helper", "test_child",
                                                             "test_cli"]
