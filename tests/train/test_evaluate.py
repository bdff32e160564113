"""generate_texts (used by `lorakit generate` and E2E evaluation) checks its prompts before decoding."""

import pytest
import torch

from lorakit.train.evaluate import generate_texts
from tests.train.helpers_tokenizer import tiny_tokenizer


def test_generate_texts_refuses_empty_prompts_and_lengths_past_the_positions():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=len(tok), n_positions=64,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_texts(model, tok, [[5, 6], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="a prompt of 3 tokens \\+ 62 new tokens exceeds the model's 64 positions"):
        generate_texts(model, tok, [[5], [5, 6, 7]], max_new_tokens=62)
    out = generate_texts(model, tok, [[5], [5, 6, 7]], max_new_tokens=61)  # 3 + 61 = 64 fits exactly
    assert len(out) == 2
