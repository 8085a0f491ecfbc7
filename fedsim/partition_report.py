"""What each client holds, before any training: ``fedsim partition CONFIG``.

Per client: sample count, label histogram and modality mix (both / image only / text only / neither),
as a printed table and a PNG figure with stacked bars per client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.clientdata import PartitionedClients, load_client_data
from fedsim.config import ExperimentConfig
from fedsim.partition import label_histogram
from fedsim.scenarios import modality_mix

MIX_NAMES = ("both", "image only", "text only", "neither")


@dataclass
class PartitionReport:
    name: str
    labels: list[str]  # one name per label histogram column
    histogram: np.ndarray  # (clients, labels)
    mix: np.ndarray  # (clients, 3 or 4), columns MIX_NAMES

    @property
    def sizes(self) -> np.ndarray:
        return self.histogram.sum(axis=1)


def partition_report(cfg: ExperimentConfig) -> PartitionReport:
    data = load_client_data(cfg)
    if not isinstance(data, PartitionedClients):
        raise ValueError(f"fedsim partition reports a split of a fixed training set; data.samples_per_client="
                         f"{cfg.data.samples_per_client} generates each client's rows when it trains (set "
                         "data.num_train instead to see a partition)")
    train = data.splits.train
    labels = np.asarray(train["label"], dtype=np.int64)
    num_labels = int(labels.max()) + 1 if labels.size else 0
    options = train[0]["options"]
    names = list(options) if len(options) == num_labels else [f"label {i}" for i in range(num_labels)]
    if num_labels and labels.min() < 0:
        raise ValueError("the training split has negative labels; a label histogram needs labels >= 0")
    return PartitionReport(cfg.name, names, label_histogram(labels, data.shards, num_labels),
                           modality_mix(train, data.shards))


def format_report(report: PartitionReport) -> str:
    mix_names = MIX_NAMES[:report.mix.shape[1]]
    header = ["client", "samples", *mix_names, "labels (" + ", ".join(report.labels) + ")"]
    lines = ["\t".join(header)]
    for client, (size, mix, hist) in enumerate(zip(report.sizes, report.mix, report.histogram)):
        lines.append("\t".join([str(client), str(int(size)), *(str(int(m)) for m in mix),
                                " ".join(str(int(h)) for h in hist)]))
    totals = report.mix.sum(axis=0)
    lines.append("\t".join(["total", str(int(report.sizes.sum())), *(str(int(t)) for t in totals),
                            " ".join(str(int(h)) for h in report.histogram.sum(axis=0))]))
    return "\n".join(lines)


def plot_report(report: PartitionReport, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    clients = np.arange(len(report.sizes))
    width = min(16.0, max(6.0, 0.25 * len(clients)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 6.4), dpi=120, sharex=True)
    for ax, table, names, title in ((top, report.histogram, report.labels, "label histogram"),
                                    (bottom, report.mix, MIX_NAMES[:report.mix.shape[1]], "modality mix")):
        base = np.zeros(len(clients))
        for column, name in enumerate(names):
            ax.bar(clients, table[:, column], bottom=base, width=0.85, label=name)
            base += table[:, column]
        ax.set(ylabel="training samples", title=f"{report.name}: {title} per client")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    bottom.set_xlabel("client")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
