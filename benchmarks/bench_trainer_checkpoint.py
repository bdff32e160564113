"""What a transformers Trainer checkpoint of a lorakit model holds: LoraTrainer's files and sizes beside
the full-model save a plain Trainer wrote before ``save_pretrained`` refused (the whole state dict under
lorakit's wrapped names). Real pretrained MiniLM-L6 from the ``demo`` extra, packaged SST-2, offline.

    python benchmarks/bench_trainer_checkpoint.py [--steps 4] [--out DIR]

Sizes do not depend on the machine; the run takes ~1 minute on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()

    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
    )

    import lorakit
    from lorakit.integrations import LoraTrainer
    from lorakit.models import default_model_path

    torch.manual_seed(0)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"],
                                               modules_to_save=["classifier"]))
    rows = (Path(lorakit.__file__).parent / "data" / "sst2" / "train.tsv").read_text().splitlines()[1:65]
    data = [{**tok(s, truncation=True, max_length=64), "labels": int(y)} for s, y in (r.split("\t") for r in rows)]
    out = Path(args.out or tempfile.mkdtemp(prefix="lorakit-trainer-"))
    targs = TrainingArguments(str(out), max_steps=args.steps, save_steps=args.steps, per_device_train_batch_size=16,
                              report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10_000)
    LoraTrainer(model=model, args=targs, train_dataset=data, data_collator=DataCollatorWithPadding(tok)).train()

    checkpoint = out / f"checkpoint-{args.steps}"
    sizes = {p.name: p.stat().st_size for p in sorted(checkpoint.iterdir()) if p.is_file()}
    with tempfile.TemporaryDirectory() as tmp:  # what the plain Trainer's save_pretrained used to write
        full = Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, full, metadata={"format": "pt"})
        full_size = full.stat().st_size
    trainable, total = lorakit.trainable_parameters(model)
    print(f"trainable {trainable:,} of {total:,} parameters; checkpoint {checkpoint}")
    print(f"{'file':30s} {'bytes':>12s}")
    for name, size in sizes.items():
        print(f"{name:30s} {size:>12,d}")
    print(f"{'total':30s} {sum(sizes.values()):>12,d}")
    print(f"{'full-model save (before)':30s} {full_size:>12,d}   model.safetensors, wrapped names")
    print(f"adapter / full-model save: {sizes['adapter_model.safetensors'] / full_size:.4f}")


if __name__ == "__main__":
    main()
