"""The output reference (docs/outputs.md, from fedsim/run_files.py) matches what runs write.

Three real sequential runs on tiny data (synchronous through ``fedsim run``, asynchronous FedBuff with the three
experiment trackers, and one with the study axes on) are checked file by file and field by field
(tests/outputs_check.py); together they must show every file and field the reference describes, but the Ray
engine's, which tests/test_ray_runtime.py checks on the Ray runs it makes anyway.
"""

from __future__ import annotations

import json

import pytest

from fedsim import evaluation, reference
from fedsim.evaluation import BatchScores, combine
from fedsim.run_files import (EVAL_ABLATIONS, EVAL_METRICS, FILES, RECORD, SEAL, STATE, SUMMARY, TRACKER_STATE,
                              When, flatten, outputs_reference)

from conftest import REPO, one_model_for_every_run, small_config
from outputs_check import HOLDS, METRIC_KEY, check_run_dir, field_problems, finished_run, run_problems

PAGE_TEXT = outputs_reference()
# Round 1 is not evaluated, round 2 is; each client takes one step.
TINY = ("data.num_train=40", "data.num_test=8", "partition.num_clients=2", "federation.clients_per_round=2",
        "federation.rounds=2", "eval.every=2", "training.local_epochs=1", "training.local_steps=1",
        "runtime.engine=sequential", "runtime.num_threads=1")
# The synchronous run goes through `fedsim run`, which holds the run directory's lock; it alone is evaluated
# zero-shot. These two run in process:
RUNS = {
    # the three trackers: their files in the run directory (W&B alone takes some 4 s to start: one run has them)
    "async": ("algorithm.server.name=fedbuff", "algorithm.server.buffer_size=2", "eval.zero_shot=false",
              "output.trackers=[tensorboard,mlflow,wandb]"),
    # Central DP with adaptive clipping under FedAvg, random-k with error feedback (client_states/), a backdoor
    # (asr_image/accuracy), an ablation (no_image/...), two clients trained per batch (batching.extra_client_bytes).
    "axes": ("privacy.mode=central", "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.05",
             "privacy.adaptive_clip=true", "privacy.count_noise_std=1",
             "compression.kind=randk", "compression.density=0.2", "attack.kind=backdoor", "attack.fraction=0.5",
             "eval.ablations=[no_image]", "runtime.clients_per_batch=2", "eval.zero_shot=false"),
}
DOCUMENTS = {"summary.json": SUMMARY, "metrics.jsonl": RECORD, "state.json": STATE, "COMPLETE": SEAL,
             "trackers.json": TRACKER_STATE}


def test_committed_page_is_current():
    committed = (REPO / "docs" / "outputs.md").read_text()
    assert committed == PAGE_TEXT, "docs/outputs.md differs from the code: run python -m fedsim.reference --write"


def test_the_check_decides_every_condition():
    assert set(HOLDS) == set(When), "tests/outputs_check.py's HOLDS must say when each run_files.When holds"


def test_metric_names_are_those_the_evaluation_reports():
    """Every key the evaluation's pooling makes, for each kind of test split, follows the reference's naming, and
    every metric the reference lists is made by one of them."""
    assert EVAL_ABLATIONS == tuple(evaluation.ABLATIONS)
    binary = BatchScores("", "memes", True, 2, preds=[0, 1, 1], refs=[0, 1, 0], positive=[0.2, 0.9, 0.6])
    four = BatchScores("", "science", True, 4, preds=[0, 3], refs=[0, 2], positive=[float("nan")] * 2)
    vqa = BatchScores("", "vqa", False, matches=[True, False, True], f1s=[1.0, 0.5, 1.0], closed=[True, False, False])
    splits = [[binary], [vqa], [binary, four, vqa],  # one source each; then several: <source>/<metric>
              [four, BatchScores("no_image", "science", True, 4, preds=[1], refs=[1]),
               BatchScores("asr_image", "science", True, 4, preds=[2], refs=[2])]]
    keys = {key for batches in splits for key in combine(batches)}
    assert {"memes/roc_auc", "no_image/accuracy", "asr_image/accuracy", "vqa/open_token_f1"} <= keys
    assert [key for key in keys if not METRIC_KEY.fullmatch(key)] == []
    assert {key.rsplit("/", 1)[-1] for key in keys} == {metric.name for metric in EVAL_METRICS}


@pytest.mark.slow
def test_runs_write_what_the_reference_describes(tmp_path, monkeypatch):
    from fedsim import cli
    from fedsim.engine.sequential import run_sequential

    for variable in ("MLFLOW_TRACKING_URI", "WANDB_MODE"):  # the trackers write offline, into the run directory
        monkeypatch.delenv(variable, raising=False)
    configs = {name: small_config(tmp_path / name, *TINY, *overrides) for name, overrides in RUNS.items()}
    one_model_for_every_run(monkeypatch, configs["async"])
    assert cli.main(["run", str(REPO / "experiments" / "quickstart.yaml"), "output.progress=never",
                     f"output.dir={tmp_path / 'sync' / 'run'}", *TINY]) == 0
    for name, cfg in configs.items():
        run_sequential(cfg, tmp_path / name / "run")

    seen = check_run_dir(tmp_path / "sync" / "run", locked=True)
    for name in RUNS:
        seen |= check_run_dir(tmp_path / name / "run")
    described = {f"files:{entry.path}" for entry in FILES} | {
        f"{document}:{row.path}" for document, fields in DOCUMENTS.items() for row in flatten(fields)
        if When.RAY not in row.conditions}
    assert sorted(described - seen) == [], "described, but written by none of these runs: give it a run here"

    # The checks fail on a field that is new, missing, of another type or written where the reference says it
    # is not, and on a file that is new or missing.
    summary = json.loads((tmp_path / "sync" / "run" / "summary.json").read_text())
    del summary["rounds"]
    summary.update(new_field=1, adapter_bytes="many", worker_restarts=0)
    problems = field_problems(summary, SUMMARY, lambda when: when in (When.ALWAYS, When.SYNC, When.TRAINED),
                              "summary.json", set())
    expected = ["new_field is written, and the reference does not describe it", "rounds is not written",
                'adapter_bytes is "many", not of', "worker_restarts is written, and the reference says only for"]
    assert len(problems) == len(expected) and all(e in p for e, p in zip(expected, problems)), problems
    run = tmp_path / "async" / "run"
    (run / "stray.txt").write_text("")
    (run / "checkpoint" / "COMPLETE").unlink()
    problems = run_problems(finished_run(run), set())
    assert problems[0].startswith("stray.txt is written") and problems[1].startswith("checkpoint/COMPLETE is not")
    assert len(problems) == 2, problems
