"""The examples run and say what they claim."""

import runpy
from pathlib import Path


def test_quickstart(capsys):
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "reloaded output matches: True" in out
    assert "merged output matches: True" in out
    assert out.strip().endswith("Linear")
