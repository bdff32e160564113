"""An offline reference for the client tests: the saved base + one adapter loaded by transformers and PEFT
(not lorakit), asked for its own logits. Greedy decoding here applies OpenAI's penalties and ``logit_bias``
the way OpenAI documents them, so a server's answer can be checked token by token."""

from __future__ import annotations

from pathlib import Path

import torch


class Reference:
    def __init__(self, base: Path, adapter: Path | None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.model = (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(base)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab) log-probabilities of the next token after each prefix."""
        logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, -1)

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int, presence: float = 0.0, frequency: float = 0.0,
               bias: dict[int, float] | None = None, repetition: float = 1.0) -> list[int]:
        """``n`` greedy tokens after ``ids``. OpenAI's presence/frequency penalties count the generated
        tokens only; vLLM's ``repetition_penalty`` divides positive logits (multiplies negative ones) of every
        token seen in the prompt or the output (the CTRL rule that transformers uses too)."""
        out: list[int] = []
        for _ in range(n):
            logits = self.model(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            seen = torch.tensor(sorted(set(ids + out)))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition, logits[seen] * repetition)
            for tok, b in (bias or {}).items():
                logits[tok] += b
            out.append(int(logits.argmax()))
        return out

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
