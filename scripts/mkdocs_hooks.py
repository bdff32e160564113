"""mkdocs hook: the CLI reference page is generated from ``lorakit.cli.main.build_parser()`` at build time.

``docs/cli.md`` holds the marker below; every subcommand registered in ``COMMANDS`` appears with its
usage line and a table of its options (flags, default, help), so a new subcommand or flag needs no
documentation edit. Wired in ``mkdocs.yml`` (``hooks:``).
"""

from __future__ import annotations

import argparse

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


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
