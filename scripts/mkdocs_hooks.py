"""mkdocs hooks (wired in ``mkdocs.yml``): the generated CLI reference, and no page left out of the nav.

- ``docs/cli.md`` holds the marker below; every subcommand registered in ``COMMANDS`` appears with its
  usage line and a table of its options (flags, default, help), so a new subcommand or flag needs no
  documentation edit.
- A page under ``docs/`` that ``nav`` does not list is appended to it under its first ``# `` heading, so
  a page added by another change is on the site (and ``--strict`` does not fail on it) until it gets
  its place in ``nav``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MARKER = "<!-- cli-reference -->"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:  # a positional argument
        return f"`{action.metavar or action.dest.upper()}`"
    metavar = ""
    if action.nargs != 0:
        metavar = " " + (" ".join(action.metavar) if isinstance(action.metavar, tuple)
                         else action.metavar or action.dest.upper())
    return ", ".join(f"`{n}{metavar}`" for n in action.option_strings)


def _default(action: argparse.Action) -> str:
    if action.required or not action.option_strings:
        return "required"
    if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
        return ""
    return f"`{action.default}`"


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown for every subcommand of the ``lorakit`` parser."""
    if parser is None:
        from lorakit.cli.main import build_parser

        parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = []
    for name, p in sub.choices.items():
        usage = p.format_usage().strip()
        parts += [f"## lorakit {name}", "", _cell(p.description or ""), "", "```text", usage, "```", "",
                  "| option | default | meaning |", "|---|---|---|"]
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            help_text = "" if action.help == argparse.SUPPRESS else (action.help or "")
            if action.choices and not isinstance(action.choices, dict):
                help_text += f" (one of: {', '.join(map(str, action.choices))})"
            parts.append(f"| {_flags(action)} | {_cell(_default(action))} | {_cell(help_text.strip())} |")
        parts.append("")
    return "\n".join(parts)


def _listed(nav: list) -> set[str]:
    out: set[str] = set()
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out |= _listed(value)
        else:
            out.add(str(value))
    return out


def unlisted_pages(docs_dir: str | Path, nav: list) -> list[dict[str, str]]:
    """Nav entries ``{title: file}`` for the top-level pages of ``docs_dir`` that ``nav`` leaves out."""
    listed, out = _listed(nav), []
    for page in sorted(Path(docs_dir).glob("*.md")):
        if page.name not in listed:
            heading = next((line[2:].strip() for line in page.read_text(encoding="utf-8").splitlines()
                            if line.startswith("# ")), page.stem)
            out.append({heading: page.name})
    return out


def on_config(config):  # mkdocs hook
    if config["nav"] is not None:
        config["nav"] = list(config["nav"]) + unlisted_pages(config["docs_dir"], config["nav"])
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
