"""PNG figures of an analysis (matplotlib, imported lazily, Agg backend): spectra, φ heatmaps, amplification."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

MAX_PANELS = 6  # heatmap columns (layers) per matrix type; evenly spaced when a model has more


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("lorakit analyze's figures need matplotlib: pip install 'lorakit[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def group_of(module: str) -> tuple[str, int | None]:
    """``("…layer.{}.attention.self.query", 3)``: the module path with its block index taken out."""
    m = re.search(r"\.(\d+)\.", f".{module}.")
    if not m:
        return module, None
    return module[: m.start(1) - 1] + "{}" + module[m.end(1) - 1:], int(m.group(1))


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(group_of(row["module"])[0], []).append(row)
    return out


def _short(group: str) -> str:
    """A panel label: the last two path components after the block index (``self.query``, ``attn.c_attn``)."""
    tail = group.split("{}")[-1].strip(".") or group.replace("{}", "*")
    return ".".join(tail.split(".")[-2:])


def _label(path: str) -> str:
    """An adapter's name in a title: its directory without a trailing ``adapter`` (``r8-run/seed0``)."""
    parts = [p for p in Path(path).parts if p not in ("adapter", "/")]
    return "/".join(parts[-2:])


def plot_spectra(report: dict, path: Path) -> Path:
    """Singular values of every ΔW, normalised by the largest, one panel per matrix type (lines: layers)."""
    plt = _pyplot()
    groups = _groups(report["layers"])
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (group, rows) in zip(axes[0], groups.items(), strict=True):
        for row in rows:
            s = row["singular_values"]
            if s and s[0] > 0:
                ax.semilogy(range(1, len(s) + 1), [v / s[0] for v in s], marker=".",
                            label=f"layer {group_of(row['module'])[1]}")
        ax.set(title=_short(group), xlabel="i", ylabel="σ_i / σ_1")
        ax.grid(alpha=0.3)
        if len(rows) <= 12:
            ax.legend(fontsize=7)
    fig.suptitle(f"spectrum of ΔW = s·B·A: {_label(report['path'])}", fontsize=9, y=1.03)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_similarity(pair: dict, path: Path, zoom: int | None = None, key: str = "phi") -> Path:
    """Figure 3: ``φ(A1, A2, i, j)`` heatmaps, rows = matrix types, columns = layers (``zoom``: i, j <= zoom;
    ``key="phi_delta_out"``: the output subspaces of the two ΔW instead of A's input subspaces)."""
    plt = _pyplot()
    groups = _groups(pair["layers"])
    ncol = min(MAX_PANELS, max(len(rows) for rows in groups.values()))
    fig, axes = plt.subplots(len(groups), ncol, figsize=(2.6 * ncol + 1, 2.8 * len(groups)), squeeze=False)
    fig.subplots_adjust(hspace=0.6, wspace=0.35)
    image = None
    for r, (group, rows) in enumerate(groups.items()):
        picks = [rows[round(k * (len(rows) - 1) / max(1, ncol - 1))] for k in range(ncol)] if len(rows) > ncol else rows
        for c in range(ncol):
            ax = axes[r][c]
            if c >= len(picks):
                ax.axis("off")
                continue
            row = picks[c]
            phi = [line[:zoom] for line in row[key][:zoom]] if zoom else row[key]
            image = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest",
                              extent=(0.5, len(phi[0]) + 0.5, len(phi) + 0.5, 0.5))
            ax.set_title(f"{_short(group)}, layer {group_of(row['module'])[1]}", fontsize=7)
            ax.set_xlabel("j", fontsize=7)
            ax.set_ylabel("i", fontsize=7)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.yaxis.get_major_locator().set_params(integer=True)
            ax.tick_params(labelsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="φ")
    a, b = (_label(p) for p in pair["paths"])
    what = "A's input subspaces" if key == "phi" else "ΔW's output subspaces"
    fig.suptitle(f"subspace similarity φ(i, j) of {what}: {a} (i) vs {b} (j)" + (f", i, j ≤ {zoom}" if zoom else ""),
                 fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_amplification(report: dict, path: Path) -> Path:
    """Table 7 per module: ``||ΔW|| / ||Uᵀ W0 V||`` with U, V from ΔW, from W0's top-r, and random."""
    plt = _pyplot()
    rows = [row for row in report["layers"] if "amplification" in row]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rows) + 2), 3.6))
    x = list(range(len(rows)))
    for k, (key, label) in enumerate((("proj_delta", "U, V from ΔW"), ("proj_w0", "U, V from W0 (top r)"),
                                      ("proj_random", "random U, V"))):
        vals = [row["amplification"]["delta_norm"] / row["amplification"][key]
                if row["amplification"][key] > 0 else math.nan for row in rows]
        ax.bar([i + (k - 1) * 0.27 for i in x], vals, width=0.27, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{_short(group_of(r['module'])[0])} {group_of(r['module'])[1]}" for r in rows],
                  rotation=90, fontsize=7)
    ax.set_ylabel("||ΔW||_F / ||Uᵀ W0 V||_F")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"amplification factor: {_label(report['path'])}", fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out
