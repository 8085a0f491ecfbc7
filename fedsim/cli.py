"""fedsim: simulate federated fine-tuning of multimodal LLMs (4-bit backbones, LoRA adapters), on Ray or in
one process. "fedsim COMMAND --help" says more about each command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from fedsim import __version__
from fedsim.checkpoint import check_checkpoint
from fedsim.config import ConfigError, ExperimentConfig, merge_config
from fedsim.output import default_run_dir
from fedsim.plugins import resolved
from fedsim.runlock import DirectoryInUse, run_lock
from fedsim.statestore import StateStoreError
from fedsim.validation import load_config

log = logging.getLogger("fedsim")


QUICKSTART = Path(__file__).with_name("quickstart.yaml")  # the embedded default of ``fedsim run``


def _split_config_args(items: list[str], default: Path | None = None) -> tuple[list[str], list[str]]:
    """``a.yaml b.yaml key=value ...`` -> (YAML layers, overrides); ``default`` when no YAML is given."""
    files = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if not files and default is not None:
        log.info("no experiment YAML given: running the quickstart (%s)", default)
        return [str(default)], overrides
    if not files:
        raise ConfigError("no experiment YAML file given (before the key=value overrides)")
    if items[:len(files)] != files:
        raise ConfigError(f"YAML files must come before key=value overrides: got {' '.join(items)}")
    return files, overrides


def _load(args: argparse.Namespace, default: Path | None = None):
    # every config error surfaces here, before any work
    return load_config(*_split_config_args(args.config, default))


TRUST_KEY, ADDRESS_KEY, PLUGINS_KEY = "model.trust_remote_code", "runtime.address", "plugins"


def plugins_override(plugins: list[str]) -> str:
    return f"{PLUGINS_KEY}={json.dumps(plugins)}"


def _resume_config(run_dir: Path, items: list[str]) -> ExperimentConfig:
    """The config a run saved, refused when it turns on remote code that ``items`` (the command line after
    ``--resume RUN_DIR``) does not confirm with ``model.trust_remote_code=true``, and without its
    ``runtime.address`` unless ``items`` gives one, and refused when it imports plugins that ``items`` does not
    repeat (``plugins=[...]``), before any of them is imported.

    A run directory may come from someone else: with remote code on, loading the model runs the Python
    files that come with it, plugins are Python code too, and a saved address points the driver at someone
    else's cluster.
    """
    if any(item.split("=", 1)[0] not in (TRUST_KEY, ADDRESS_KEY, PLUGINS_KEY) for item in items):
        raise ConfigError(f"fedsim run --resume RUN_DIR takes no config files or overrides (got {' '.join(items)}): "
                          f"the run continues with the config.yaml it saved; only {TRUST_KEY}=true may follow, "
                          f"to confirm a saved config that runs the model's own code, {PLUGINS_KEY}=[...], to "
                          f"confirm the plugins it imports, and {ADDRESS_KEY}=..., the Ray cluster to join")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    given = {item.split("=", 1)[0] for item in items}
    plugins = merge_config(saved).plugins  # not imported yet: that runs their code
    if plugins and (PLUGINS_KEY not in given or resolved(merge_config(saved, items).plugins) != plugins):
        raise ConfigError(
            f"{saved} imports plugins {plugins}: resuming would run their code on this machine and on every "
            "worker. A run directory may come from someone else; if you trust them, say so: fedsim run --resume "
            f"{run_dir} '{plugins_override(plugins)}'")
    cfg = load_config(saved)
    confirmed = load_config(saved, items)  # the command line's values, parsed as any override is
    trusted = TRUST_KEY in given and confirmed.model.trust_remote_code
    if cfg.model.trust_remote_code and not trusted:
        raise ConfigError(
            f"{saved} sets {TRUST_KEY}=true: resuming would run the Python code that comes with model "
            f"{cfg.model.name!r} on this machine and on every worker. A run directory may come from someone "
            f"else; if you trust this config and that model, say so: fedsim run --resume {run_dir} {TRUST_KEY}=true")
    if trusted and not cfg.model.trust_remote_code:
        log.warning("%s=true on the command line changes nothing: %s does not run remote code", TRUST_KEY, saved)
    if cfg.runtime.address and ADDRESS_KEY not in given:
        log.warning("%s sets %s=%s: ignored, since a run directory may come from someone else (this run joins "
                    "RAY_ADDRESS or a local instance); to resume on that cluster, say so: fedsim run --resume %s "
                    "%s=%s", saved, ADDRESS_KEY, cfg.runtime.address, run_dir, ADDRESS_KEY, cfg.runtime.address)
    cfg.runtime.address = confirmed.runtime.address if ADDRESS_KEY in given else None
    return cfg


def resume_overrides(cfg: ExperimentConfig) -> list[str]:
    """What ``fedsim run --resume`` needs after RUN_DIR to continue a run of ``cfg`` as ``cfg`` asks: the
    confirmations of the saved values it does not trust on its own."""
    return ([f"{TRUST_KEY}=true"] if cfg.model.trust_remote_code else []) + \
        ([plugins_override(cfg.plugins)] if cfg.plugins else []) + \
        ([f"{ADDRESS_KEY}={cfg.runtime.address}"] if cfg.runtime.address else [])


def _how_to_continue(run_dir: Path) -> str:
    try:
        check_checkpoint(run_dir)
    except FileNotFoundError:
        return "it left no checkpoint: run it again once that is fixed"
    return f"once that is fixed, continue it with: fedsim run --resume {run_dir}"


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = Path(args.resume)
        cfg = _resume_config(run_dir, args.config)
    else:
        cfg = _load(args, default=QUICKSTART)
        run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg.name)
        run_dir.mkdir(parents=True, exist_ok=True)  # to hold the lock
    cfg.output.dir = str(run_dir)
    with run_lock(run_dir):  # one writer per run directory, refused here, before any work
        if args.resume:
            check_checkpoint(run_dir)
        from fedsim.engine import ENGINES

        try:
            summary = ENGINES[cfg.runtime.engine](cfg, run_dir, resume=bool(args.resume))
        except OSError as err:  # a full disk, say: the last complete checkpoint, if any, is still there
            print(f"fedsim: error: {err}\nfedsim: the run stopped; {_how_to_continue(run_dir)}", file=sys.stderr)
            return 1
    print(json.dumps({k: summary[k] for k in ("run_dir", "rounds", "client_updates", "final_metrics",
                                              "zero_shot_metrics", "wall_seconds", "adapter_sha256")}, indent=2))
    return 0


def _partition(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from fedsim.partition_report import format_report, partition_report, plot_report

    report = partition_report(cfg)
    print(format_report(report))
    out = plot_report(report, Path(args.out) if args.out else Path(f"{cfg.name}-partition.png"))
    print(f"figure: {out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedsim.sweep import Sweep

    files, overrides = _split_config_args(args.config)
    sweep = Sweep.plan(files, overrides, args.grid or [], args.out)  # every point's config checked here
    # A terminated sweep stops its runs in flight (they continue from their checkpoints next time).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    failed = sweep.run(args.parallel)
    print(f"sweep: {sweep.dir / 'sweep.csv'} ({len(sweep.points())} runs, {len(failed)} failed)")
    for point in failed:
        print(f"  failed: {point.label} (log: {sweep.dir / (point.label + '.log')})", file=sys.stderr)
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from fedsim.report import write_report

    try:
        page = write_report(Path(args.path), args.metric, Path(args.out) if args.out else None, args.chance)
    except ValueError as err:  # a --metric the runs never evaluated, a --chance that is no fraction
        raise ConfigError(str(err)) from None
    print(f"report: {page}")
    return 0


CONFIG_HELP = ("experiment YAML file(s), merged in order, then key=value overrides, e.g. "
               "experiments/quickstart.yaml federation.rounds=5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run one experiment (without a config: the quickstart)")
    run.add_argument("config", nargs="*", metavar="CONFIG", help=CONFIG_HELP)
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoint (RUN_DIR/checkpoint/) with the "
                          f"config it saved; a config with {TRUST_KEY}=true resumes only with that override "
                          "repeated after RUN_DIR, and a saved runtime.address is ignored unless given again "
                          "after RUN_DIR (runtime.address=...)")
    run.set_defaults(func=_run)
    part = sub.add_parser("partition", help="show what each client holds and plot it")
    part.add_argument("config", nargs="+", metavar="CONFIG", help=CONFIG_HELP)
    part.add_argument("--out", help="PNG to write (default: <experiment name>-partition.png)")
    part.set_defaults(func=_partition)
    sweep = sub.add_parser("sweep", help="run a grid of config values, one run per point",
                           description="Runs every point of the grid as its own run under one sweep directory "
                                       "and writes sweep.csv. Run the same command again to continue an "
                                       "interrupted sweep: finished runs are skipped.")
    sweep.add_argument("config", nargs="+", metavar="CONFIG", help=CONFIG_HELP + "; may follow the options")
    sweep.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                       help="a swept key and its values (repeatable); replaces the YAML's sweep.grid entry")
    sweep.add_argument("--parallel", type=int, default=1,
                       help="runs at once; on the Ray engine they share one Ray instance: the cluster at "
                            "RAY_ADDRESS if set, else a local one the sweep starts for all its runs; default 1")
    sweep.add_argument("--out", help="sweep directory (default runs/sweep-<experiment name>)")
    sweep.set_defaults(func=_sweep)
    report = sub.add_parser("report", help="plot a run or a sweep (PNG figures and an HTML page)")
    report.add_argument("path", metavar="RUN_OR_SWEEP_DIR")
    report.add_argument("--metric", help="evaluation metric to plot (default: the runs' headline metric, else the "
                                          "first of accuracy, macro_f1, token_f1 they evaluated)")
    report.add_argument("--out", help="folder for the figures and index.html (default RUN_OR_SWEEP_DIR/report)")
    report.add_argument("--chance", type=float, help="chance level of the metric as a fraction (0.25: 4 options), "
                                                     "drawn as a line; for runs whose summary.json predates "
                                                     "chance_metrics (it wins over what runs recorded)")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "sweep" and all("=" in e and not e.startswith("-") for e in extra):
        args.config += extra  # key=value overrides after --grid options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # per-step bars of dataset transforms drown the command's own output; datasets reads this when first imported,
    # here only by the processes that build data (the in-process engine, Ray workers)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # already imported by the caller of main()
        sys.modules["datasets"].disable_progress_bars()
    for noisy in ("httpx", "urllib3", "filelock", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, DirectoryInUse, StateStoreError) as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
