"""The command reference (docs/commands.md): every option of every command a user runs, generated from the
commands' own argument parsers so that no flag goes undocumented.

Each command's ``main`` is run with ``--help`` while ``ArgumentParser.parse_args`` is intercepted: the parser
it built is captured and formatted at a fixed width, without its description (a script's module docstring,
which its own page or the results describe), and nothing else of ``main`` runs. The scripts of experiments/ and
cluster/ are read from the repository beside the package (they are not installed with it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
WIDTH = 100  # columns the help is formatted for, whatever the terminal generating the page

# (what a user types, the module that defines its main: a dotted name, or a script's path in the repository)
COMMANDS = (
    ("python -m fedsim.reference", "fedsim.reference"),
    ("python -m fedsim.models.tiny", "fedsim.models.tiny"),
    ("python experiments/fedmllm_table.py", "experiments/fedmllm_table.py"),
    ("python experiments/bench_stability.py", "experiments/bench_stability.py"),
    ("python experiments/bench_throughput.py", "experiments/bench_throughput.py"),
    ("python experiments/bench_sweep.py", "experiments/bench_sweep.py"),
    ("python experiments/bench_scaling.py", "experiments/bench_scaling.py"),
    ("python experiments/bench_memory.py", "experiments/bench_memory.py"),
    ("python experiments/bench_aggregator.py", "experiments/bench_aggregator.py"),
    ("python experiments/bench_statestore.py", "experiments/bench_statestore.py"),
    ("python experiments/chaos.py", "experiments/chaos.py"),
    ("python experiments/gpu_check.py", "experiments/gpu_check.py"),
    ("python cluster/local.py", "cluster/local.py"),
)

HEADER = """# Command reference

Every option of fedsim's commands and of the scripts in `experiments/` and `cluster/`, as their `--help`
prints it (descriptions left out). Generated from the commands' argument parsers by
`python -m fedsim.reference --write`; `tests/test_reference.py` fails when this page and the code disagree.
"""


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


@contextmanager
def _capturing_parsers(prog: str) -> Iterator[None]:
    """``parse_args`` raises with the parser instead of parsing; ``sys.argv`` names ``prog``."""
    original, argv = argparse.ArgumentParser.parse_args, sys.argv

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    sys.argv = [prog]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, sys.argv = original, argv


def _main_of(module: str) -> Callable:
    if module.endswith(".py"):
        name = f"_fedsim_command_{Path(module).stem}"  # registered: dataclasses look their module up by name
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, REPO / module)
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
        return sys.modules[name].main
    return importlib.import_module(module).main


def captured_parser(prog: str, main: Callable) -> argparse.ArgumentParser:
    """The parser ``main`` builds, with ``prog`` as its name."""
    with _capturing_parsers(prog):
        try:
            main()
        except _Captured as captured:
            parser = captured.parser
        else:
            raise RuntimeError(f"{prog}: its main() never parsed arguments")
    named = parser.prog  # argparse named it after sys.argv[0]'s basename, and its subcommands after that
    for sub in subcommands(parser).values():
        sub.prog = sub.prog.replace(named, prog, 1)
    parser.prog = prog
    return parser


def options_text(parser: argparse.ArgumentParser) -> str:
    """``parser``'s help without its description or epilog, formatted at WIDTH columns."""
    described = parser.description, parser.epilog
    parser.description = parser.epilog = None
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)  # argparse's formatter reads the width from here
    try:
        # defaults under the checkout read as repository paths, the same on every machine
        return parser.format_help().replace(f"{REPO}{os.sep}", "").rstrip() + "\n"
    finally:
        parser.description, parser.epilog = described
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _sections(parser: argparse.ArgumentParser) -> list[str]:
    """A section for ``parser`` and one for each of its subcommands."""
    own = f"## `{parser.prog}`\n\n```text\n{options_text(parser)}```\n"
    return [own] + [section for sub in subcommands(parser).values() for section in _sections(sub)]


def commands_reference() -> str:
    from fedsim.cli import build_parser

    sections = _sections(build_parser())
    for prog, module in COMMANDS:
        sections += _sections(captured_parser(prog, _main_of(module)))
    return HEADER + "\n" + "\n".join(sections)
