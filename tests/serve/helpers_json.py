"""A tiny causal LM whose tokenizer can write any text (byte-level BPE): structured-output tests need
``{``, ``"`` and digits, which the word-level test tokenizer lacks."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.train.helpers_tokenizer import CHAT_TEMPLATE

CORPUS = ['{"name": "cat", "age": 4, "tags": ["a", "b"], "ok": true, "none": null, "x": -1.5e3}',
          "the cat sat on a mat . a dog ran . what is two plus two ? it is four ."]


def bytes_tokenizer():
    """Byte-level BPE (every byte is a token, ~300 merges over :data:`CORPUS`); ``</s>`` EOS, ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    out.add_special_tokens({"additional_special_tokens": specials[2:]})
    out.chat_template = CHAT_TEMPLATE
    return out


def save_json_llama(path: Path, hidden: int = 32, ctx: int = 256) -> Path:
    """A random-init 2-layer LLaMA over :func:`bytes_tokenizer`, saved with it in ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bytes_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=2 * hidden, vocab_size=len(tok), max_position_embeddings=ctx,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # EOS never wins on its own: a free row runs to max_tokens
        model.lm_head.weight[tok.all_special_ids] = 0.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
