"""The ``fedsim`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedsim.config import ConfigError, load_config
from fedsim.output import default_run_dir

log = logging.getLogger("fedsim")


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # every config error surfaces here, before any work
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg.name)
    cfg.output.dir = str(run_dir)
    from fedsim.engine import ENGINES

    summary = ENGINES[cfg.runtime.engine](cfg, run_dir)
    print(json.dumps({k: summary[k] for k in ("run_dir", "rounds", "client_updates", "final_metrics",
                                              "zero_shot_metrics", "wall_seconds", "adapter_sha256")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment")
    run.add_argument("config", help="experiment YAML file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=5")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
