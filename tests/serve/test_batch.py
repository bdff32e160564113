"""The decode batch's KV cache (``serve/batch.py``): appending in place gives what transformers'
concatenating ``DynamicLayer`` gives, and copies the cache only when its free columns run out."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from lorakit.serve import batch as B


def test_spare_layer_holds_what_concatenation_holds_and_reallocates_rarely():
    g = torch.Generator().manual_seed(0)
    prompt = [torch.randn(3, 2, 5, 4, generator=g) for _ in range(2)]
    spare, plain = B.SpareLayer(*prompt), DynamicLayer()
    plain.update(*prompt)
    storages = {spare.keys.untyped_storage().data_ptr()}
    for _ in range(40):  # 40 decode steps: the width goes 5 -> 45
        step = [torch.randn(3, 2, 1, 4, generator=g) for _ in range(2)]
        got, want = spare.update(*step), plain.update(*step)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)  # the same values copied: bit for bit
        storages.add(spare.keys.untyped_storage().data_ptr())
    # 5 columns adopted, then room made at widths 6 (+16 free), 23 (+16) and 40 (+16): 3 copies in 40 steps
    assert len(storages) == 4
    assert spare.get_seq_length() == 45 and spare.buffers[0].shape[-2] == 56


def test_spare_columns_cost_at_most_an_eighth_of_a_long_cache():
    assert B.spare_columns(8) == 16
    assert B.spare_columns(4096) == 512


def test_decoding_with_the_spare_cache_equals_transformers_own_cache():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        ours = B.make_cache(B.cache_tensors(B.output_cache(out)))
        theirs = B.output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(25):
            a = model(input_ids=token, cache=ours, use_cache=True).logits
            b = model(input_ids=token, cache=theirs, use_cache=True).logits
            # the same keys and values, read through a strided view instead of a fresh tensor: float32
            # attention may block its sums differently, so allow rounding (1e-5), not a different result
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            token = a[:, -1:].argmax(-1)
    assert ours.get_seq_length() == theirs.get_seq_length() == 7 + 25


def test_left_pad_and_positions():
    ids, mask = B.left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert B.positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_select_keeps_rows_and_trims_columns_that_only_padding_fills():
    keys = torch.arange(2 * 1 * 3 * 1.0).reshape(2, 1, 3, 1)
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    same, same_mask = B.select([(keys, keys)], mask, [0, 1])
    assert same[0][0] is keys and same_mask is mask  # every row kept and no padding-only column: no copy
    tensors, m = B.select([(keys, keys)], mask, [1])
    assert m.tolist() == [[1]] and tensors[0][0].flatten().tolist() == [5.0]  # row 1's two padding columns dropped
