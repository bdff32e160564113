"""TRL's SFTTrainer over a tiny random-init LLaMA with LoRA on q/v, trained on Alpaca-style records
(instruction / input / output, turned into prompt / completion): adapter checkpoints that reload in
lorakit and PEFT with the same outputs, and resume equal to the uninterrupted run."""

from __future__ import annotations

import pytest
import torch

import lorakit
from tests.integrations.helpers import adapter_tensors, files, full_model_bytes
from tests.train.helpers_tokenizer import tiny_tokenizer

pytest.importorskip("trl")

ALPACA = ("Below is an instruction that describes a task . Write a response that appropriately completes "
          "the request . ### Instruction : {instruction} ### Response :")
RECORDS = [
    {"instruction": "what is two plus two ?", "input": "", "output": "it is four ."},
    {"instruction": "say hi", "input": "", "output": "hi there"},
    {"instruction": "name a pub near the city centre", "input": "", "output": "The Vaults"},
    {"instruction": "what sat on a mat ?", "input": "the cat sat on a mat .", "output": "the cat"},
] * 2


def alpaca(record: dict) -> dict:
    prompt = ALPACA.format(instruction=record["instruction"])
    if record["input"]:
        prompt = prompt.replace("### Response", f"### Input : {record['input']} ### Response")
    return {"prompt": prompt, "completion": " " + record["output"]}


def llama_base(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=vocab, max_position_embeddings=128, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def train(out, resume=None, seed=0):
    from datasets import Dataset
    from trl import SFTConfig

    from lorakit.integrations.sft import LoraSFTTrainer

    tok = tiny_tokenizer()
    model = llama_base(len(tok))
    torch.manual_seed(seed)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    config = SFTConfig(str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                       report_to=[], use_cpu=True, logging_steps=100, disable_tqdm=True, seed=0, max_length=64,
                       bf16=False)  # TRL's default is bf16 autocast; fp32 keeps the comparisons below tight
    trainer = LoraSFTTrainer(model=model, args=config, processing_class=tok,
                             train_dataset=Dataset.from_list([alpaca(r) for r in RECORDS]))
    trainer.train(resume_from_checkpoint=resume)
    return model.eval(), tok


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    model, tok = train(out)
    return model, tok, out


def test_sft_checkpoints_hold_the_adapter(run):
    model, tok, out = run
    listing = files(out / "checkpoint-4")
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt"} <= set(listing)
    assert not any(name.startswith("model") for name in listing)  # no model.safetensors(.index.json)
    weights = sum(size for name, size in listing.items() if name.endswith(".safetensors"))
    assert weights < full_model_bytes(llama_base(len(tok))) / 10  # a full save writes every base weight
    saved = adapter_tensors(out / "checkpoint-4")
    assert len(saved) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(torch.equal(saved[k], v) for k, v in lorakit.lora_state_dict(model).items())
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # B started at zero: it trained


def test_sft_adapter_reloads_in_lorakit_and_peft(run):
    peft = pytest.importorskip("peft")
    model, tok, out = run
    ids = tok(alpaca(RECORDS[0])["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        fresh = llama_base(len(tok))
        lorakit.load_adapter(fresh, out / "checkpoint-4")
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
        peft_model = peft.PeftModel.from_pretrained(llama_base(len(tok)), out / "checkpoint-4").eval()
        # PEFT's own LoRA forward: fp32 rounding only
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(llama_base(len(tok)).eval()(input_ids=ids).logits, expected, atol=1e-4)


def test_sft_resume_gives_the_uninterrupted_adapter(run, tmp_path):
    model, _, out = run
    resumed, _ = train(tmp_path, resume=str(out / "checkpoint-2"), seed=3)
    full, again = lorakit.lora_state_dict(model), lorakit.lora_state_dict(resumed)
    assert all(torch.equal(full[k], again[k]) for k in full)  # CPU, same steps replayed: bit for bit
