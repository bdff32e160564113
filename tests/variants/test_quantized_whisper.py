"""Whisper + QLoRA: a tiny random-init speech model loaded by transformers in 4 bits, LoRA on q_proj/v_proj,
trained a few steps, and the adapter read by PEFT (and PEFT's read by lorakit) with the same outputs."""

import pytest
import torch

import lorakit
from lorakit.variants.quantized import LoraQuantLinear
from tests.conftest import train_losses

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _whisper_dir(tmp_path):
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    path = tmp_path / "whisper"
    transformers.WhisperForConditionalGeneration(config).save_pretrained(path)
    return path


def _load_4bit(path):
    """transformers' own 4-bit loading (BitsAndBytesConfig), as users get it; CPU works with bitsandbytes 0.50."""
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return transformers.WhisperForConditionalGeneration.from_pretrained(path, quantization_config=quant,
                                                                        device_map="cpu")


def test_whisper_qlora_trains_and_round_trips_through_peft(tmp_path):
    path = _whisper_dir(tmp_path)
    model = _load_4bit(path)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraQuantLinear)]
    assert len(wrapped) == 6  # encoder self-attn, decoder self- and cross-attn: q and v each
    assert all(isinstance(model.get_submodule(n).base_layer, bnb.nn.Linear4bit) for n in wrapped)
    torch.manual_seed(1)
    features, labels = torch.randn(2, 8, 32), torch.randint(3, 64, (2, 6))
    model.train()
    losses = train_losses(model, steps=4, lr=1e-2, input_features=features, labels=labels)
    assert losses[-1] < losses[0] - 0.1  # observed ~4.16 -> ~3.89: four steps on one batch

    model.eval()
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_load_4bit(path), tmp_path / "ours").eval()
    for m in theirs.modules():  # lorakit keeps 4-bit layers off bitsandbytes' repacked CPU inference kernel (it has
        if isinstance(m, bnb.nn.Linear4bit):  # no backward, and rounds differently): compare on the same kernel
            m.support_avx512bf16_for_cpu = False
    assert type(theirs.base_model.model.model.encoder.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        ours_out = model(input_features=features, decoder_input_ids=labels).logits
        theirs_out = theirs(input_features=features, decoder_input_ids=labels).logits
    # the same 4-bit codes (deterministic quantization) and the same A, B: equal up to fp32 summation order
    assert torch.allclose(ours_out, theirs_out, atol=1e-5)

    theirs.save_pretrained(tmp_path / "peft")
    back = _load_4bit(path)
    lorakit.load_adapter(back, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(back(input_features=features, decoder_input_ids=labels).logits, ours_out, atol=1e-5)
