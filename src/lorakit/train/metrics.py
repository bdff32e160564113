"""Evaluation metrics: GLUE-style classification, causal-LM perplexity, E2E NLG.

Classification (`accuracy`, `f1`, `mcc`) and `perplexity` are small formulas over counts in
plain torch/Python. `e2e_metrics` follows the official E2E NLG Challenge script
(tuetschek/e2e-metrics, ``measure_scores.py``), which is what the LoRA paper's E2E table uses,
built from PyPI packages (the optional extra ``lorakit[metrics]``):

- **BLEU**: ``sacrebleu`` corpus BLEU with the ``13a`` tokenizer (a port of mteval-v13a),
  lower-cased, closest reference length (ties -> shorter), zero n-gram counts floored at 1e-15
  exactly as the script's ``pymteval`` does. Returned on the script's 0..1 scale
  (the paper prints 100x).
- **NIST**: mteval-v13a's NIST (5-grams, information weights from all references, matches
  clipped against the max count over the references, length penalty against the average
  reference length) on the same 13a tokens. No PyPI package implements this: nltk's
  ``corpus_nist`` scores each segment against its single best reference and takes the length
  of that one reference, which gives different numbers with several references (it agrees on
  single-reference data; the tests check that). So this one metric is a short function here.
- **METEOR, ROUGE_L, CIDEr**: ``pycocoevalcap`` (the coco-caption code the E2E script
  vendors), on text tokenized like its ``PTBTokenizer`` (lower-cased, punctuation removed;
  quirk kept: parentheses become ``-lrb-``/``-rrb-`` and stay). ROUGE_L is coco's
  (beta = 1.2, max precision and max recall taken separately over the references); CIDEr is
  coco's ``Cider`` (really CIDEr-D: clipped tf-idf, Gaussian length penalty, sigma = 6).
  Both are corpus means of segment scores; CIDEr needs more than one segment for non-zero idf.

Two backends, picked by ``backend``:

- ``"java"`` (the official one): Stanford PTBTokenizer and METEOR 1.5 (exact, stem, WordNet
  synonym and paraphrase matching; corpus score from pooled statistics), both from the jars
  shipped inside ``pycocoevalcap``; needs ``java`` on PATH and about 10 s to load METEOR's
  paraphrase table. This reproduces the script's numbers.
- ``"python"``: no Java. Tokenization approximates the PTB tokenizer with nltk's regex
  ``TreebankWordTokenizer`` (no data download), so ROUGE_L/CIDEr can differ slightly on odd
  punctuation (e.g. PTB maps ``£`` to ``#``). METEOR is nltk's ``meteor_score``
  (Banerjee & Lavie formulation, alpha=0.9, beta=3, gamma=0.5) with **exact and Porter-stem
  matching only: WordNet synonym matching is off**, because nltk's WordNet data cannot be
  downloaded here and no PyPI package ships it reliably; the corpus score is the mean of
  segment scores. Python-backend METEOR is therefore NOT comparable to published numbers.
- ``"auto"`` (default): ``"java"`` when ``java`` is on PATH, else ``"python"`` with a warning.

BLEU and NIST do not depend on the backend.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["accuracy", "f1", "mcc", "perplexity", "e2e_metrics"]

_INSTALL_HINT = "pip install 'lorakit[metrics]'"

Labels = Sequence[int] | torch.Tensor


# ----------------------------------------------------------------------------- classification


def _as_labels(predictions: Labels, labels: Labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and flatten two label vectors into int64 tensors."""
    p = torch.as_tensor(predictions).flatten()
    y = torch.as_tensor(labels).flatten()
    if p.numel() == 0 or y.numel() == 0:
        raise ValueError("metrics need at least one prediction and one label, got empty input")
    if p.numel() != y.numel():
        raise ValueError(f"predictions and labels differ in length: {p.numel()} vs {y.numel()}")
    for name, t in (("predictions", p), ("labels", y)):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must be integer class ids, got dtype {t.dtype}")
        if bool((t < 0).any()):
            raise ValueError(f"{name} must be non-negative class ids")
    return p.long(), y.long()


def _confusion(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Confusion matrix C[true, pred] of shape (K, K), K = max class id + 1."""
    k = int(max(int(p.max()), int(y.max()))) + 1
    return torch.bincount(y * k + p, minlength=k * k).reshape(k, k)  # (K, K)


def accuracy(predictions: Labels, labels: Labels) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _as_labels(predictions, labels)
    return float((p == y).double().mean())


def f1(predictions: Labels, labels: Labels, *, average: Literal["binary", "macro"] = "binary") -> float:
    """F1 score. ``"binary"``: of positive class 1 (labels must be 0/1, as GLUE MRPC/QQP);
    ``"macro"``: unweighted mean of per-class F1 over the classes seen in either input.
    A class with no true and no predicted members has F1 0 (as scikit-learn)."""
    p, y = _as_labels(predictions, labels)
    if average == "binary":
        if bool((p > 1).any()) or bool((y > 1).any()):
            raise ValueError("average='binary' needs 0/1 labels; use average='macro' for multi-class")
        p, y = p.clamp(max=1), y.clamp(max=1)
        conf = torch.bincount(y * 2 + p, minlength=4).reshape(2, 2)
        classes = [1]
    elif average == "macro":
        conf = _confusion(p, y)
        classes = torch.unique(torch.cat([p, y])).tolist()
    else:
        raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
    scores = []
    for c in classes:
        tp = int(conf[c, c])
        fp = int(conf[:, c].sum()) - tp
        fn = int(conf[c, :].sum()) - tp
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores)


def mcc(predictions: Labels, labels: Labels) -> float:
    """Matthews correlation coefficient (GLUE CoLA; multi-class via Gorodkin's R_K, as
    scikit-learn's ``matthews_corrcoef``). 0.0 when undefined (a constant row or column)."""
    p, y = _as_labels(predictions, labels)
    conf = _confusion(p, y).double()
    t = conf.sum(dim=1)  # (K,) true count per class
    q = conf.sum(dim=0)  # (K,) predicted count per class
    s = conf.sum()
    c = conf.trace()
    cov_pt = c * s - (t * q).sum()
    cov_pp = s * s - (q * q).sum()
    cov_tt = s * s - (t * t).sum()
    denom = math.sqrt(float(cov_pp) * float(cov_tt))
    return float(cov_pt) / denom if denom else 0.0


# ---------------------------------------------------------------------------------- causal LM


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(total_nll / n_tokens): perplexity from a summed natural-log NLL over n_tokens tokens.
    Returns ``inf`` when the exponential overflows."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int):
        raise ValueError(f"n_tokens must be an int, got {type(n_tokens).__name__}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    nll = float(total_nll)
    if not math.isfinite(nll):
        raise ValueError(f"total_nll must be finite, got {nll}")
    if nll < 0:
        raise ValueError(f"total_nll is a sum of negative log-likelihoods and cannot be negative, got {nll}")
    try:
        return math.exp(nll / n_tokens)
    except OverflowError:
        return math.inf


# ------------------------------------------------------------------------------------ E2E NLG

Backend = Literal["auto", "java", "python"]

# punctuation tokens that coco-caption's PTBTokenizer wrapper drops after tokenizing
_COCO_PUNCT = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # penalty 0.5 at 2/3 of the reference length


def _check_e2e_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("hypotheses must be a list of strings and references a list of lists of strings")
    if len(hypotheses) == 0:
        raise ValueError("e2e_metrics needs at least one hypothesis, got an empty list")
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
        if not isinstance(hyp, str):
            raise ValueError(f"hypothesis {i} is not a string: {type(hyp).__name__}")
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                f"references[{i}] must be a non-empty list of strings (several references per segment)"
            )
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] holds a non-string")


def _bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU as mteval-v13a / the E2E script: 13a tokens, lower-cased, 0..1 scale."""
    try:
        from sacrebleu.metrics import BLEU
    except ImportError as e:
        raise ImportError(f"BLEU needs sacrebleu: {_INSTALL_HINT}") from e
    n_refs = max(len(r) for r in references)
    # sacrebleu takes reference *streams*; None pads segments with fewer references
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(n_refs)]
    bleu = BLEU(tokenize="13a", lowercase=True, smooth_method="floor", smooth_value=1e-15)
    return bleu.corpus_score(list(hypotheses), streams).score / 100.0


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST as mteval-v13a (the E2E script's ``pymteval.NISTScore``).

    info(w_1..w_n) = log2(count(w_1..w_{n-1}) / count(w_1..w_n)) over all reference n-grams
    (the 0-gram count is the number of reference words); NIST = sum_n [sum over clipped hits of
    info / number of hypothesis n-grams] * exp(-beta * ln(min(1, L_sys / L_ref))^2), where
    L_ref sums each segment's average reference length.
    """
    try:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    except ImportError as e:
        raise ImportError(f"NIST needs sacrebleu's 13a tokenizer: {_INSTALL_HINT}") from e
    tok = Tokenizer13a()

    def split(s: str) -> list[str]:
        return tok(s.lower()).split()

    hyps = [split(h) for h in hypotheses]
    refs = [[split(r) for r in rs] for rs in references]

    ref_counts: Counter[tuple[str, ...]] = Counter()  # all reference n-grams, n = 1..max_n
    for rs in refs:
        for r in rs:
            for n in range(1, max_n + 1):
                ref_counts.update(_ngrams(r, n))
    ref_counts[()] = sum(len(r) for rs in refs for r in rs)

    def info(ngram: tuple[str, ...]) -> float:
        return math.log2(ref_counts[ngram[:-1]] / ref_counts[ngram]) if ngram in ref_counts else 0.0

    score = 0.0
    for n in range(1, max_n + 1):
        gain, n_hyp_ngrams = 0.0, 0
        for h, rs in zip(hyps, refs, strict=True):
            hyp_ng = _ngrams(h, n)
            max_ref: Counter[tuple[str, ...]] = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)  # element-wise max over the references
            gain += sum(info(g) * min(c, max_ref[g]) for g, c in hyp_ng.items() if g in max_ref)
            n_hyp_ngrams += sum(hyp_ng.values())
        score += gain / n_hyp_ngrams if n_hyp_ngrams else 0.0

    sys_len = sum(len(h) for h in hyps)
    ref_len = sum(sum(len(r) for r in rs) / len(rs) for rs in refs)
    ratio = sys_len / ref_len if ref_len else 1.0
    if ratio <= 0:
        return 0.0
    penalty = 1.0 if ratio >= 1 else math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return score * penalty


def _ptb_python(texts: Sequence[str]) -> list[str]:
    """Approximate coco's PTBTokenizer (Stanford, ``-lowerCase``) without Java."""
    from nltk.tokenize import TreebankWordTokenizer

    tok = TreebankWordTokenizer()
    out = []
    for text in texts:
        words: list[str] = []
        # Treebank only splits a sentence-final period, so split sentences first
        for sent in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ").strip()):
            words += tok.tokenize(sent, convert_parentheses=True)
        # as in coco: tokens come lower-cased, then the (upper-case) list filters them, so -lrb- stays
        out.append(" ".join(w for w in (w.lower() for w in words) if w not in _COCO_PUNCT))
    return out


def _ptb_java(texts: Sequence[str]) -> list[str]:
    """coco-caption's own PTBTokenizer (Stanford CoreNLP 3.4.1 jar, needs java)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [tokenized[i][0] for i in range(len(texts))]


def _meteor_java(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """METEOR 1.5 through coco-caption's wrapper; corpus score from pooled statistics."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(
            {i: list(r) for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}
        )
    finally:  # don't leave the JVM to the garbage collector
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    return float(score)


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: no synsets, so synonym matching never fires."""

    def synsets(self, *args: object, **kwargs: object) -> list[object]:
        return []


def _meteor_python(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """nltk METEOR, exact + Porter-stem matching only (no WordNet), mean over segments."""
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import meteor_score

    stemmer, wn = PorterStemmer(), _NoSynonyms()
    scores = [
        meteor_score([r.split() for r in rs], h.split(), stemmer=stemmer, wordnet=wn)  # type: ignore[arg-type]
        for h, rs in zip(hyps, refs, strict=True)
    ]
    return sum(scores) / len(scores)


def _resolve_backend(backend: Backend) -> Literal["java", "python"]:
    has_java = shutil.which("java") is not None
    if backend == "java":
        if not has_java:
            raise RuntimeError("backend='java' needs a `java` executable on PATH (METEOR 1.5, PTBTokenizer)")
        return "java"
    if backend == "python":
        return "python"
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'java' or 'python', got {backend!r}")
    if has_java:
        return "java"
    warnings.warn(
        "java not found: e2e_metrics falls back to backend='python' (approximate PTB tokenization, "
        "METEOR without synonyms); METEOR is not comparable to published E2E numbers",
        RuntimeWarning,
        stacklevel=3,
    )
    return "python"


def e2e_metrics(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, backend: Backend = "auto"
) -> dict[str, float]:
    """E2E NLG Challenge metrics for detokenized system outputs, several references each.

    Returns ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` on the official script's scales
    (BLEU, METEOR, ROUGE_L in 0..1; the LoRA paper prints them x100). See the module docstring
    for the backends and how each metric is computed.
    """
    _check_e2e_inputs(hypotheses, references)
    try:
        import nltk  # noqa: F401
        import pycocoevalcap  # noqa: F401
        import sacrebleu  # noqa: F401
    except ImportError as e:
        raise ImportError(f"e2e_metrics needs sacrebleu, nltk and pycocoevalcap: {_INSTALL_HINT}") from e
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    chosen = _resolve_backend(backend)
    scores = {"BLEU": _bleu(hypotheses, references), "NIST": _nist(hypotheses, references)}

    flat_refs = [r for rs in references for r in rs]
    tokenize = _ptb_java if chosen == "java" else _ptb_python
    try:
        tokens = tokenize(list(hypotheses) + flat_refs)
    except (OSError, subprocess.SubprocessError) as e:  # pragma: no cover - broken java install
        raise RuntimeError(f"PTB tokenization with java failed: {e}") from e
    hyp_tok, rest = tokens[: len(hypotheses)], tokens[len(hypotheses) :]
    ref_tok: list[list[str]] = []
    for rs in references:
        ref_tok.append(rest[: len(rs)])
        rest = rest[len(rs) :]

    gts = {i: rs for i, rs in enumerate(ref_tok)}
    res = {i: [h] for i, h in enumerate(hyp_tok)}
    meteor = _meteor_java if chosen == "java" else _meteor_python
    scores["METEOR"] = meteor(hyp_tok, ref_tok)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores
