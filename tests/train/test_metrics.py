"""Metrics checked against values worked out by hand (the arithmetic is in the comments)."""

import math
import os
import shutil
import sys

import pytest
import torch

from lorakit.train import metrics
from lorakit.train.metrics import accuracy, e2e_metrics, f1, mcc, perplexity

# ----------------------------------------------------------------------------- classification


def test_accuracy_by_hand():
    # matches at positions 0 and 2 -> 2/4
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(torch.tensor([2, 1]), torch.tensor([2, 1])) == 1.0


def test_f1_binary_by_hand():
    # preds  1 1 0 0 1
    # labels 1 0 0 1 1  -> TP = 2 (0, 4), FP = 1 (1), FN = 1 (3); F1 = 2TP / (2TP + FP + FN) = 4/6
    assert f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    # no positives predicted or present: F1 of class 1 is 0 by convention (as scikit-learn)
    assert f1([0, 0], [0, 0]) == 0.0


def test_f1_macro_by_hand():
    # preds  0 1 2 2
    # labels 0 2 2 1
    # class 0: TP 1, FP 0, FN 0 -> 1;  class 1: TP 0, FP 1, FN 1 -> 0;  class 2: TP 1, FP 1, FN 1 -> 2/4
    # macro = (1 + 0 + 0.5) / 3 = 0.5
    assert f1([0, 1, 2, 2], [0, 2, 2, 1], average="macro") == pytest.approx(0.5)


def test_f1_binary_rejects_multiclass_labels():
    with pytest.raises(ValueError, match="macro"):
        f1([0, 2], [0, 1])
    with pytest.raises(ValueError, match="average"):
        f1([0, 1], [0, 1], average="micro")  # type: ignore[arg-type]


def test_mcc_2x2_by_hand():
    # labels 1 1 1 1 0 0 0
    # preds  1 1 1 0 0 0 1  -> TP 3, FN 1, TN 2, FP 1
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 1) / sqrt(4*4*3*3) = 5/12
    assert mcc([1, 1, 1, 0, 0, 0, 1], [1, 1, 1, 1, 0, 0, 0]) == pytest.approx(5 / 12)
    assert mcc([0, 1, 1], [0, 1, 1]) == pytest.approx(1.0)
    assert mcc([1, 0, 0], [0, 1, 1]) == pytest.approx(-1.0)
    assert mcc([1, 1, 1], [0, 1, 1]) == 0.0  # constant prediction: undefined -> 0 (as CoLA/sklearn)


def test_mcc_multiclass_by_hand():
    # preds 0 1 2 2, labels 0 2 2 1: correct c = 2, total s = 4, true counts t = (1,1,2), pred counts p = (1,1,2)
    # MCC = (c*s - sum p*t) / sqrt((s^2 - sum p^2)(s^2 - sum t^2)) = (8 - 6) / sqrt(10 * 10) = 0.2
    assert mcc([0, 1, 2, 2], [0, 2, 2, 1]) == pytest.approx(0.2)


@pytest.mark.parametrize("fn", [accuracy, f1, mcc])
def test_classification_input_errors(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="differ in length"):
        fn([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="integer"):
        fn(torch.tensor([0.0, 1.0]), [0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        fn([-1, 1], [0, 1])


# ---------------------------------------------------------------------------------- perplexity


def test_perplexity_by_hand():
    # three tokens each with p = 1/5: total NLL = 3 ln 5, mean ln 5 -> perplexity 5
    assert perplexity(3 * math.log(5), 3) == pytest.approx(5.0)
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(1e6, 1) == math.inf


@pytest.mark.parametrize(
    "nll, n, match",
    [
        (1.0, 0, "positive"),
        (1.0, -3, "positive"),
        (1.0, 2.0, "int"),
        (1.0, True, "int"),
        (float("nan"), 3, "finite"),
        (float("inf"), 3, "finite"),
        (-0.5, 3, "negative"),
    ],
)
def test_perplexity_input_errors(nll, n, match):
    with pytest.raises(ValueError, match=match):
        perplexity(nll, n)


# ------------------------------------------------------------------------------------ E2E NLG


@pytest.fixture
def e2e_deps():
    for name in ("sacrebleu", "nltk", "pycocoevalcap"):
        pytest.importorskip(name)


def py_e2e(hyps, refs):
    return e2e_metrics(hyps, refs, backend="python")


def test_bleu_by_hand(e2e_deps):
    # hyp "the cat sat on the mat" (6 tokens), ref "the cat sat on the red mat" (7 tokens)
    # 1-grams 6/6; 2-grams: the cat, cat sat, sat on, on the hit, the mat misses -> 4/5
    # 3-grams: the cat sat, cat sat on, sat on the hit, on the mat misses -> 3/4; 4-grams 2/3
    # BP = exp(1 - 7/6); BLEU = BP * (1 * 4/5 * 3/4 * 2/3) ** (1/4)
    got = py_e2e(["the cat sat on the mat"], [["the cat sat on the red mat"]])["BLEU"]
    assert got == pytest.approx(math.exp(-1 / 6) * 0.4**0.25)


def test_bleu_multi_reference_and_normalisation(e2e_deps):
    # hyp has 4 tokens, references 5 and 3: a tie at distance 1 takes the shorter (3) -> BP 1;
    # every n-gram of "a b c d" is in the first reference -> BLEU 1 (the longer ref would give exp(-1/4))
    assert py_e2e(["a b c d"], [["a b c d e", "a b c"]])["BLEU"] == pytest.approx(1.0)
    # 13a tokenization splits the final period; matching is case-insensitive (mteval default)
    assert py_e2e(["The CAT sat on the mat."], [["the cat sat on the mat ."]])["BLEU"] == pytest.approx(1.0)
    # no match at all -> 0 (floored at 1e-15 per n-gram order, as the E2E script)
    assert py_e2e(["x y z w"], [["a b c d"]])["BLEU"] == pytest.approx(0.0, abs=1e-12)


def test_nist_by_hand(e2e_deps):
    # ref "a b d": 3 words, info(a) = info(b) = log2(3/1); info(a b) = log2(count(a)/count(a b)) = 0
    # hyp "a b c": 1-grams gain 2*log2(3) over 3 -> 2/3 log2 3; higher orders gain 0; length ratio 1
    assert py_e2e(["a b c"], [["a b d"]])["NIST"] == pytest.approx(2 / 3 * math.log2(3))
    # hyp "a b": 1-grams 2*log2(3)/2 = log2 3; length ratio 2/3 -> penalty exactly 0.5 by NIST's beta
    assert py_e2e(["a b"], [["a b d"]])["NIST"] == pytest.approx(0.5 * math.log2(3))


def test_nist_multi_reference_by_hand(e2e_deps):
    # refs "a c", "b c": 4 reference words, info(a) = info(b) = log2(4/1) = 2
    # hyp "a b": a and b both hit (clipped against the max count over refs) -> (2 + 2) / 2 = 2
    # bigram "a b" misses; hyp length 2 = average reference length -> penalty 1.  NIST = 2.
    # (nltk's corpus_nist matches each segment against its single best reference and gives 1.0.)
    assert py_e2e(["a b"], [["a c", "b c"]])["NIST"] == pytest.approx(2.0)


def test_nist_agrees_with_nltk_on_single_references(e2e_deps):
    from nltk.translate.nist_score import corpus_nist

    hyps = ["the eagle is a cheap coffee shop near the river", "alimentum serves chinese food in the city"]
    refs = [
        ["the eagle is a coffee shop near the river that is cheap"],
        ["alimentum is a chinese place in the city centre"],
    ]
    expected = corpus_nist([[r.split() for r in rs] for rs in refs], [h.split() for h in hyps], n=5)
    assert metrics._nist(hyps, refs) == pytest.approx(expected)


def test_rouge_l_by_hand(e2e_deps):
    # hyp "the cat sat on the mat" (6), ref "the cat on mat" (4): LCS "the cat on mat" = 4
    # P = 4/6, R = 4/4; coco's F with beta^2 = 1.44: (1 + 1.44) P R / (R + 1.44 P)
    p, r = 4 / 6, 1.0
    got = py_e2e(["the cat sat on the mat"], [["the cat on mat"]])["ROUGE_L"]
    assert got == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    # coco takes max precision and max recall over the references separately: adding
    # "the cat sat on the red mat" (LCS 6, P = 1) gives P = 1 and R = 1 -> 1.0
    got = py_e2e(["the cat sat on the mat"], [["the cat on mat", "the cat sat on the red mat"]])["ROUGE_L"]
    assert got == pytest.approx(1.0)


def test_cider_by_hand(e2e_deps):
    # 2 segments -> idf weight of an n-gram with document frequency 1 is log(2) - log(1) = log 2 = L.
    # segment 0: hyp "a b", ref "a b": unigram cosine 1, bigram cosine 1, 3/4-grams 0;
    #   length term (coco counts bigrams) 1 vs 1 -> exp(0) = 1; score = 10 * mean(1, 1, 0, 0) = 5
    # segment 1: hyp "c", ref "d": no overlap -> 0.  CIDEr = mean(5, 0) = 2.5
    assert py_e2e(["a b", "c"], [["a b"], ["d"]])["CIDEr"] == pytest.approx(2.5)
    # segment 0 with ref "a b c d": unigram cosine 2L^2 / (L sqrt2 * 2L) = 1/sqrt2,
    #   bigram cosine L^2 / (L * L sqrt3) = 1/sqrt3; bigram counts 1 vs 3 -> exp(-2^2 / (2 * 6^2))
    seg0 = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    assert py_e2e(["a b", "c"], [["a b c d"], ["e"]])["CIDEr"] == pytest.approx(seg0 / 2)


def test_meteor_python_backend_by_hand(e2e_deps):
    # nltk METEOR: fmean = PR / (0.9 P + 0.1 R), penalty = 0.5 * (chunks / matches)^3
    # identical 3 words: P = R = 1, 1 chunk -> 1 - 0.5 / 27
    assert py_e2e(["the cat sat"], [["the cat sat"]])["METEOR"] == pytest.approx(1 - 0.5 / 27)
    # Porter stems match: cats~cat, running~runs -> 2 matches in 1 chunk -> 1 - 0.5 / 8
    assert py_e2e(["cats running"], [["cat runs"]])["METEOR"] == pytest.approx(1 - 0.5 / 8)
    # WordNet synonyms are off in the python backend: big/large do not match
    assert py_e2e(["big"], [["large"]])["METEOR"] == 0.0


def test_python_tokenization_mimics_coco_ptb(e2e_deps):
    # lower-cased, punctuation dropped, clitics split, parentheses kept as -lrb-/-rrb- (coco quirk)
    got = metrics._ptb_python(["The Eagle (near Burger King). It isn't cheap!", ""])
    assert got == ["the eagle -lrb- near burger king -rrb- it is n't cheap", ""]


def test_e2e_metrics_keys_and_perfect_match(e2e_deps):
    hyps = ["The Eagle is a cheap coffee shop.", "Alimentum serves Chinese food."]
    refs = [["The Eagle is a cheap coffee shop.", "The Eagle is cheap."], ["Alimentum serves Chinese food."]]
    out = py_e2e(hyps, refs)
    assert set(out) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["BLEU"] == pytest.approx(1.0)
    assert out["ROUGE_L"] == pytest.approx(1.0)
    assert out["NIST"] > 0 and out["CIDEr"] > 0 and 0.9 < out["METEOR"] <= 1.0


@pytest.mark.parametrize(
    "hyps, refs, match",
    [
        ([], [], "empty"),
        (["a"], [["a"], ["b"]], "1 hypotheses but 2"),
        (["a", "b"], ["a", "b"], "list of strings"),  # references not nested
        (["a"], [[]], "non-empty"),
        ("a b", [["a b"]], "list of strings"),
    ],
)
def test_e2e_input_errors(hyps, refs, match):
    with pytest.raises(ValueError, match=match):
        e2e_metrics(hyps, refs, backend="python")


def test_e2e_backend_selection(e2e_deps, monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        e2e_metrics(["a"], [["a"]], backend="perl")  # type: ignore[arg-type]
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="java"):
        e2e_metrics(["a"], [["a"]], backend="java")
    with pytest.warns(RuntimeWarning, match="falls back"):
        out = e2e_metrics(["a b"], [["a b"]], backend="auto")
    assert out["BLEU"] == pytest.approx(py_e2e(["a b"], [["a b"]])["BLEU"])


def test_e2e_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # makes `import pycocoevalcap` fail
    with pytest.raises(ImportError, match=r"pip install 'lorakit\[metrics\]'"):
        e2e_metrics(["a"], [["a"]], backend="python")


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH")


@needs_java
def test_java_ptb_tokenizer_agrees_on_plain_text(e2e_deps):
    texts = ["The Eagle (near Burger King). It isn't cheap!", "Alimentum serves Chinese food."]
    assert metrics._ptb_java(texts) == metrics._ptb_python(texts)


@needs_java
@pytest.mark.skipif(
    not os.environ.get("LORAKIT_SLOW_TESTS"),
    reason="METEOR 1.5 takes ~10 s to load; set LORAKIT_SLOW_TESTS=1",
)
def test_java_backend_official_pipeline(e2e_deps):
    hyps = ["The Eagle is a cheap coffee shop near Burger King.", "Alimentum serves Chinese food."]
    refs = [
        ["The Eagle is a cheap coffee shop near Burger King."],
        ["Alimentum has Chinese food.", "It is Chinese."],
    ]
    java, py = e2e_metrics(hyps, refs, backend="java"), py_e2e(hyps, refs)
    for key in ("BLEU", "NIST", "ROUGE_L", "CIDEr"):  # same numbers when the tokenizers agree
        assert java[key] == pytest.approx(py[key])
    assert 0.0 < java["METEOR"] < 1.0
