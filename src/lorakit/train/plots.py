"""The end-of-run PNG: training loss and eval metric curves read from ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records (JSON objects) of a ``metrics.jsonl`` file; a torn last line from a kill is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def plot_curves(records: list[dict], path: str | os.PathLike) -> Path | None:
    """Plot train loss (and lr) and every eval metric against the step; write a PNG to ``path``.

    Returns the path, or None when there is nothing to plot. matplotlib is imported here, on the Agg
    backend, so a headless run never needs a display.
    """
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = sorted({k for r in evals for k, v in r.items() if k not in ("kind", "step", "epoch")
                    and isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, 1 + bool(names), figsize=(6 + 5 * bool(names), 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    for r in evals:
        if "loss" in r:
            ax.plot([e["step"] for e in evals if "loss" in e], [e["loss"] for e in evals if "loss" in e],
                    "o-", label="eval loss")
            break
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if names:
        ax2 = axes[0][1]
        for name in names:
            pts = [(r["step"], r[name]) for r in evals if name in r]
            ax2.plot([s for s, _ in pts], [v for _, v in pts], "o-", label=name)
        ax2.set_xlabel("step")
        ax2.set_ylabel("eval metric")
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
