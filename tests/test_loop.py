"""run_federation's summary, on stand-in executor and aggregator (no model, no data, no Ray; a second)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedsim.algorithms import build_server_strategy
from fedsim.config import ExperimentConfig, ServerAlgoConfig
from fedsim.engine import sequential
from fedsim.engine.loop import run_federation


class StandInExecutor:
    def publish(self, version: int, handle: Any) -> None:
        pass

    def evaluate(self, handle: Any) -> dict[str, float]:
        return {"accuracy": 0.5, "roc_auc": 0.6, "macro_f1": 0.4}

    def personalized_digest(self, num_clients: int) -> str:
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
