"""One LoraTrainer run on the tiny BERT of the integration tests, in this process or one rank of torchrun.

    python -m torch.distributed.run --nproc_per_node=2 tests/integrations/trainer_run.py OUT

Every step's global batch is the whole 8-record dataset (8 on one process, 4 per rank on two), so one
process and DDP compute the same mean gradient, summed in another order. ``average_tokens_across_devices``
is off: with it (transformers' default) a sequence-classification loss is multiplied by the world size
under DDP (transformers 5.24), which changes AdamW's steps through its epsilon.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RECORDS, STEPS = 8, 3


def run(out: str) -> None:
    from lorakit.integrations import LoraTrainer
    from tests.integrations.helpers import args, bert_lora, records

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = bert_lora()
    trainer = LoraTrainer(model=model, train_dataset=records(RECORDS),
                          args=args(Path(out), max_steps=STEPS, save_steps=2,
                                    per_device_train_batch_size=RECORDS // world,
                                    average_tokens_across_devices=False))
    trainer.train()
    trainer.save_model(str(Path(out) / "adapter"))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[2]))
    run(sys.argv[1])
    import torch.distributed as dist

    if dist.is_initialized():  # accelerate started the group; an undestroyed gloo group can abort at exit
        dist.barrier()
        dist.destroy_process_group()
