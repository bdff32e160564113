"""``lorakit`` command line: one module per subcommand, each thin over the library.

Options come from flags and/or ``--config FILE.yaml`` (keys are the flags' names with ``_`` or ``-``);
flags win. Bad input ends with a one-line ``lorakit: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import analyze as analyze_cmd
from . import eval as eval_cmd
from . import generate as generate_cmd
from . import inspect as inspect_cmd
from . import merge as merge_cmd
from . import train as train_cmd

COMMANDS = {
    "train": train_cmd,
    "eval": eval_cmd,
    "merge": merge_cmd,
    "inspect": inspect_cmd,
    "generate": generate_cmd,
    "analyze": analyze_cmd,
}


class UsageError(ValueError):
    """Bad command-line or config input (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA adapters for PyTorch / transformers models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file (flags win)")
        module.add_arguments(p)
        p.set_defaults(run=module.run, _parser=p)
    return parser


def _apply_yaml(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    import yaml

    path = Path(args.config)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    sub = args._parser
    known = {a.dest for a in sub._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            raise UsageError(f"config file {path}: unknown option {key!r}")
        defaults[dest] = value
    sub.set_defaults(**defaults)  # flags given on the command line still win
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = _apply_yaml(parser, argv)
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, KeyError, FileNotFoundError, ImportError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"lorakit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
