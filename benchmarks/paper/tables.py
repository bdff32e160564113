"""Render benchmarks/paper/README.md from the results files (``results/*.json[l]``); runs in a second.

    python benchmarks/paper/tables.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from budgets import BUDGETS, SIZES, budget_of

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
METHODS = [("full", "Full fine-tuning"), ("bitfit", "BitFit"), ("head", "Head only"),
           ("adapter", "Adapter (Houlsby, bottleneck 8)"), ("lora", "LoRA r=8 on query,value")]
TASK_NAMES = {"sst2": "SST-2 (acc)", "cola": "CoLA (MCC)", "mrpc": "MRPC (F1)", "rte": "RTE (acc)"}


HEAD = 770  # MiniLM's classifier for two classes: 384 x 2 + 2 (all four tasks are binary)


def _without_head(rec: dict) -> int:
    return rec["trainable"] - HEAD


def _all_runs() -> list[dict]:
    path = RES / "glue.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _current(rec: dict) -> bool:
    """Whether ``rec`` ran on its task's budget in budgets.py (the tables show only those)."""
    return budget_of(rec) == BUDGETS[rec["spec"]["task"]]


def setting(runs: list[dict], superseded: list[dict]) -> list[str]:
    """One line per task: the budget its cells were trained on."""
    lines = []
    for task, label in TASK_NAMES.items():
        b, (n_train, n_dev) = BUDGETS[task], SIZES[task]
        steps = sorted({r["steps"] for r in runs if r["spec"]["task"] == task})
        used = min(b["max_train"], n_train)
        lines.append(f"- {label.split()[0]}: {used:,} training examples " + (
            f"(all {n_train:,})" if used == n_train else f"(a fixed random subset of {n_train:,})") +
            f", {b['epochs']} epochs" + (f" = {', '.join(map(str, steps))} steps" if steps else "") +
            ", dev: " + (f"all {n_dev:,}" if b["max_eval"] >= n_dev else f"the first {b['max_eval']} of {n_dev}") +
            f", max_length {b['max_length']}" + (" (truncates 12% of RTE's training pairs)" if task == "rte" and b["max_length"] == 128 else ""))
    counts: dict[tuple, int] = {}
    for r in superseded:
        b = budget_of(r)
        key = (TASK_NAMES[r["spec"]["task"]].split()[0], b["max_train"], b["epochs"])
        counts[key] = counts.get(key, 0) + 1
    if counts:
        lines.append("- not shown: runs on an earlier budget, kept in `results/glue.jsonl`: " + ", ".join(
            f"{n} {task} ({m:,} examples, {e} epochs)" for (task, m, e), n in counts.items()))
    return lines


def _cell(recs: list[dict], metric: str | None = None) -> str:
    """Median and values of ``metric`` (default: each run's task metric) over ``recs``."""
    vals = [r["metrics"][metric or r["metric"]] for r in recs if r.get("metrics")]
    if not vals:
        return "–"
    med = statistics.median(vals)
    return f"{med:.3f}" + (f" (n={len(vals)}: {', '.join(f'{v:.3f}' for v in vals)})" if len(vals) > 1 else " (n=1)")


def _match(rec: dict, **kw) -> bool:
    return all(rec["spec"].get(k) == v for k, v in kw.items())


def quality(runs: list[dict], metric: str | None = None) -> list[str]:
    """Methods x tasks: each task's metric, or ``metric`` (e.g. "mcc") on every task."""
    tasks = [t for t in TASK_NAMES if any(r["spec"]["task"] == t for r in runs)]
    names = [f"{TASK_NAMES[t].split()[0]} ({metric.upper()})" if metric else TASK_NAMES[t] for t in tasks]
    lines = ["| method | trainable (w/o head) | " + " | ".join(names) + " |",
             "|---|---:|" + "---:|" * len(tasks)]
    for method, label in METHODS:
        sel = [r for r in runs if r["spec"]["method"] == method and (method != "lora" or (
            r["spec"].get("r") == 8 and r["spec"].get("targets") == ["query", "value"]))]
        if not sel:
            continue
        n = _without_head(sel[0])
        lines.append(f"| {label} | {n:,} | " + " | ".join(_cell([r for r in sel if r["spec"]["task"] == t], metric)
                                                         for t in tasks) + " |")
    cells = []
    for t in tasks:  # what always answering the dev set's majority class scores (recorded with each run)
        maj = [r["majority"][metric or r["metric"]] for r in runs if r["spec"]["task"] == t and "majority" in r]
        cells.append(f"{maj[0]:.3f}" if maj else "–")
    lines.append("| *majority class (dev)* | – | " + " | ".join(cells) + " |")
    return lines


def rank(runs: list[dict]) -> list[str]:
    lines = ["| r (query,value) | trainable (w/o head) | SST-2 accuracy, median |", "|---:|---:|---|"]
    for r in (1, 2, 4, 8, 64):
        sel = [x for x in runs if _match(x, method="lora", task="sst2", r=r, targets=["query", "value"])]
        if sel:
            lines.append(f"| {r} | {_without_head(sel[0]):,} | {_cell(sel)} |")
    return lines


def matrices(runs: list[dict]) -> list[str]:
    lines = ["| adapted matrices | r | trainable (w/o head) | SST-2 accuracy, median |", "|---|---:|---:|---|"]
    for targets, r in ((["query"], 8), (["value"], 8), (["query", "value"], 4),
                       (["query", "key", "value", "attention.output.dense"], 2)):
        sel = [x for x in runs if _match(x, method="lora", task="sst2", r=r, targets=targets)]
        if sel:
            names = ", ".join("output" if t.startswith("attention.") else t for t in targets)
            lines.append(f"| {names} | {r} | {_without_head(sel[0]):,} | {_cell(sel)} |")
    return lines


def params() -> list[str]:
    path = RES / "params.json"
    if not path.exists():
        return ["(not run)"]
    lines = ["| model | parameters (config, meta device) | paper | LoRA setting | LoRA trainable | paper | source |",
             "|---|---:|---:|---|---:|---:|---|"]
    for row in json.loads(path.read_text()):
        lora = row["lora"]
        where = "q,v slices of c_attn" if lora.get("slices") else ",".join(lora["target_modules"])
        lines.append(f"| {row['model']} | {row['params'] / 1e6:,.2f}M | {row['paper_params_m']:,}M | r={lora['r']} "
                     f"on {where} | {row['lora_trainable'] / 1e6:.3f}M | {row['paper_lora_m']}M | {row['source']} |")
    return lines


def latency() -> list[str]:
    path = RES / "latency.json"
    if not path.exists():
        return ["(not run)"]
    data = json.loads(path.read_text())
    names = list(data["rows"][0]["ms"])
    lines = ["| batch x seq | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in data["rows"]:
        lines.append(f"| {row['batch']} x {row['seq']} | " + " | ".join(
            f"{row['ms'][k]:.0f} ms ({row['overhead_pct'][k]:+.1f}%)" for k in names) + " |")
    lines.append("")
    reps = {(r["batch"], r["seq"]): r.get("reps", data.get("reps")) for r in data["rows"]}
    lines.append("The best of each shape's timed repetitions (" + ", ".join(f"{b} x {s}: {n}" for (b, s), n in
                                                                          reps.items()) +
                 f"), the variants in rotating order, {data['threads']} torch thread(s), "
                 f"{' '.join(data['machine'].split())}; merged vs unmerged logits differ by at most "
                 f"{max(r['merged_max_diff'] for r in data['rows']):.1e}.")
    return lines


def analysis() -> list[str]:
    path = HERE.parents[1] / "docs" / "figures" / "paper" / "analysis.json"
    if not path.exists():
        return ["(not run)"]
    data = json.loads(path.read_text())
    sims = {row["module"]: row for row in data["similarity"]["layers"]}
    amps = [{row["module"]: row for row in rep["layers"]} for rep in data["adapters"]]
    lines = ["| module | φ(1,1) r=8 vs r=64 | φ mean (chance) | eff. rank r=8 / r=64 | amplification r=8 "
             "(random) | amplification r=64 (random) |", "|---|---:|---:|---|---:|---:|"]
    for module, sim in sims.items():
        a8, a64 = amps[0][module], amps[1][module]
        short = module.replace("bert.encoder.layer.", "layer ").replace(".attention.self.", " ")
        lines.append(f"| {short} | {sim['phi_top']:.3f} | {sim['phi_mean']:.3f} ({sim['chance_mean']:.3f}) | "
                     f"{a8['effective_rank']:.2f} / {a64['effective_rank']:.2f} | "
                     f"{a8['amplification']['amplification']:.2f} ({a8['amplification']['amplification_random']:.2f}) | "
                     f"{a64['amplification']['amplification']:.2f} ({a64['amplification']['amplification_random']:.2f}) |")
    return lines


def main() -> int:
    every = _all_runs()
    runs = [r for r in every if _current(r)]
    superseded = [r for r in every if not _current(r)]
    seconds = sum(r["seconds"] for r in runs)
    machines = sorted({" ".join(r["machine"].split()) for r in runs})
    text = TEMPLATE.format(
        setting="\n".join(setting(runs, superseded)), machine="; ".join(machines), n_runs=len(runs),
        minutes=seconds / 60, quality="\n".join(quality(runs)), quality_mcc="\n".join(quality(runs, "mcc")),
        rank="\n".join(rank(runs)), matrices="\n".join(matrices(runs)), params="\n".join(params()),
        latency="\n".join(latency()), analysis="\n".join(analysis()))
    out = HERE / "README.md"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out} ({len(runs)} runs)")
    return 0


TEMPLATE = """# The LoRA paper's experiments, on CPU (lorakit)

Generated by `python benchmarks/paper/tables.py` from `benchmarks/paper/results/`; the reading of these
numbers against the paper's claims is in [docs/paper.md](../../docs/paper.md). Every figure here was taken on a
**shared 2-core CPU machine** (other engineers' tests and benchmarks running beside it, the experiments under
`nice -n 10`, one torch thread each), so the training budgets are small and say nothing about the scores these
methods reach with full data and tuned learning rates.

## GLUE on the pretrained MiniLM-L6-H384 (Table 2 analog)

```bash
python benchmarks/paper/glue.py rank matrices quality --seeds 0     # each task on its budget (budgets.py)
python benchmarks/paper/glue.py rank matrices quality --seeds 1 2   # then more seeds
python benchmarks/paper/tables.py
```

Setting, per task (batch 16; batches padded to their longest example, similar lengths grouped):

{setting}

{machine}. {n_runs} runs shown, {minutes:.0f} minutes of wall-clock time in all (a run's recorded seconds
include loading, evaluation, and any time the machine's other work took from it). Learning rates are
common values, not tuned (full 1e-4, BitFit 2e-3, head 5e-3, adapter 2e-3, LoRA 2e-3); AdamW, linear decay,
6% warmup, weight decay 0.01. The metric is the dev score after the last epoch (no checkpoint picked on dev).
Every method also trains the classifier head (770 parameters for two classes); "trainable" leaves it out.
SST-2 uses lorakit's packaged whole-sentence slice of GLUE's SST-2 (see the top-level README); the others
are GLUE's files from `../shared/data`.

{quality}

The same runs' Matthews correlation on every task (recorded with each run): 0 for any constant answer, so it
shows which runs left the majority class where accuracy or F1 near the majority's value cannot.

{quality_mcc}

## Rank ablation (Table 6 analog): LoRA on query,value of SST-2, alpha = 16 for every r

{rank}

## Which matrices at a fixed budget (Table 5 analog): rank x matrices = 8 per block

{matrices}

## Subspaces of the r=8 and r=64 adapters (Figure 3, Table 7 analogs)

```bash
lorakit analyze runs/paper/lora-sst2-16-8-query+value/sst2-lora-0/adapter \\
                runs/paper/lora-sst2-16-64-query+value/sst2-lora-0/adapter --output-dir docs/figures/paper
```

Seed 0 of the rank ablation; φ(1,1) is the overlap of the two adapters' top direction of A (1 = the same
direction); "chance" is the φ two random subspaces of the same sizes would have on average. Amplification is
||ΔW||_F / ||Uᵀ W0 V||_F with U, V the adapter's top-r singular vectors of ΔW (random: random U, V).

{analysis}

## Parameter counts (configs on the meta device, no weights)

```bash
python benchmarks/paper/params.py
```

{params}

## Inference latency of one forward pass, GPT-2 medium config (Table 1 analog), CPU

```bash
python benchmarks/paper/latency.py --shapes 1x128:5 16x128:1 32x128:1 16x256:1 --threads 1
python benchmarks/paper/latency.py --update --shapes 16x128:3 --threads 1   # 16 x 128 again, 3 repetitions
```

`lora-merged` is the base model's computation (the update folded into the weights), so its distance from
`base` is this machine's noise at that shape. The paper's 32 x 512 (Table 1's first column) was left out: at
least 128 times the work of 1 x 128, about 3 minutes per forward pass here, so a single repetition of the four
variants (12 minutes) could not resolve the few percent the paper reports there.

{latency}

## E2E NLG (Table 3): the pipeline

`tests/cli/test_cli.py::test_train_e2e_then_eval_with_paper_metrics` (toy lines) and
`tests/cli/test_paper_e2e.py` (the first lines of the real E2E files) run train -> beam search ->
BLEU/NIST/METEOR/ROUGE-L/CIDEr in CI on a tiny random-init GPT-2. The paper's GPT-2 medium setting
(Table 11: r=4, alpha=32, AdamW lr 2e-4, batch 8, 5 epochs, 500 warmup steps; beam 10, length penalty 0.9,
no-repeat 4-grams, which are `lorakit eval`'s defaults), on a GPU from a local directory holding GPT-2
medium's weights, is:

```bash
lorakit train --task e2e --model ./gpt2-medium --data ../shared/data/e2e --target-modules c_attn \\
  --r 4 --alpha 32 --dropout 0.1 --lr 2e-4 --batch-size 8 --epochs 5 --warmup-steps 500 --max-length 512 \\
  --weight-decay 0.01 --output-dir runs/e2e-gpt2m
lorakit eval runs/e2e-gpt2m/adapter --task e2e --data ../shared/data/e2e
```

Two differences from the paper remain: `lorakit train` has no flag for fused-slice targets, so `c_attn` is
adapted whole (q, k and v; the Python API's `LoraConfig(slices={{"c_attn": [True, False, True]}})` adapts q and v
only, as the paper did), and there is no label smoothing (the paper used 0.1).
"""

if __name__ == "__main__":
    sys.exit(main())
