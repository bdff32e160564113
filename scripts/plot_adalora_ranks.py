"""Figure of an AdaLoRA run: the final rank of every adapted matrix (layer x matrix) and the budget schedule.

    python scripts/plot_adalora_ranks.py RUN_DIR OUT.png

``RUN_DIR`` is a ``lorakit train --method adalora`` output directory: the ranks come from the saved
adapter (``adapter/``; a matrix pruned to rank 0 is saved as a zero rank-1 pair), the schedule from
``run_args.json`` and the step count in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from lorakit.variants.adalora import budget_schedule

# module path after "layer.<i>." -> column label (BERT-style encoders)
SHORT = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.output.dense": "attn.out", "intermediate.dense": "ffn.in", "output.dense": "ffn.out"}


def final_ranks(run: Path) -> dict[tuple[int, str], int]:
    """(layer, matrix) -> final live rank; a matrix pruned to rank 0 is saved as a zero rank-1 pair."""
    from safetensors.torch import load_file

    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    ranks = {}
    for key, A in tensors.items():
        m = re.search(r"layer\.(\d+)\.(.+)\.lora_A\.weight$", key)
        if m:
            ranks[(int(m.group(1)), SHORT.get(m.group(2), m.group(2)))] = A.shape[0] if A.any() else 0
    return ranks


def main(run: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run)
    args = json.loads((run_dir / "run_args.json").read_text())
    ranks = final_ranks(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    total = max(r["step"] for r in records)
    layers = sorted({layer for layer, _ in ranks} | set(range(max(layer for layer, _ in ranks) + 1)))
    cols = list(SHORT.values()) + sorted({m for _, m in ranks} - set(SHORT.values()))
    grid = np.array([[ranks.get((layer, c), 0) for c in cols] for layer in layers])
    r0 = args["init_rank"] or args["r"]
    n = len(layers) * len(cols)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=r0)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, str(grid[i, j]), ha="center", va="center", color="white" if grid[i, j] < r0 / 2 else "black")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_title(f"final rank per matrix (start {r0}, target mean {args['target_rank']})")
    fig.colorbar(im, ax=ax, fraction=0.046)

    tinit = total // 10 if args["tinit"] is None else args["tinit"]
    tfinal = total // 5 if args["tfinal"] is None else args["tfinal"]
    steps = np.arange(1, total + 1)
    sched = [budget_schedule(int(t), r0 * n, args["target_rank"] * n, total, tinit, tfinal) for t in steps]
    dt = args["delta_t"]
    held, current = [], r0 * n
    for t, b in zip(steps, sched, strict=True):  # what is in force: updated at multiples of delta_t
        if (t >= tinit and t % dt == 0) or t >= total - tfinal:
            current = b
        held.append(current)
    bx.plot(steps, sched, color="0.6", label="b(t), eq. 12")
    bx.step(steps, held, where="post", color="C1", label=f"in force (re-allocated every {dt} steps)")
    bx.axvline(tinit, ls=":", color="0.4")
    bx.axvline(total - tfinal, ls=":", color="0.4")
    bx.set_xlabel("optimizer step")
    bx.set_ylabel("live triplets (total rank)")
    bx.set_title(f"budget: {r0 * n} -> {args['target_rank'] * n}, tinit={tinit}, tfinal={tfinal}")
    bx.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}: ranks by layer {grid.sum(1).tolist()}, by matrix {dict(zip(cols, grid.sum(0).tolist(), strict=True))}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
