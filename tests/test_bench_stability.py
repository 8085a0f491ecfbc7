"""experiments/bench_stability.py's checks on hand-written results (no training, milliseconds)."""

from __future__ import annotations

import pytest

from conftest import experiment_module


B = experiment_module("bench_stability")


def result(final: float, curve: list[float], zero: float = 0.25, **ablations: float) -> dict:
    """A stored run: its eval curve every 3 rounds and its final metrics (fractions)."""
    return {"zero_shot_metrics": {"accuracy": zero},
            "curve": [{"round": 3 * (i + 1), "eval": {"accuracy": a}} for i, a in enumerate(curve)],
            "final_metrics": {"accuracy": final, **{k.replace("__", "/"): v for k, v in ablations.items()}}}


def test_the_largest_jump_counts_the_step_from_zero_shot():
    assert B.curve(result(0.9, [0.3, 0.8, 0.9])) == [(0, 25.0), (3, 30.0), (6, 80.0), (9, 90.0)]
    assert B.largest_jump(B.curve(result(0.9, [0.3, 0.8, 0.9]))) == pytest.approx(50.0)
    assert B.largest_jump(B.curve(result(0.6, [0.6], zero=0.25))) == pytest.approx(35.0)


def test_table_checks_per_cell_spread_paired_differences_and_the_share_below_centralized():
    steady = {1000: result(0.80, [0.3, 0.35, 0.8]), 1001: result(0.82, [0.3, 0.36, 0.82])}
    spread = {1000: result(0.50, [0.3, 0.4, 0.5]), 1001: result(0.90, [0.3, 0.6, 0.9])}
    checks = B.table_checks({("aligned-0.5", "fedavg"): steady, ("aligned-0.5", "local"): spread},
                            centralized_accuracy=88.0)
    assert checks["runs"] == 4 and checks["cells_with_std"] == 2
    assert checks["cell_std"]["aligned-0.5--fedavg"] == pytest.approx(1.414, abs=1e-3)
    assert checks["share_cells_std_within"] == 0.5 and not checks["holds_std"]
    # local - fedavg per seed: -30 and +8 points
    assert checks["paired_difference_std"]["aligned-0.5--local"] == pytest.approx(26.87, abs=0.01)
    assert checks["share_ending_10_below_centralized"] == 0.25  # only 50 is more than 10 points below 88
    # largest jumps 45, 46, 10 and 30 points
    assert checks["median_largest_jump"] == pytest.approx(37.5) and not checks["holds_jump"]


def test_calibration_compares_each_input_with_its_bayes_ceiling():
    runs = [result(0.885, [], no_image__accuracy=0.65, no_text__accuracy=0.60),
            result(0.883, [], no_image__accuracy=0.64, no_text__accuracy=0.62)]
    out = B.calibration(runs)
    assert out["accuracy"]["bayes_ceiling"] == pytest.approx(88.36) and out["accuracy"]["holds"]
    assert out["no_image/accuracy"]["holds"] and not out["no_text/accuracy"]["holds"]  # 61 vs 66


def test_lr_sensitivity_flags_a_cliff():
    out = B.lr_sensitivity({"smooth": {0.5: [80, 82], 1.0: [85, 86], 2.0: [84, 88]},
                            "cliff": {0.5: [40, 42], 1.0: [85, 86], 2.0: [84, 88]}})
    assert out["smooth"]["smooth"] and not out["cliff"]["smooth"]
    assert out["cliff"]["largest_step"] == pytest.approx(44.5)
