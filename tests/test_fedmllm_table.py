"""experiments/fedmllm_table.py without training: the cells the grid plans, their layers, the results store
(runs stored from hand-made run folders, seeds skipped, stale digests), and the table's maths from stored
results alone (seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedsim.config import to_yaml
from fedsim.validation import load_config

from conftest import REPO, experiment_module


T = experiment_module("fedmllm_table")
FEDMLLM = REPO / "experiments" / "fedmllm"


def test_default_grid_is_the_papers_four_by_three_times_eight_methods_with_more_seeds_for_the_findings(tmp_path):
    cells = T.plan_table(list(T.SCENARIOS), list(T.METHODS), list(T.SEEDS), tmp_path)
    assert len(cells) == 12 * 8 and T.SEEDS == (1001, 1002, 1003)
    assert {c.scenario.split("-")[0] for c in cells} == {"aligned", "missing", "cross", "hybrid"}
    assert {c.method for c in cells} == set(T.METHODS)
    findings = cells[:16]  # plan order: the findings' cells first
    assert {(c.scenario, c.method) for c in findings} == {(s, m) for s in T.FINDING_SCENARIOS
                                                          for m in T.FINDING_METHODS}
    assert all(c.seeds == (1001, 1002, 1003, 1004, 1005) for c in findings)
    assert all(c.seeds == (1001, 1002, 1003) for c in cells[16:])  # paired: FedAvg has every seed of a cell
    assert sum(len(c.seeds) for c in cells) == 16 * 5 + 80 * 3
    assert len({c.dir for c in cells}) == len({c.results for c in cells}) == len(cells)
    assert cells[0].result_path(1001) == T.RESULTS / "aligned-0.5--local" / "seed=1001.json"
    for path in {p for c in cells for p in c.configs}:
        assert Path(path).is_file(), path
    plain = T.plan_table(["aligned-0.5"], ["fedavg"], [7, 1003], tmp_path, finding_seeds=())
    assert plain[0].seeds == (7, 1003)
    assert T.plan_table(["aligned-0.5"], ["fedavg"], [7, 1004], tmp_path)[0].seeds == (7, 1004, 1005)


def test_subset_cells_layers_and_run_dirs(tmp_path):
    tuning = tmp_path / "tuning"
    cells = T.plan_table(["cross-5-5", "missing-0.5"], ["local", "fedavg", "fedyogi"], [3, 4], tmp_path / "out",
                         ["federation.rounds=1"], tuning=tuning)
    assert [c.name for c in cells] == ["missing-0.5--local", "missing-0.5--fedavg", "missing-0.5--fedyogi",
                                       "cross-5-5--local", "cross-5-5--fedavg", "cross-5-5--fedyogi"]
    yogi = cells[2]
    assert [Path(p).relative_to(FEDMLLM).as_posix() for p in yogi.configs] == [
        "cpu.yaml", "scenarios/missing-0.5.yaml", "methods/fedyogi.yaml", "cpu-adaptive.yaml"]
    assert [Path(p).name for p in cells[4].configs] == ["cpu.yaml", "cross-5-5.yaml", "fedavg.yaml"]
    command = yogi.command([4, 1004], parallel=2)
    assert command[2:4] == ["fedsim.cli", "sweep"] and "federation.rounds=1" in command
    assert command[-6:] == ["--grid", "seed=4,1004", "--parallel", "2", "--out", str(tmp_path / "out" / yogi.name)]
    assert yogi.run_dirs() == {s: yogi.dir / f"seed={s}" for s in (3, 4, 1004, 1005)}  # fedsim sweep's names
    for cell in cells:
        cfg = load_config(list(cell.configs), ["seed=3"])
        assert cfg.runtime.engine == "sequential" and cfg.eval.ablations == ["no_image", "no_text"]
    assert load_config(list(yogi.configs)).algorithm.server.lr == 0.1  # cpu-adaptive.yaml until --tune

    tuning.mkdir()  # a tuning file, once written, is layered last, and changes the cell's digest
    (tuning / "fedyogi.yaml").write_text(T.tuning_yaml("fedyogi", {0.01: {100: 0.5}, 0.03: {100: 0.7}}, "accuracy",
                                                       {}, "today"))
    tuned = T.plan_table(["missing-0.5"], ["fedyogi"], [3], tmp_path / "out", ["federation.rounds=1"],
                         tuning=tuning)[0]
    assert tuned.configs[-1] == str(tuning / "fedyogi.yaml")
    assert load_config(list(tuned.configs)).algorithm.server.lr == 0.03
    assert tuned.digest() != yogi.digest()


def test_ray_address_switches_runs_to_the_ray_engine_without_changing_the_digest(tmp_path):
    assert T.engine_overrides({}) == []
    assert T.engine_overrides({"RAY_ADDRESS": "ray://head:10001"}) == ["runtime.engine=ray"]
    ray = T.plan_table(["aligned-5.0"], ["fedavg"], [0], tmp_path, T.engine_overrides({"RAY_ADDRESS": "x"}))[0]
    plain = T.plan_table(["aligned-5.0"], ["fedavg"], [0], tmp_path)[0]
    assert load_config(list(ray.configs), list(ray.overrides)).runtime.engine == "ray"
    assert ray.digest() == plain.digest()


def test_tuning_cells_are_held_out_of_the_table(tmp_path):
    assert not set(T.TUNE_SEEDS) & {*T.SEEDS, *T.FINDING_SEEDS} and len(T.TUNE_SEEDS) == 2
    for seeds, extra in (([1000, 101], ()), ([1000], (100,))):
        with pytest.raises(SystemExit, match="tuning"):
            T.plan_table(["aligned-0.5"], ["fedavg"], seeds, tmp_path, finding_seeds=extra)
    with pytest.raises(SystemExit, match="repeats"):
        T.plan_table(["aligned-5.0"], ["fedavg"], [1000, 1000], tmp_path)
    cells = T.plan_tuning(["fedavgm", "fedadagrad"], tmp_path / "out", results=tmp_path / "results")
    assert [(c.method, c.lr) for c in cells] == [("fedavgm", lr) for lr in (0.5, 1.0, 2.0)] + [
        ("fedadagrad", lr) for lr in (0.001, 0.01, 0.03, 0.1, 0.3)]
    assert all(c.seeds == T.TUNE_SEEDS for c in cells)
    assert cells[0].dir == tmp_path / "out" / "tune" / "fedavgm" / "lr=0.5" and cells[0].name == "tune-fedavgm-lr=0.5"
    assert cells[4].result_path(101) == tmp_path / "results" / "tune" / "fedadagrad" / "lr=0.01--seed=101.json"
    assert cells[4].command([100, 101])[-6:-4] == ["--grid", "seed=100,101"]
    for cell in (cells[0], cells[4]):
        assert not any("adaptive" in p or "tuning" in p for p in cell.configs)  # the override sets the lr
        cfg = load_config(list(cell.configs), [*cell.overrides, "seed=101"])
        assert (cfg.seed, cfg.partition.alpha, cfg.algorithm.server.lr) == (101, 1.0, cell.lr)


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_tables(df, expected):
    assert T.t_quantile(df) == pytest.approx(expected, abs=1e-4)


def test_interval_and_paired_difference_by_hand():
    cell = T.interval([50.0, 60.0, 70.0])  # sd 10
    assert cell["mean"] == pytest.approx(60) and cell["n"] == 3
    assert cell["half_width"] == pytest.approx(4.302653 * 10 / math.sqrt(3), rel=1e-5)
    assert (cell["low"], cell["high"]) == pytest.approx((60 - cell["half_width"], 60 + cell["half_width"]))
    assert T.interval([42.0]) == {"n": 1, "mean": 42.0, "half_width": None, "low": None, "high": None}
    diff = T.paired_difference({"0": 55.0, "1": 70.0, "2": 80.0}, {"0": 50.0, "1": 60.0, "2": 70.0, "9": 0.0})
    assert diff["values"] == {"0": 5.0, "1": 10.0, "2": 10.0}
    sd = math.sqrt(((5 - 25 / 3) ** 2 + 2 * (10 - 25 / 3) ** 2) / 2)
    assert diff["mean"] == pytest.approx(25 / 3)
    assert diff["half_width"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5)


# ------------------------------------------------------------------------------------------ the results store
def _store(cell, seed: int, accuracy: float, digest: str | None = None, lr=None) -> None:
    """A stored result as harvest writes it (the cell's digest of today unless ``digest`` is given)."""
    metrics = {"accuracy": accuracy, "no_image/accuracy": accuracy / 2, "no_text/accuracy": accuracy / 4}
    cell.results.mkdir(parents=True, exist_ok=True)
    cell.result_path(seed).write_text(json.dumps({
        "scenario": cell.scenario, "method": cell.method, "seed": seed, "config_digest": digest or cell.digest(),
        "server_lr": lr, "headline_metric": "accuracy", "final_metrics": metrics, "zero_shot_metrics": {},
        "curve": [], "wall_seconds": 60.0, "engine": "sequential", "finished": "2026-12-01T10:00:00+00:00",
        "versions": {"torch": "2.13.0", "transformers": "5.24.0"}}))


def test_a_finished_run_is_stored_from_its_folder_and_read_back(tmp_path):
    cell = T.plan_table(["aligned-5.0"], ["fedyogi"], [1000, 1001], tmp_path / "out", tuning=tmp_path / "none",
                        results=tmp_path / "results")[0]
    run_dir = cell.run_dirs()[1000]
    run_dir.mkdir(parents=True)
    # the run's own config.yaml, with what a run may change without changing its numbers changed
    cfg = load_config(list(cell.configs), ["seed=1000", "runtime.engine=ray", f"output.dir={run_dir}"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    final = {"accuracy": 0.8, "no_image/accuracy": 0.4, "no_text/accuracy": 0.3}
    (run_dir / "summary.json").write_text(json.dumps({
        "final_metrics": final, "zero_shot_metrics": {"accuracy": 0.1}, "headline_metric": "accuracy",
        "wall_seconds": 61.5, "engine": "ray", "versions": {"torch": "2.13.0"}, "rounds": 10}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"round": 1, "train_loss": 0.9, "lr": 0.003}, {"round": 2, "train_loss": 0.5, "eval": {"accuracy": 0.6}},
        {"round": 3, "train_loss": 0.4, "eval": final}]))
    (cell.dir / "seed=1001").mkdir()  # a run in flight: nothing to store

    assert T.harvest(cell) == [1000]
    stored = json.loads(cell.result_path(1000).read_text())
    assert (stored["scenario"], stored["method"], stored["seed"]) == ("aligned-5.0", "fedyogi", 1000)
    assert stored["config_digest"] == cell.digest() and stored["server_lr"] == 0.1
    assert stored["curve"] == [{"round": 2, "eval": {"accuracy": 0.6}}, {"round": 3, "eval": final}]
    assert (stored["final_metrics"], stored["zero_shot_metrics"]) == (final, {"accuracy": 0.1})
    assert (stored["headline_metric"], stored["wall_seconds"], stored["versions"]) == ("accuracy", 61.5,
                                                                                       {"torch": "2.13.0"})
    assert stored["finished"][:4].isdigit()
    plan = T.plan_cell(cell)
    assert plan.done == {1000: stored} and plan.todo == [1001] and plan.stale == []
    assert T.harvest(cell) == []  # stored already: kept as it is


def test_stored_seeds_are_not_run_again_and_max_runs_bounds_a_sitting(tmp_path):
    cells = T.plan_table(["aligned-5.0"], ["fedavg", "fedprox"], [1000, 1001, 1002], tmp_path / "out",
                         results=tmp_path / "results")
    _store(cells[0], 1000, 0.5)
    _store(cells[0], 1002, 0.7)
    plans = [T.plan_cell(c) for c in cells]
    assert list(plans[0].done) == [1000, 1002] and plans[0].todo == [1001]
    assert plans[1].todo == [1000, 1001, 1002]
    assert T.schedule(plans) == [(cells[0], [1001]), (cells[1], [1000, 1001, 1002])]
    assert T.schedule(plans, max_runs=2) == [(cells[0], [1001]), (cells[1], [1000])]
    assert T.schedule(plans, max_runs=0) == []
    assert "seed=1001" in cells[0].command(T.schedule(plans)[0][1])
    assert T.progress(plans, ["--max-runs", "2"]).startswith("4 of 6 runs of the plan remain")
    assert T.progress(plans, ["--max-runs", "2"]).endswith("python experiments/fedmllm_table.py --max-runs 2")


def test_a_stale_result_is_reported_and_left_out_of_the_table(tmp_path, capsys):
    cell = T.plan_table(["aligned-5.0"], ["fedavg"], [1000, 1001], tmp_path / "out", results=tmp_path / "results")[0]
    _store(cell, 1000, 0.5)
    _store(cell, 1001, 0.9, digest="0" * 64)  # a run of an earlier config
    plan = T.plan_cell(cell)
    assert list(plan.done) == [1000] and plan.stale == [1001] and plan.todo == [1001]
    T.report_stale([plan])
    assert "aligned-5.0--fedavg: 1 stored for another config (seeds 1001)" in capsys.readouterr().out
    table = T.build_table([plan], ["aligned-5.0"], ["fedavg"])
    assert table["cells"]["aligned-5.0"]["fedavg"]["values"] == {"1000": 50.0}
    assert table["stale_results"] == {"aligned-5.0--fedavg": 1} and table["runs"] == 1
    assert "1 stored results of an earlier config left out" in T.render_markdown(table)
    assert cell.result_path(1001).exists()  # never deleted


def test_table_rebuilds_from_the_results_store_alone(tmp_path):
    scenarios, methods = ["aligned-5.0", "cross-5-5"], ["local", "fedavg", "fedyogi"]
    results, out = tmp_path / "results", tmp_path / "no-run-folders"
    accuracy = {"local": [0.30, 0.40, None], "fedavg": [0.50, 0.60, 0.70], "fedyogi": [0.55, 0.70, 0.80]}
    for cell in T.plan_table(scenarios, methods, T.SEEDS, out, results=results):
        digest = cell.digest()
        for seed, value in zip(cell.seeds, accuracy[cell.method]):
            if value is not None:  # None: a run not measured yet
                _store(cell, seed, 1 - value if cell.scenario == "cross-5-5" else value,  # local is best there
                       digest, lr=0.1 if cell.method == "fedyogi" else None)
    # a headline metric that was not evaluated falls back to accuracy
    assert T.headline({"headline_metric": "roc_auc", "final_metrics": {"accuracy": 0.5}}) == ("accuracy", 0.5)

    assert T.main(["--table-only", "--scenarios", *scenarios, "--methods", *methods, "--out", str(out),
                   "--results", str(results), "--table-out", str(tmp_path / "table")]) == 0
    assert not out.exists()
    table = json.loads((tmp_path / "table" / "table.json").read_text())
    markdown = (tmp_path / "table" / "table.md").read_text()
    cells = table["cells"]["aligned-5.0"]
    assert cells["fedavg"]["values"] == pytest.approx({str(s): v for s, v in zip(T.SEEDS, (50.0, 60.0, 70.0))})
    assert cells["fedavg"]["mean"] == pytest.approx(60.0)
    assert cells["fedavg"]["half_width"] == pytest.approx(4.302653 * 10 / math.sqrt(3), rel=1e-5)
    assert cells["local"]["n"] == 2 and cells["local"]["mean"] == pytest.approx(35.0)
    assert [m for m in methods if cells[m]["best"]] == ["fedyogi"]
    assert [m for m in methods if table["cells"]["cross-5-5"][m]["best"]] == ["local"]
    assert cells["fedyogi"]["no_image"]["mean"] == pytest.approx(205 / 6)
    assert cells["fedyogi"]["no_text"]["mean"] == pytest.approx(205 / 12)
    diff = cells["fedyogi"]["minus_fedavg"]
    assert diff["values"] == pytest.approx({str(s): v for s, v in zip(T.SEEDS, (5.0, 10.0, 10.0))})
    assert diff["mean"] == pytest.approx(25 / 3)
    assert cells["local"]["minus_fedavg"]["values"] == pytest.approx({str(s): -20.0 for s in T.SEEDS[:2]})  # common seeds
    assert "minus_fedavg" not in cells["fedavg"]
    assert (table["metric"], table["runs"], table["runs_planned"]) == ("accuracy", 16, 18)
    assert table["seeds"] == list(T.SEEDS) and table["extra_seeds"] == {}
    assert table["server_lr"] == {"local": None, "fedavg": None, "fedyogi": 0.1}
    assert table["versions"] == [{"versions": {"torch": "2.13.0", "transformers": "5.24.0"}, "runs": 16}]
    assert table["runs_finished"] == ["2026-12-01", "2026-12-01"]

    assert "| aligned α=5.0 | 35.0 ± 63.5 (n=2) | 60.0 ± 24.8 | **68.3 ± 31.3** |" in markdown
    assert "| aligned α=5.0 | 17.5 / 8.8 | 30.0 / 15.0 | 34.2 / 17.1 |" in markdown
    assert "| aligned α=5.0 | -20.0 [-20.0, -20.0] (n=2) | +8.3 [+1.2, +15.5] |" in markdown
    assert "16 of 18 runs of the plan measured" in markdown
    assert "Versions (16 runs): torch 2.13.0, transformers 5.24.0." in markdown


def test_findings_cells_show_their_extra_seeds():
    seeds = {("aligned-0.5", "fedavg"): (1000, 1001, 1003), ("aligned-0.5", "fedprox"): (1000, 1001),
             ("cross-5-5", "fedavg"): (1000, 1001), ("cross-5-5", "fedprox"): (1000, 1001)}
    plans = [T.CellPlan(T.Cell(s, m, (), (), planned, Path("x"), Path("r") / f"{s}--{m}"), {}, [], list(planned))
             for (s, m), planned in seeds.items()]  # nothing measured yet
    table = T.build_table(plans, ["aligned-0.5", "cross-5-5"], ["fedavg", "fedprox"])
    assert table["seeds"] == [1000, 1001] and table["extra_seeds"] == {"aligned-0.5": {"fedavg": [1003]}}
    assert table["runs_planned"] == 9
    assert table["cells"]["aligned-0.5"]["fedprox"]["minus_fedavg"]["seeds_planned"] == ["1000", "1001"]
    assert "Seeds 1003 too in: aligned α=0.5 (FedAvg)." in T.render_markdown(table)


def test_tuning_picks_the_best_mean_over_two_seeds(tmp_path, capsys):
    results = tmp_path / "results"
    cells = T.plan_tuning(["fedavgm", "fedyogi"], tmp_path / "out", lrs=[0.5, 1.0], results=results)
    # lr 0.5 has the best single run, lr 1.0 the best mean
    scores = {0.5: {100: 0.90, 101: 0.20}, 1.0: {100: 0.60, 101: 0.62}}
    for cell in cells:
        digest = cell.digest()
        for seed in cell.seeds:
            if cell.method == "fedavgm" or (cell.lr, seed) != (1.0, 101):  # fedyogi: one run not measured
                _store(cell, seed, scores[cell.lr][seed], digest, lr=cell.lr)
    written = T.write_tuning([T.plan_cell(c) for c in cells], tmp_path / "tuning")
    assert written == [tmp_path / "tuning" / "fedavgm.yaml"]
    assert "fedyogi: 1 of 4 tuning runs not measured yet" in capsys.readouterr().out
    text = written[0].read_text()
    assert text.endswith("algorithm:\n  server:\n    lr: 1.0\n")
    assert "lr 0.5: seed 100 90.0, seed 101 20.0; mean 55.0" in text
    assert "lr 1: seed 100 60.0, seed 101 62.0; mean 61.0" in text
    assert T.choose_lr({0.1: {1: 0.4}, 0.01: {1: 0.7, 2: 0.5}, 0.03: {1: 0.6}}) == 0.01  # a tie: the smaller lr
