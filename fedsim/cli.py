"""The ``fedsim`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import datasets

from fedsim.checkpoint import check_checkpoint
from fedsim.config import ConfigError, load_config
from fedsim.output import default_run_dir

log = logging.getLogger("fedsim")


def _split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """``a.yaml b.yaml key=value ...`` -> (YAML layers, overrides)."""
    files = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if not files:
        raise ConfigError("no experiment YAML file given (before the key=value overrides)")
    if items[:len(files)] != files:
        raise ConfigError(f"YAML files must come before key=value overrides: got {' '.join(items)}")
    return files, overrides


def _load(args: argparse.Namespace):
    return load_config(*_split_config_args(args.config))  # every config error surfaces here, before any work


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.config:
            raise ConfigError("fedsim run --resume RUN_DIR takes no config files or overrides: the run "
                              "continues with the config.yaml it saved")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml")
        check_checkpoint(run_dir)  # before any work
        from fedsim.algorithms import SERVER_STRATEGIES

        if SERVER_STRATEGIES[cfg.algorithm.server.name].asynchronous:
            raise ConfigError(f"{run_dir} ran {cfg.algorithm.server.name}: asynchronous runs are not "
                              "checkpointed yet, so they cannot be resumed")
    else:
        cfg = _load(args)
        run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg.name)
    cfg.output.dir = str(run_dir)
    from fedsim.engine import ENGINES

    summary = ENGINES[cfg.runtime.engine](cfg, run_dir, resume=bool(args.resume))
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


CONFIG_HELP = ("experiment YAML file(s), merged in order, then key=value overrides, e.g. "
               "experiments/quickstart.yaml federation.rounds=5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment")
    run.add_argument("config", nargs="*", metavar="CONFIG", help=CONFIG_HELP)
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoint (RUN_DIR/checkpoint/)")
    run.set_defaults(func=_run)
    part = sub.add_parser("partition", help="show what each client holds (samples, labels, modalities) and plot it")
    part.add_argument("config", nargs="+", metavar="CONFIG", help=CONFIG_HELP)
    part.add_argument("--out", help="PNG to write (default: <experiment name>-partition.png)")
    part.set_defaults(func=_partition)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    datasets.disable_progress_bars()  # per-step bars of dataset transforms drown the command's own output
    for noisy in ("httpx", "urllib3", "filelock", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
