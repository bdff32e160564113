"""``lorakit analyze ADAPTER [ADAPTER2]``: the LoRA paper's Section 7 on your adapters: spectrum and effective rank
of each ``ΔW = s·B·A``, amplification of the base weight's directions (Table 7), and with two adapters the
subspace similarity φ (Figure 3). ``--output-dir`` also writes ``analysis.json`` and PNG figures."""

from __future__ import annotations

import argparse
import json
import math

from .options import check_output_dir

HELP = "Spectrum, effective rank, amplification and (two adapters) subspace similarity of LoRA updates."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("adapter2", nargs="?", help="a second adapter: subspace similarity φ against the first")
    p.add_argument("--model", help="base model directory or hub id for the amplification factor (default: the "
                   "adapter's base_model_name_or_path when that is a local directory; otherwise left out)")
    p.add_argument("--output-dir", help="write analysis.json and PNG figures (spectra, φ heatmaps, amplification)")
    p.add_argument("--json", action="store_true", help="print every number as JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    from ..analyze import run_analysis, summary_rows

    if args.output_dir:
        check_output_dir(args.output_dir, "--output-dir")  # before the analysis runs, not after
    adapters = [args.adapter] + ([args.adapter2] if args.adapter2 else [])
    result = run_analysis(adapters, model=args.model, output_dir=args.output_dir)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    pair = result["similarity"]
    for k, report in enumerate(result["adapters"]):
        print(f"adapter {k + 1}    {report['path']}")
        if report["use_dora"]:
            print("(DoRA adapter: these are the measures of its low-rank part s·B·A, before the magnitude rescaling)")
        _table(summary_rows(report, pair if k == 0 else None))
        print()
    if result["base_model"] is None:
        print("amplification: left out (no local base model; pass --model)")
    if pair:
        top = sorted(row["phi_top"] for row in pair["layers"])
        out = sorted(row["phi_delta_out_top"] for row in pair["layers"])
        print(f"over {len(top)} common modules, median φ(1,1): A {top[len(top) // 2]:.3f}, ΔW's outputs "
              f"{out[len(out) // 2]:.3f} (random subspaces: about max(i, j)/n, "
              f"{pair['layers'][0]['chance_mean']:.3f} on average over i, j)")
    for f in result.get("files", []):
        print(f"wrote        {f}")
    return 0


# (row key, header, format); a column whose values are all NaN (no base model / one adapter) is left out
COLUMNS = [("r", "r", "{:>4}"), ("norm", "||ΔW||", "{:>9.4g}"), ("eff_rank", "eff.rank", "{:>8.2f}"),
           ("energy_rank", "rank(90%)", "{:>9}"), ("amp", "amp", "{:>8.2f}"), ("amp_random", "amp(rand)", "{:>9.2f}"),
           ("phi_top", "φ(1,1)", "{:>7.3f}"), ("phi_mean", "φ mean", "{:>7.3f}"),
           ("phi_out_top", "φΔW(1,1)", "{:>8.3f}")]


def _table(rows: list[dict]) -> None:
    width = max(len(r["module"]) for r in rows)
    shown = [c for c in COLUMNS if any(not (isinstance(r[c[0]], float) and math.isnan(r[c[0]])) for r in rows)]
    print(f"{'module':<{width}}  " + "  ".join(f"{head:>{len(fmt.format(0))}}" for _, head, fmt in shown))
    for r in rows:
        print(f"{r['module']:<{width}}  " + "  ".join(fmt.format(r[key]) for key, _, fmt in shown))
