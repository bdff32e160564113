"""Rebuild the SST-2 slice packaged for the offline demo (``src/lorakit/data/sst2``) from GLUE's files.

GLUE's SST-2 train split holds every phrase of the treebank's parse trees (67,349 rows, mostly
fragments), while its dev split holds whole sentences. The demo trains on whole sentences: the train
rows whose text is not a contiguous run of words inside another train row (6,885 rows; the treebank
has 6,920 training sentences). ``per_label`` of them are drawn for each label with
``random.Random(0)`` and written in their original order; ``dev.tsv`` is copied byte for byte.

    python scripts/make_sst2_slice.py ../shared/data/sst2 src/lorakit/data/sst2
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

PER_LABEL = 2500


def whole_sentences(rows: list[str]) -> list[str]:
    """The ``text<TAB>label`` rows whose text is not a contiguous word span of another row's text."""
    inner = set()
    for text in {row.split("\t")[0].strip() for row in rows}:
        words = text.split()
        n = len(words)
        for i in range(n):
            for j in range(i + 1, n + 1 if i else n):  # every span but the whole text
                inner.add(" ".join(words[i:j]))
    return [row for row in rows if row.split("\t")[0].strip() not in inner]


def make_slice(src: Path, dst: Path, per_label: int = PER_LABEL) -> None:
    """Write ``dst/train.tsv`` (``per_label`` whole sentences of each label) and ``dst/dev.tsv``."""
    header, *rows = (src / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    sentences = whole_sentences(rows)
    rng = random.Random(0)
    picked = []
    for label in ("0", "1"):
        picked += rng.sample([i for i, row in enumerate(sentences) if row.split("\t")[1].strip() == label], per_label)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "train.tsv").write_text(header + "".join(sentences[i] for i in sorted(picked)), encoding="utf-8",
                                   newline="")
    shutil.copyfile(src / "dev.tsv", dst / "dev.tsv")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="directory with GLUE's SST-2 train.tsv and dev.tsv")
    p.add_argument("dst", type=Path, help="where to write the slice")
    p.add_argument("--per-label", type=int, default=PER_LABEL)
    args = p.parse_args()
    make_slice(args.src, args.dst, args.per_label)
