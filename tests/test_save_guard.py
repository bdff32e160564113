"""save_pretrained on a model holding lorakit adapters refuses; the guard survives copies and pickling and
steps aside once lorakit is gone."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lorakit
from lorakit.save_guard import SavePretrainedGuard
from tests.conftest import MLP, bert, randomize_lora

pytest.importorskip("transformers")


def _adapted():
    torch.manual_seed(0)
    model = lorakit.add_lora(bert(), lorakit.LoraConfig(r=4, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"]))
    randomize_lora(model)
    return model


def test_refuses_with_the_alternatives_and_writes_nothing(tmp_path):
    model = _adapted()
    with pytest.raises(RuntimeError, match=r"BertForSequenceClassification\.save_pretrained.*"
                                           r"lorakit\.save_adapter\(model, dir\).*lorakit\.unload\(model, merge=True\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    torch.manual_seed(0)
    loaded = bert()  # the same base; an adapter attached by load_adapter is guarded the same way
    lorakit.load_adapter(loaded, lorakit.save_adapter(model, tmp_path / "adapter"))
    with pytest.raises(RuntimeError, match="save_adapter"):
        loaded.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_are_guarded_too(tmp_path, how):
    model = _adapted()
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert isinstance(clone.save_pretrained, SavePretrainedGuard) and clone.save_pretrained.model is clone
    with pytest.raises(RuntimeError, match="save_adapter"):
        clone.save_pretrained(tmp_path / "out")


def test_after_unload_or_delete_it_is_transformers_save_pretrained(tmp_path):
    from transformers import BertForSequenceClassification

    model = _adapted()
    x = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    lorakit.unload(model, merge=True).save_pretrained(tmp_path / "merged")
    with torch.no_grad():  # fp32 merge: rounding only
        torch.testing.assert_close(BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()(
            input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
    again = _adapted()
    lorakit.delete_adapter(again, "default")  # the last adapter: every original module is back
    again.save_pretrained(tmp_path / "base")
    assert (tmp_path / "base" / "model.safetensors").is_file()


def test_models_without_save_pretrained_get_no_guard():
    model = lorakit.add_lora(MLP(), lorakit.LoraConfig(r=2, target_modules=["fc1"]))
    assert "save_pretrained" not in vars(model)
