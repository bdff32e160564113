"""The documentation site's generated and copied parts: the CLI reference covers every subcommand and
option of the parser, and the getting-started page carries the README's two commands verbatim."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from lorakit.cli.main import COMMANDS, build_parser

ROOT = Path(__file__).parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_lists_every_subcommand_and_option():
    hooks = _hooks()
    page = hooks.cli_reference()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert re.findall(r"^## lorakit (\S+)$", page, flags=re.M) == list(COMMANDS) == list(sub.choices)
    for name, parser in sub.choices.items():
        section = page.split(f"## lorakit {name}\n", 1)[1].split("\n## lorakit ", 1)[0]
        for action in parser._actions:
            if not action.option_strings:
                assert f"`{action.metavar or action.dest.upper()}` | required" in section
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section, f"{name}: {flag} missing from the CLI reference"
    # the page's marker is what the hook replaces
    assert hooks.MARKER in (ROOT / "docs" / "cli.md").read_text()
    assert hooks.MARKER not in hooks.on_page_markdown((ROOT / "docs" / "cli.md").read_text(), None, None, None)


def test_getting_started_carries_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    assert "lorakit train" in commands and "pytest" in commands
    assert f"```bash\n{commands}```" in (ROOT / "docs" / "getting-started.md").read_text()


def test_pages_missing_from_the_nav_are_appended(tmp_path):
    hooks = _hooks()
    (tmp_path / "a.md").write_text("# Page A\n")
    (tmp_path / "b.md").write_text("no heading\n")
    nav = [{"Home": "a.md"}, {"Group": [{"x": "x.md"}]}]
    assert hooks.unlisted_pages(tmp_path, nav) == [{"b": "b.md"}]
    assert hooks.unlisted_pages(ROOT / "docs", [])[0] == {"API reference": "api.md"}
