"""Docs that must match the code: the config reference and the README's commands."""

import re
from pathlib import Path

from moelab.cli import build_parser
from moelab.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_training_doc_config_reference_matches_dataclasses():
    text = (ROOT / "docs" / "TRAINING.md").read_text()
    block = re.search(r"<!-- config-reference:start -->\n(.*)<!-- config-reference:end -->", text, re.S)
    assert block, "docs/TRAINING.md lost its config-reference markers"
    assert block.group(1).strip() == reference_markdown().strip(), (
        "docs/TRAINING.md's config reference is stale: regenerate it with moelab.config.reference_markdown()"
    )


def test_readme_commands_exist_in_the_cli():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    for command in re.findall(r"^\| `moelab (\w[\w-]*)", readme, re.M):
        assert command in subcommands, f"README documents `moelab {command}` but the CLI has no such command"
