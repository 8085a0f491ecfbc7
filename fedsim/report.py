"""``fedsim report``: plots of a run or a sweep, and an HTML page that shows them beside a table of runs.

Figures: the metric against rounds, simulated time and bytes communicated (one line per run, labelled by
its swept values); for every numeric swept key, the final metric and seconds per round against it; for
asynchronous runs, the staleness histogram; for runs evaluated with ``eval.ablations``, the metric with
both modalities and with each one removed. Runs still in progress are drawn from their metrics.jsonl.
The default metric is the runs' ``headline_metric`` (summary.json), else the first of PREFERRED_METRICS.

Metrics that are fractions (FRACTION_METRICS) are drawn in percent, with a dash-dot line at their chance level:
the runs' ``chance_metrics`` (summary.json, fedsim.chance), or ``chance`` for runs written before it was
recorded. The x axis is the round of synchronous runs and the global version of asynchronous ones.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedsim.evaluation import ABLATIONS  # noqa: E402
from fedsim.output import atomic_write_bytes, atomic_write_text, read_metrics  # noqa: E402
from fedsim.sweep import MANIFEST, short_key  # noqa: E402

PREFERRED_METRICS = ("accuracy", "macro_f1", "token_f1")
ABLATION_STYLES = ("--", ":")  # line styles of the ablations, in ABLATIONS order; the full metric is solid
# What fedsim.evaluation reports that lies in [0, 1], by name less any source or ablation prefix: drawn in %.
FRACTION_METRICS = frozenset({"accuracy", "macro_f1", "roc_auc", "token_f1", "closed_accuracy", "open_accuracy",
                              "open_token_f1"})
STEP_NAMES = {"sync": "round", "async": "global version"}  # what the x axis counts, by summary.json's mode
LAYOUT = "constrained"  # laid out when written, so that drawing a figure (as the tests do) costs no text layout

log = logging.getLogger(__name__)


@dataclass
class RunData:
    label: str
    values: dict[str, str]  # swept key -> value ({} for a single run)
    dir: Path
    records: list[dict[str, Any]]  # metrics.jsonl
    summary: Optional[dict[str, Any]]  # None while the run is in progress

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def curve(self, metric: str) -> list[tuple[int, float, float, float]]:
        """(round, simulated seconds, bytes so far, metric) at each evaluation, from the zero-shot point."""
        points = []
        if self.summary and metric in self.summary["zero_shot_metrics"]:
            points.append((0, 0.0, 0.0, self.summary["zero_shot_metrics"][metric]))
        sent = 0.0
        for r in self.records:
            sent += r.get("bytes_up", 0) + r.get("bytes_down", 0)
            if metric in r.get("eval", {}):
                points.append((r["round"], r["simulated_seconds"], sent, r["eval"][metric]))
        return points

    def final(self, metric: str) -> float:
        if self.summary and metric in self.summary["final_metrics"]:
            return self.summary["final_metrics"][metric]
        evals = [r["eval"][metric] for r in self.records if metric in r.get("eval", {})]
        return evals[-1] if evals else float("nan")


def legend_label(values: dict[str, str]) -> str:
    """``{"partition.num_clients": "100"}`` -> ``num_clients=100`` (keys shortened as in run directory names)."""
    return ", ".join(f"{short_key(k)}={v}" for k, v in values.items())


def _read_run(run_dir: Path, label: str, values: dict[str, str]) -> Optional[RunData]:
    if not (run_dir / "metrics.jsonl").exists():
        return None
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return RunData(label, values, run_dir, read_metrics(run_dir), summary)


def load_runs(path: Path) -> list[RunData]:
    """The runs of a sweep directory (in grid order) or the one run of a run directory."""
    if (path / MANIFEST).exists():
        manifest = json.loads((path / MANIFEST).read_text())
        runs = [_read_run(path / r["label"], legend_label(r["values"]), r["values"]) for r in manifest["runs"]]
        runs = [r for r in runs if r is not None]
    else:
        run = _read_run(path, path.name, {})
        if run and run.summary:  # a lone run is labelled by what it ran
            run.label = f"{run.summary['experiment']} ({run.summary['algorithm']['server']})"
        runs = [run] if run else []
    if not runs:
        raise FileNotFoundError(f"{path} holds no run with metrics (neither a sweep directory with {MANIFEST} "
                                "nor a run directory with metrics.jsonl)")
    return runs


def default_metric(runs: list[RunData], available: list[str]) -> Optional[str]:
    """The finished runs' ``headline_metric`` when they name one and it was evaluated, else the first of
    PREFERRED_METRICS evaluated, else the first metric evaluated on the full test split."""
    headlines = sorted({run.summary["headline_metric"] for run in runs
                        if run.summary and run.summary.get("headline_metric")})
    if len(headlines) == 1 and headlines[0] in available:
        return headlines[0]
    if headlines:
        log.warning("the runs' headline metrics %s are not one evaluated metric; falling back to %s (use --metric)",
                    headlines, "/".join(PREFERRED_METRICS))
    full = [m for m in available if m.split("/")[0] not in ABLATIONS]
    return next((m for m in PREFERRED_METRICS if m in full), full[0] if full else None)


def pick_metric(runs: list[RunData], metric: Optional[str]) -> str:
    available = sorted({k for run in runs for r in run.records for k in r.get("eval", {})})
    if metric is None:
        metric = default_metric(runs, available)
    if metric not in available:
        raise ValueError(f"metric {metric!r} was never evaluated in these runs; available: {available}")
    return metric


def is_fraction(metric: str) -> bool:
    return metric.split("/")[-1] in FRACTION_METRICS


def check_chance(chance: Optional[float], metric: Optional[str]) -> None:
    """A ``--chance`` is a fraction, for a metric that is one (ValueError naming the problem)."""
    if chance is None:
        return
    if not 0 <= chance <= 1:
        raise ValueError(f"--chance {chance:g} is not a fraction in [0, 1] (a chance level of 25% is 0.25)")
    if metric is not None and not is_fraction(metric):
        raise ValueError(f"--chance applies to metrics that are fractions ({', '.join(sorted(FRACTION_METRICS))}), "
                         f"not to {metric!r}")


def recorded_chance(runs: list[RunData], metric: str) -> Optional[float]:
    """The chance level of ``metric`` that the finished runs recorded (summary.json's ``chance_metrics``; an
    ablated metric has the full one's), when they agree; None when no run recorded one (runs written before
    the field, metrics without a chance level) or they differ."""
    prefix, _, rest = metric.partition("/")
    key = rest if prefix in ABLATIONS else metric
    levels = {run.summary["chance_metrics"][key] for run in runs
              if run.summary and key in run.summary.get("chance_metrics", {})}
    if len(levels) > 1:
        log.warning("the runs record different chance levels of %s (%s); drawing none (use --chance)", metric,
                    sorted(levels))
        return None
    return next(iter(levels), None)


@dataclass(frozen=True)
class Metric:
    """The plotted metric: a fraction is drawn in percent, with a line at its chance level when known."""

    name: str
    chance: Optional[float] = None  # as a fraction, like the recorded values

    @property
    def scale(self) -> float:
        """Drawn value per recorded value."""
        return 100.0 if is_fraction(self.name) else 1.0

    def final(self, run: RunData) -> float:
        """``run``'s final value of the metric, as drawn."""
        return run.final(self.name) * self.scale

    def axis_label(self, what: str) -> str:
        """``test accuracy (%)`` for ``what="test"``."""
        return f"{what} {self.name}" + (" (%)" if self.scale == 100 else "")

    def draw_chance(self, ax) -> None:
        if self.chance is not None:
            level = self.chance * self.scale
            ax.axhline(level, color="0.45", linestyle="-.", linewidth=1.2, zorder=1.5,
                       label=f"chance ({level:.3g}{'%' if self.scale == 100 else ''})")


def plotted_metric(runs: list[RunData], metric: Optional[str], chance: Optional[float]) -> Metric:
    """``metric`` (None: the default) with ``chance`` as its chance level, else the one the runs recorded."""
    name = pick_metric(runs, metric)
    check_chance(chance, name)
    return Metric(name, chance if chance is not None else recorded_chance(runs, name))


def step_name(runs: list[RunData]) -> str:
    """What a metric-per-step axis counts: ``round`` for synchronous runs, ``global version`` for asynchronous
    ones, both when the runs mix the two or a run in progress has not said yet (summary.json holds the mode)."""
    names = {STEP_NAMES.get((run.summary or {}).get("mode")) for run in runs}
    return names.pop() if len(names) == 1 and None not in names else "round / global version"


# ------------------------------------------------------------------------------------------------ figures
@dataclass
class Drawn:
    """A figure drawn but not yet written: its file name, its caption on the page and the matplotlib figure,
    whose axes a test can read back."""

    name: str
    caption: str
    figure: Figure

    def write(self, out_dir: Path) -> None:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        plt.close(self.figure)
        atomic_write_bytes(out_dir / self.name, buffer.getvalue())


def _time_unit(seconds: float) -> tuple[float, str]:
    return next(((scale, unit) for scale, unit in ((3600.0, "h"), (60.0, "min")) if seconds >= 3 * scale), (1.0, "s"))


def _byte_unit(nbytes: float) -> tuple[float, str]:
    return next(((scale, unit) for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if nbytes >= scale),
                (1.0, "bytes"))


def _new_axes(title: str, xlabel: str, ylabel: str, width: float = 6.4):
    fig, ax = plt.subplots(figsize=(width, 4.0), dpi=110, layout=LAYOUT)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _finish(fig, name: str, caption: str, legend_ax=None) -> Drawn:
    if legend_ax is not None and legend_ax.get_legend_handles_labels()[0]:
        legend_ax.legend(fontsize="small", loc="best")
    return Drawn(name, caption, fig)


def plot_curves(runs: list[RunData], metric: Metric) -> list[Drawn]:
    """Metric against step (round or global version), simulated time and bytes."""
    curves = {run.label: run.curve(metric.name) for run in runs}
    longest_s = max((p[1] for c in curves.values() for p in c), default=0.0)
    most_bytes = max((p[2] for c in curves.values() for p in c), default=0.0)
    (t_scale, t_unit), (b_scale, b_unit) = _time_unit(longest_s), _byte_unit(most_bytes)
    step = step_name(runs)
    axes: list[tuple[str, str, int, float, str]] = [
        (step, step, 0, 1.0, "metric_vs_round.png"),
        ("simulated time", f"simulated time ({t_unit})", 1, t_scale, "metric_vs_simulated_time.png"),
        ("communication", f"bytes communicated, up + down ({b_unit})", 2, b_scale, "metric_vs_bytes.png"),
    ]
    figures = []
    for what, xlabel, index, scale, name in axes:
        fig, ax = _new_axes(f"test {metric.name} vs {what}", xlabel, metric.axis_label("test"))
        for label, curve in curves.items():
            if curve:
                ax.plot([p[index] / scale for p in curve], [p[3] * metric.scale for p in curve], marker="o", ms=3,
                        label=label)
        metric.draw_chance(ax)
        if index == 0:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        figures.append(_finish(fig, name, f"Test {metric.name} against {what}, one line per run (the first point is "
                                          "the zero-shot model).", ax))
    return figures


def _numeric(values: list[str]) -> Optional[list[float]]:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _spans_decades(xs: list[float]) -> bool:
    """Whether positive values span 100x or more (N = 10^3 .. 10^6, epsilons): on a linear axis all but the
    largest would crowd into one corner."""
    return min(xs) > 0 and max(xs) / min(xs) >= 100


def plot_scaling(runs: list[RunData], metric: Metric) -> list[Drawn]:
    """For each numeric swept key: final metric, simulated and wall seconds per round against its value."""
    finished = [r for r in runs if r.finished]
    keys = list(finished[0].values) if finished else []
    panels: list[tuple[str, Callable[[RunData], float]]] = [
        (metric.axis_label("final test"), metric.final),
        ("simulated seconds per round", lambda r: r.summary["simulated_seconds"] / max(r.summary["rounds"], 1)),
        ("training seconds per round (wall clock)", lambda r: r.summary["train_seconds"] / max(r.summary["rounds"], 1)),
    ]
    figures = []
    for key in keys:
        xs = _numeric([r.values[key] for r in finished])
        if key == ATTACK_SHARE or xs is None or len(set(xs)) < 2:  # attack shares: plot_robustness
            continue
        groups: dict[str, list[tuple[float, RunData]]] = {}
        for x, run in zip(xs, finished):
            rest = legend_label({k: v for k, v in run.values.items() if k != key})
            groups.setdefault(rest, []).append((x, run))
        fig, axs = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=110, layout=LAYOUT)
        short = short_key(key)
        xscale = "log" if _spans_decades(xs) else "linear"
        for ax, (ylabel, value_of) in zip(axs, panels):
            for rest, members in groups.items():
                members.sort(key=lambda item: item[0])
                ax.plot([x for x, _ in members], [value_of(r) for _, r in members], marker="o", label=rest or None)
            ax.set(title=f"{ylabel.removesuffix(' (%)')} vs {short}", xlabel=key, ylabel=ylabel, xscale=xscale)
            if "seconds" in ylabel:  # durations from zero, so a small difference does not look like a large one
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        metric.draw_chance(axs[0])
        figures.append(_finish(fig, f"scaling_{short}.png", f"Final test {metric.name}, simulated seconds and "
                                                           f"wall-clock training seconds per round against {key}.",
                               axs[0]))
    return figures


def plot_tradeoffs(runs: list[RunData], metric: Metric) -> list[Drawn]:
    """Final metric against what a run spent, one point per run: privacy (epsilon, for runs with DP) and
    uplink bytes (for sweeps where some run compresses its updates)."""
    finished = [r for r in runs if r.finished]
    compressed = any(r.summary.get("compression") for r in finished)
    axes = [("privacy loss epsilon", lambda r: (r.summary.get("privacy") or {}).get("epsilon"),
             "tradeoff_epsilon.png", "differential privacy"),
            ("bytes uploaded (MB)", lambda r: r.summary["bytes_up"] / 1e6 if compressed else None,
             "tradeoff_bytes.png", "compression")]
    figures = []
    for xlabel, spent, name, what in axes:
        points = [(spent(r), metric.final(r), r.label) for r in finished]
        points = [p for p in points if p[0] is not None and math.isfinite(p[0])]
        if len(points) < 2:
            continue
        fig, ax = _new_axes(f"final test {metric.name} vs {xlabel}", xlabel, metric.axis_label("final test"))
        for x, y, label in sorted(points):
            ax.plot([x], [y], marker="o", linestyle="", label=label)
        metric.draw_chance(ax)
        if _spans_decades([x for x, _, _ in points]):  # epsilons
            ax.set_xscale("log")
        figures.append(_finish(fig, name, f"Final test {metric.name} against {xlabel}, one point per run ({what}).",
                               ax))
    return figures


ATTACK_SHARE = "attack.fraction"


def plot_robustness(runs: list[RunData], metric: Metric) -> list[Drawn]:
    """For a sweep over the share of attacking clients: the final metric against it, a panel per attack kind
    and a line per the other swept values (the aggregation rule, in the robustness study)."""
    finished = [r for r in runs if r.finished and ATTACK_SHARE in r.values]
    if len({r.values[ATTACK_SHARE] for r in finished}) < 2:
        return []
    kinds = list(dict.fromkeys(r.values.get("attack.kind", "") for r in finished))
    fig, axs = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.8), dpi=110, squeeze=False, sharey=True,
                            layout=LAYOUT)
    for ax, kind in zip(axs[0], kinds):
        lines: dict[str, list[tuple[float, float]]] = {}
        for run in finished:
            if run.values.get("attack.kind", "") == kind:
                rest = legend_label({k: v for k, v in run.values.items() if k not in (ATTACK_SHARE, "attack.kind")})
                lines.setdefault(rest, []).append((float(run.values[ATTACK_SHARE]), metric.final(run)))
        for rest, points in lines.items():
            points.sort()
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=rest or None)
        metric.draw_chance(ax)
        ax.set(title=kind or "attack", xlabel="share of attacking clients", ylabel=metric.axis_label("final test"))
        ax.grid(alpha=0.3)
    return [_finish(fig, "robustness.png", f"Final test {metric.name} against the share of attacking clients, "
                                           "a panel per attack.", axs[0][0])]


def plot_staleness(runs: list[RunData]) -> list[Drawn]:
    async_runs = [r for r in runs if r.finished and r.summary["mode"] == "async"]
    if not async_runs:
        return []
    fig, ax = _new_axes("staleness of asynchronous updates", "staleness (global versions behind)",
                        "updates (fraction of the run's)")
    width = 0.8 / len(async_runs)
    ax.set_xticks(sorted({int(s) for run in async_runs for s in run.summary["staleness"]["histogram"]}))
    for i, run in enumerate(async_runs):
        hist = {int(s): n for s, n in run.summary["staleness"]["histogram"].items()}
        total = sum(hist.values()) or 1
        ax.bar([s - 0.4 + width * (i + 0.5) for s in hist], [n / total for n in hist.values()], width=width,
               label=f"{run.label} (mean {run.summary['staleness']['mean']:.2f})")
    return [_finish(fig, "staleness.png", "How many versions behind each asynchronous update was when it reached "
                                          "the server.", ax)]


def plot_modality_contribution(runs: list[RunData], metric: Metric) -> list[Drawn]:
    """Per run evaluated with ablations, one panel: the metric over its steps with both modalities (full)
    and with each ablation's modality removed."""
    variants = [("full", metric.name, "-"),
                *((a, f"{a}/{metric.name}", style) for a, style in zip(ABLATIONS, ABLATION_STYLES))]
    panels = [(run, [run.curve(key) for _, key, _ in variants]) for run in runs]
    panels = [(run, curves) for run, curves in panels if any(curves[1:])]
    if not panels:
        return []
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    size = (6.4, 4.0) if len(panels) == 1 else (4.2 * cols, 3.3 * rows)  # one panel: as large as the other figures
    fig, axs = plt.subplots(rows, cols, figsize=size, dpi=110, sharey=True, squeeze=False, layout=LAYOUT)
    for i, (ax, (run, curves)) in enumerate(zip(axs.flat, panels)):
        for (name, _, style), curve, color in zip(variants, curves, ("C0", "C1", "C2")):
            if curve:
                ax.plot([p[0] for p in curve], [p[3] * metric.scale for p in curve], linestyle=style, color=color,
                        marker="o", ms=3, label=name)
        metric.draw_chance(ax)
        ax.set(xlabel=step_name([run]), ylabel=metric.axis_label("test") if i % cols == 0 else "")
        ax.set_title(run.label, fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axs.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"test {metric.name} with a modality removed")
    step = step_name(runs)
    return [_finish(fig, "modality_contribution.png",
                    f"Test {metric.name} against {step}, one panel per run: with both modalities (full, solid), "
                    "without images (no_image, dashed) and without text (no_text, dotted); the gap below full is "
                    "what the removed modality contributes.", axs.flat[0])]


# ------------------------------------------------------------------------------------------------ page
def _table(runs: list[RunData], metric: Metric) -> str:
    keys = list(dict.fromkeys(k for r in runs for k in r.values))
    header = ["run", *keys, "status", metric.axis_label("final"), "rounds", "simulated s", "wall s", "MB up+down",
              "updates"]
    rows = []
    for run in runs:
        s = run.summary or {}
        cells = [run.label, *(run.values.get(k, "") for k in keys), "done" if run.finished else "in progress",
                 f"{metric.final(run):.{2 if metric.scale == 100 else 4}f}",
                 s.get("rounds", len(run.records)),
                 f"{s['simulated_seconds']:.1f}" if s else "", f"{s['wall_seconds']:.1f}" if s else "",
                 f"{(s['bytes_up'] + s['bytes_down']) / 1e6:.2f}" if s else "", s.get("client_updates", "")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    return f"<table>{head}{''.join(rows)}</table>"


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555;font-size:0.9em}")


def draw_figures(runs: list[RunData], metric: Metric) -> list[Drawn]:
    return (plot_curves(runs, metric) + plot_modality_contribution(runs, metric) + plot_scaling(runs, metric)
            + plot_tradeoffs(runs, metric) + plot_robustness(runs, metric) + plot_staleness(runs))


def write_report(path: Path, metric: Optional[str] = None, out: Optional[Path] = None,
                 chance: Optional[float] = None) -> Path:
    """Write the PNGs and ``index.html`` into ``out`` (default PATH/report/); returns the HTML page.
    ``chance``: the metric's chance level as a fraction, for runs that did not record it (it wins over theirs)."""
    check_chance(chance, metric)
    runs = load_runs(path)
    plotted = plotted_metric(runs, metric, chance)
    out = out or path / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(runs, plotted)
    for figure in figures:
        figure.write(out)
    body = "".join(f'<figure><img src="{html.escape(f.name)}" alt="{html.escape(f.caption)}">'
                   f"<figcaption>{html.escape(f.caption)}</figcaption></figure>" for f in figures)
    chance_text = f"; chance level: {plotted.chance * plotted.scale:.3g}%" if plotted.chance is not None else ""
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedsim report: {html.escape(path.name)}"
            f"</title><style>{STYLE}</style></head><body><h1>fedsim report: {html.escape(path.name)}</h1>"
            f"<p>{len(runs)} run(s) from <code>{html.escape(str(path))}</code>; metric: {html.escape(plotted.name)}"
            f"{html.escape(chance_text)}.</p>{_table(runs, plotted)}{body}</body></html>")
    index = out / "index.html"
    atomic_write_text(index, page)
    return index
