"""Plot a run's evaluation metric against rounds (and the zero-shot baseline) from its metrics.jsonl.

    python experiments/plot_run.py RUN_DIR [OUT.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.output import read_metrics  # noqa: E402


def plot_run(run_dir: Path, out: Path, metric: str = "accuracy") -> None:
    rounds = [r for r in read_metrics(run_dir) if "eval" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot([r["round"] for r in rounds], [100 * r["eval"][metric] for r in rounds], marker="o",
            label=f"{summary['algorithm']['server']} global model")
    if summary["zero_shot_metrics"]:
        ax.axhline(100 * summary["zero_shot_metrics"][metric], color="grey", ls="--", label="zero-shot")
    ax.set(xlabel="round", ylabel=f"test {metric} (%)", ylim=(0, 100),
           title=f"{summary['experiment']}: {summary['num_clients']} clients, "
                 f"{summary['clients_per_round']} per round")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    run = Path(sys.argv[1])
    plot_run(run, Path(sys.argv[2]) if len(sys.argv) > 2 else run / f"{run.name}.png")
