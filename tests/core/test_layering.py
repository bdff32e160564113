"""core stays the bottom layer: its modules import only each other, lorakit.files, torch, safetensors and the
standard library, all at module top (no import inside a function): never ops, variants, layers, train, serve,
cli or transformers."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import lorakit

CORE = Path(lorakit.__file__).parent / "core"
ALLOWED_TOP = {"torch", "safetensors"} | set(sys.stdlib_module_names)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, relative level, at module top) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, 0, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level, id(node) in top))
    return out


def test_core_imports_only_itself_files_and_its_dependencies():
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 7
    for path in files:
        for module, level, at_top in _imports(path):
            where = f"{path.name} imports {'.' * level}{module}"
            assert at_top, f"{where} inside a function"
            if level == 1:
                continue  # a sibling core module
            if level == 2:
                assert module == "files", where  # lorakit.files: atomic writes, byte-stable safetensors
                continue
            assert level == 0 and module.split(".")[0] in ALLOWED_TOP, where

