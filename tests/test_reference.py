"""The configuration reference (docs/configuration.md) matches the code it is generated from."""

from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from fedsim import config, reference
from fedsim.config import ConfigError, ExperimentConfig, check_values
from fedsim.cli import build_parser
from fedsim.commands_reference import COMMANDS, _main_of, captured_parser, commands_reference, subcommands
from fedsim.reference import KeyRules, configuration_reference, section_markdown
from fedsim.run_files import outputs_reference

from conftest import REPO

PAGE_TEXT = configuration_reference()


def leaf_keys(section: Any, key: str = "") -> Iterator[str]:
    """The dotted keys of the values in ``section`` that are not themselves dataclasses."""
    for item in dataclasses.fields(section):
        dotted = f"{key}.{item.name}" if key else item.name
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_keys(value, dotted)
        else:
            yield dotted


def row_cells(key: str, page: str = PAGE_TEXT) -> dict[str, str]:
    """The cells of ``key``'s table row by column name, with ``\\|`` unescaped."""
    rows = [line for line in page.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"{key} has {len(rows)} rows"
    cells = [cell.strip().replace(r"\|", "|") for cell in re.split(r"(?<!\\)\|", rows[0])[1:-1]]
    return dict(zip(["key", "type", "default", "allowed", "description", "refused unless"], cells))


def set_key(cfg: ExperimentConfig, dotted: str, value: Any) -> None:
    *sections, name = dotted.split(".")
    for section in sections:
        cfg = getattr(cfg, section)
    setattr(cfg, name, value)


def test_committed_page_is_current():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == PAGE_TEXT, "docs/configuration.md differs from the code: run python -m fedsim.reference --write"


def test_every_key_has_one_row():
    keys = list(leaf_keys(ExperimentConfig()))
    rows = [line for line in PAGE_TEXT.splitlines() if line.startswith("| `")]
    assert len(rows) == len(keys)
    for key in keys:
        row_cells(key)


def test_allowed_values_come_from_the_checks():
    allowed = row_cells("attack.kind")["allowed"]
    assert all(choice in allowed for choice in config.CHOICES["attack.kind"])
    for keys, text in ((config.POSITIVE, "> 0"), (config.NON_NEGATIVE, ">= 0"), (config.UNIT_INTERVAL, "in [0, 1]")):
        for key in keys:
            assert text in row_cells(key)["allowed"], key


def test_refusals_of_validation_are_listed():
    tree = ast.parse((REPO / "fedsim" / "validation.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "fail"
             and isinstance(node.args[0], ast.Constant) and node.args[0].value == "attack.scale"]
    assert calls, "validation.py no longer checks attack.scale: pick another key for this test"
    refused = row_cells("attack.scale")["refused unless"]
    for call in calls:
        for part in ast.walk(call.args[2]):
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                assert part.value in refused


@pytest.mark.parametrize("key, bad_values", [
    ("training.momentum", {"training.momentum": 0.5}),  # with the default optimizer, adamw
    ("partition.num_clients", {"data.num_train": 10}),
    ("federation.clients_per_round", {"federation.clients_per_round": 30}),
])
def test_refusal_templates_match_the_errors_raised(key, bad_values):
    cfg = ExperimentConfig()
    for dotted, value in bad_values.items():
        set_key(cfg, dotted, value)
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'") as err:
        check_values(cfg)
    expected = str(err.value).split(": expected ", 1)[1]
    templates = row_cells(key)["refused unless"].split("<br>")
    patterns = [".+".join(re.escape(part) for part in template.split("{...}")) for template in templates]
    assert any(re.fullmatch(pattern, expected) for pattern in patterns), (expected, templates)


@dataclass
class Widget:
    """A section made up for this test."""

    size: int = 3  # how many parts


@dataclass
class CommentedWidget:
    """A section made up for this test."""

    # counted after assembly
    size: int = 3  # how many parts


def test_comments_and_defaults_reach_the_page():
    rules = KeyRules(allowed={"widget.size": ["> 0"]}, refused_unless={"widget.size": ["a value {...}"]})
    cells = row_cells("widget.size", section_markdown("widget", Widget(), rules))
    assert cells == {"key": "`widget.size`", "type": "`int`", "default": "`3`", "allowed": "> 0",
                     "description": "how many parts", "refused unless": "a value {...}"}
    assert "A section made up for this test." in section_markdown("widget", Widget(), rules)
    # the page renders a default-built ExperimentConfig(): another default is another instance value
    assert row_cells("widget.size", section_markdown("widget", Widget(size=4), rules))["default"] == "`4`"
    commented = row_cells("widget.size", section_markdown("widget", CommentedWidget(), rules))
    assert commented["description"] == "counted after assembly how many parts"


def test_write_replaces_every_page(tmp_path, monkeypatch):
    for name in ("PAGE", "OUTPUTS_PAGE", "COMMANDS_PAGE"):
        monkeypatch.setattr(reference, name, tmp_path / getattr(reference, name).name)
    (tmp_path / "configuration.md").write_text("stale")
    reference.main(["--write"])
    assert (tmp_path / "configuration.md").read_text() == PAGE_TEXT
    assert (tmp_path / "outputs.md").read_text() == outputs_reference()
    assert (tmp_path / "commands.md").read_text() == commands_reference()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["commands.md", "configuration.md", "outputs.md"]  # no temporary file left


def test_the_command_page_is_current_and_names_every_option():
    page = commands_reference()
    assert (REPO / "docs" / "commands.md").read_text() == page, (
        "docs/commands.md differs from the code: run python -m fedsim.reference --write")
    tops = [build_parser(), *(captured_parser(prog, _main_of(module)) for prog, module in COMMANDS)]
    for parser in [*tops, *(sub for top in tops for sub in subcommands(top).values())]:
        assert f"## `{parser.prog}`" in page
        for action in parser._actions:
            for flag in action.option_strings:
                assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", page, re.M), f"{parser.prog} {flag} missing"
    assert "/work/" not in page and str(REPO) not in page  # nothing of the machine that generated it
