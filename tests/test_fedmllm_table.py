"""experiments/fedmllm_table.py without training: the sweeps the grid plans, their layers, and the table's
maths on hand-written summary.json files (seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from fedsim.validation import load_config

from conftest import REPO


def _table_module():
    spec = importlib.util.spec_from_file_location("fedmllm_table", REPO / "experiments" / "fedmllm_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _table_module()
FEDMLLM = REPO / "experiments" / "fedmllm"


def test_default_grid_is_the_papers_four_by_three_times_eight_methods(tmp_path):
    specs = T.plan_table(list(T.SCENARIOS), list(T.METHODS), list(T.SEEDS), tmp_path)
    assert len(specs) == 12 * 8 and len(T.SEEDS) >= 3
    assert {s.scenario.split("-")[0] for s in specs} == {"aligned", "missing", "cross", "hybrid"}
    assert {s.method for s in specs} == {"local", "fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi",
                                         "fedadam", "fedmllm"}
    assert all(s.grid == {"seed": ["0", "1", "2"]} for s in specs)  # paired: the same seeds everywhere
    assert len({s.dir for s in specs}) == len(specs)
    for path in {p for s in specs for p in s.configs}:
        assert Path(path).is_file(), path


def test_subset_sweeps_layers_and_run_dirs(tmp_path):
    tuning = tmp_path / "tuning"
    specs = T.plan_table(["missing-0.5", "cross-5-5"], ["local", "fedavg", "fedyogi"], [3, 4], tmp_path / "out",
                         ["federation.rounds=1"], tuning=tuning)
    assert [s.name for s in specs] == ["missing-0.5--local", "missing-0.5--fedavg", "missing-0.5--fedyogi",
                                       "cross-5-5--local", "cross-5-5--fedavg", "cross-5-5--fedyogi"]
    yogi = specs[2]
    assert [Path(p).relative_to(FEDMLLM).as_posix() for p in yogi.configs] == [
        "cpu.yaml", "scenarios/missing-0.5.yaml", "methods/fedyogi.yaml", "cpu-adaptive.yaml"]
    assert [Path(p).name for p in specs[1].configs] == ["cpu.yaml", "missing-0.5.yaml", "fedavg.yaml"]
    command = yogi.command(parallel=2)
    assert command[2:4] == ["fedsim.cli", "sweep"] and "federation.rounds=1" in command
    assert command[-6:] == ["--grid", "seed=3,4", "--parallel", "2", "--out", str(tmp_path / "out" / yogi.name)]
    assert yogi.run_dirs() == {"3": yogi.dir / "seed=3", "4": yogi.dir / "seed=4"}  # fedsim sweep's names
    for spec in specs:
        cfg = load_config(spec.configs, ["seed=3"])
        assert cfg.runtime.engine == "sequential" and cfg.eval.ablations == ["no_image", "no_text"]
    assert load_config(yogi.configs).algorithm.server.lr == 0.1  # cpu-adaptive.yaml until --tune

    tuning.mkdir()  # a tuning file, once written, is layered last
    (tuning / "fedyogi.yaml").write_text(T.tuning_yaml("fedyogi", {0.01: 0.5, 0.03: 0.7}, "accuracy", {}, "today"))
    tuned = T.plan_table(["missing-0.5"], ["fedyogi"], [3], tmp_path / "out", tuning=tuning)[0]
    assert tuned.configs[-1] == str(tuning / "fedyogi.yaml")
    assert load_config(tuned.configs).algorithm.server.lr == 0.03


def test_ray_address_switches_runs_to_the_ray_engine():
    assert T.engine_overrides({}) == []
    assert T.engine_overrides({"RAY_ADDRESS": "ray://head:10001"}) == ["runtime.engine=ray"]
    spec = T.plan_table(["aligned-5.0"], ["fedavg"], [0], Path("out"), T.engine_overrides({"RAY_ADDRESS": "x"}))[0]
    assert load_config(spec.configs, spec.overrides).runtime.engine == "ray"


def test_tuning_cell_is_held_out_of_the_table(tmp_path):
    assert T.TUNE_SEED not in T.SEEDS
    with pytest.raises(SystemExit, match="tuning"):
        T.plan_table(["aligned-1.0"], ["fedavg"], [0, T.TUNE_SEED], tmp_path)
    specs = T.plan_tuning(["fedavgm", "fedadagrad"], tmp_path)
    assert [s.dir for s in specs] == [tmp_path / "tune" / "fedavgm", tmp_path / "tune" / "fedadagrad"]
    assert specs[0].grid == {"algorithm.server.lr": ["0.5", "1.0", "2.0"]}
    assert specs[1].grid == {"algorithm.server.lr": ["0.001", "0.01", "0.03", "0.1", "0.3"]}
    for spec in specs:
        assert not any("adaptive" in p or "tuning" in p for p in spec.configs)  # the grid sets the lr
        cfg = load_config(spec.configs, [*spec.overrides, "algorithm.server.lr=0.01"])
        assert (cfg.seed, cfg.partition.alpha, cfg.algorithm.server.lr) == (T.TUNE_SEED, 1.0, 0.01)


def test_tuning_file_records_every_lr_and_the_best():
    assert T.choose_lr({0.1: 0.4, 0.01: 0.6, 0.03: 0.6}) == 0.01  # a tie goes to the smaller lr
    text = T.tuning_yaml("fedadam", {0.001: 0.277, 0.1: 0.463}, "accuracy", {"torch": "2.13.0"}, "2026-12-01")
    assert "0.001: 27.7, 0.1: 46.3" in text and "torch 2.13.0" in text and "2026-12-01" in text
    assert text.endswith("algorithm:\n  server:\n    lr: 0.1\n")


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


def _write_run(run_dir: Path, metrics: dict, lr=None, headline="accuracy") -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({
        "final_metrics": metrics, "headline_metric": headline, "wall_seconds": 60.0, "engine": "sequential",
        "versions": {"torch": "2.13.0", "transformers": "5.24.0"}}))
    (run_dir / "config.yaml").write_text(f"algorithm:\n  server:\n    lr: {json.dumps(lr)}\n")


def test_table_from_summaries(tmp_path):
    scenarios, methods, seeds = ["aligned-5.0", "cross-5-5"], ["local", "fedavg", "fedyogi"], [0, 1, 2]
    specs = T.plan_table(scenarios, methods, seeds, tmp_path)
    accuracy = {"local": [0.30, 0.40, None], "fedavg": [0.50, 0.60, 0.70], "fedyogi": [0.55, 0.70, 0.80]}
    for spec in specs:
        for seed, value in zip(spec.run_dirs().values(), accuracy[spec.method]):
            if value is None:
                continue  # an unfinished run
            if spec.scenario == "cross-5-5":
                value = 1 - value  # local is best here
            metrics = {"accuracy": value, "no_image/accuracy": value / 2, "no_text/accuracy": value / 4}
            _write_run(seed, metrics, lr=0.1 if spec.method == "fedyogi" else None)
    # a headline metric that was not evaluated falls back to accuracy
    assert T.headline({"headline_metric": "roc_auc", "final_metrics": {"accuracy": 0.5}}) == ("accuracy", 0.5)

    markdown = T.write_table(specs, scenarios, methods, seeds, tmp_path)
    table = json.loads((tmp_path / "table.json").read_text())
    assert (tmp_path / "table.md").read_text() == markdown
    cells = table["cells"]["aligned-5.0"]
    assert cells["fedavg"]["values"] == pytest.approx({"0": 50.0, "1": 60.0, "2": 70.0})
    assert cells["fedavg"]["mean"] == pytest.approx(60.0)
    assert cells["fedavg"]["half_width"] == pytest.approx(4.302653 * 10 / math.sqrt(3), rel=1e-5)
    assert cells["local"]["n"] == 2 and cells["local"]["mean"] == pytest.approx(35.0)
    assert [m for m in methods if cells[m]["best"]] == ["fedyogi"]
    assert [m for m in methods if table["cells"]["cross-5-5"][m]["best"]] == ["local"]
    assert cells["fedyogi"]["no_image"]["mean"] == pytest.approx(205 / 6)
    assert cells["fedyogi"]["no_text"]["mean"] == pytest.approx(205 / 12)
    diff = cells["fedyogi"]["minus_fedavg"]
    assert diff["values"] == pytest.approx({"0": 5.0, "1": 10.0, "2": 10.0}) and diff["mean"] == pytest.approx(25 / 3)
    assert cells["local"]["minus_fedavg"]["values"] == pytest.approx({"0": -20.0, "1": -20.0})  # common seeds only
    assert "minus_fedavg" not in cells["fedavg"]
    assert (table["metric"], table["runs"], table["runs_expected"]) == ("accuracy", 16, 18)
    assert table["server_lr"] == {"local": None, "fedavg": None, "fedyogi": 0.1}
    assert table["versions"] == [{"versions": {"torch": "2.13.0", "transformers": "5.24.0"}, "runs": 16}]
    assert table["date"] and table["runs_finished"]

    assert "| aligned α=5.0 | 35.0 ± 63.5 (n=2) | 60.0 ± 24.8 | **68.3 ± 31.3** |" in markdown
    assert "| aligned α=5.0 | 17.5 / 8.8 | 30.0 / 15.0 | 34.2 / 17.1 |" in markdown
    assert "| aligned α=5.0 | -20.0 [-20.0, -20.0] (n=2) | +8.3 [+1.2, +15.5] |" in markdown
    assert "Versions (16 runs): torch 2.13.0, transformers 5.24.0." in markdown
