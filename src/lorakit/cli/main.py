"""``lorakit`` command line: one module per subcommand, each thin over the library.

Options come from flags and/or ``--config FILE.yaml`` (keys are the flags' names with ``_`` or ``-``);
flags win. Bad input ends with a one-line ``lorakit: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import eval as eval_cmd
from . import generate as generate_cmd
from . import inspect as inspect_cmd
from . import merge as merge_cmd
from . import train as train_cmd
from .options import OneLineParser, UsageError, file_values

__all__ = ["COMMANDS", "UsageError", "build_parser", "main", "parse"]

COMMANDS = {
    "train": train_cmd,
    "eval": eval_cmd,
    "merge": merge_cmd,
    "inspect": inspect_cmd,
    "generate": generate_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lorakit", description="LoRA adapters for PyTorch / transformers models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file (flags win)")
        module.add_arguments(p)
        p.set_defaults(run=module.run, _parser=p)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags, over ``--config`` YAML values (each checked as if typed as a flag). ``args._given`` holds the
    options given as flags on the command line."""
    args = parser.parse_args(argv)
    sub = args._parser
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
            raise UsageError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        sub.set_defaults(**file_values(sub, values, f"config file {path}", skip=("run", "_parser")))
        args = parser.parse_args(argv)  # flags given on the command line still win
    # parse the flags again over placeholders: argparse replaces exactly the ones given (append actions copy)
    unset = {dest: [] if isinstance(getattr(args, dest), list) else object() for dest in vars(args)}
    flags = sub.parse_args(argv[argv.index(args.command) + 1:], argparse.Namespace(**unset))
    args._given = {k for k, v in vars(flags).items() if v is not unset.get(k)}
    return args


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip().splitlines() or [category.__name__]
    print(f"lorakit: warning: {text[0]}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            args = parse(parser, argv)
            return args.run(args) or 0
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, ImportError, RecursionError) as e:  # bad input: one line, exit 2
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"lorakit: error: {(message.strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
