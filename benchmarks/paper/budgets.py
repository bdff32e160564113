"""The training budget of each GLUE task in the paper benchmarks, shared by glue.py (runs) and tables.py (tables).

A run's budget is recorded with it; a table shows only the runs whose budget is the task's budget here, so
results of two settings never mix in one cell (older runs stay in ``results/glue.jsonl``, counted as
superseded). Batch 16 for every task; ``max_length`` caps the tokens of a pair and batches pad only to their
longest example (``lorakit.train.data.collate``), with examples of similar length grouped (``group_by_length``).
"""

from __future__ import annotations

# task -> training examples (a fixed random subset; more than the train split = all of it), epochs,
# dev examples (the first N; more than the dev split = all of it), max_length.
BUDGETS: dict[str, dict[str, int]] = {
    "sst2": {"max_train": 400, "epochs": 2, "max_eval": 500, "max_length": 128, "batch_size": 16},
    "cola": {"max_train": 3000, "epochs": 3, "max_eval": 1043, "max_length": 128, "batch_size": 16},
    "mrpc": {"max_train": 2000, "epochs": 3, "max_eval": 408, "max_length": 128, "batch_size": 16},
    "rte": {"max_train": 2490, "epochs": 2, "max_eval": 277, "max_length": 128, "batch_size": 16},
}
# the splits' sizes, for the tables' setting line
SIZES = {"sst2": (5000, 872), "cola": (8551, 1043), "mrpc": (3668, 408), "rte": (2490, 277)}


def budget_of(rec: dict) -> dict[str, int]:
    """The budget a recorded run used (records written before budgets were recorded: max_eval 500, batch 16)."""
    if "budget" in rec:
        return rec["budget"]
    return {"max_train": rec["max_train"], "epochs": rec["epochs"], "max_eval": 500,
            "max_length": rec["max_length"], "batch_size": rec.get("batch_size", 16)}
