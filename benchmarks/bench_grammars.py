"""Which grammar library keeps random-weight output valid: llguidance vs xgrammar on one JSON Schema.

Each sample draws every token at random (softmax of N(0, 3) logits) from what the grammar's mask allows, on
the byte-level test tokenizer (``tests/serve/helpers_json.py``), until the grammar ends the output. Random
logits are the harshest model: anything the mask lets through is eventually drawn. A sample counts as bad if
``json.loads`` refuses it or it does not validate against the schema (``jsonschema``). One torch thread.

    PYTHONPATH=src:. python benchmarks/bench_grammars.py [--samples 200]
"""

from __future__ import annotations

import argparse
import json
import time

import jsonschema
import torch
from tests.serve.helpers_json import bytes_tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0,
                                                                             "maximum": 999},
                         "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                            "maxItems": 3}}}


def _bits(words: torch.Tensor, vocab: int) -> torch.Tensor:
    return ((words.reshape(-1).unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()[:vocab]


class Llg:
    def __init__(self, tok, vocab):
        import llguidance
        import llguidance.hf

        self.ll, self.vocab = llguidance, vocab
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})

    def start(self):
        self.m = self.ll.LLMatcher(self.tok, self.grammar, log_level=0)

    def allowed(self):
        return _bits(torch.frombuffer(bytearray(self.m.compute_bitmask()), dtype=torch.int32), self.vocab)

    def accept(self, t) -> bool:  # True: the output is complete
        assert self.m.consume_token(t), self.m.get_error()
        return self.m.is_stopped()


class Xgr:
    def __init__(self, tok, vocab):
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
        self.grammar = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(SCHEMA, any_whitespace=False)
        self.mask = xgr.allocate_token_bitmask(1, vocab)
        self.eos = tok.eos_token_id

    def start(self):
        self.m = self.xgr.GrammarMatcher(self.grammar)

    def allowed(self):
        self.m.fill_next_token_bitmask(self.mask, 0)
        return _bits(self.mask, self.vocab)

    def accept(self, t) -> bool:
        assert self.m.accept_token(t)
        if not self.m.is_completed():
            return False
        others = self.allowed().clone()
        others[self.eos] = False
        return not others.any()


def run(lib, tok, samples: int) -> tuple[int, int, float, list[str]]:
    bad, tokens, examples = 0, 0, []
    t0 = time.perf_counter()
    for seed in range(samples):
        g = torch.Generator().manual_seed(seed)
        lib.start()
        out = []
        for _ in range(200):
            logits = torch.randn(lib.vocab, generator=g) * 3
            logits[~lib.allowed()] = float("-inf")
            t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
            if t == tok.eos_token_id:
                break
            out.append(t)
            if lib.accept(t):
                break
        tokens += len(out)
        text = tok.decode(out, skip_special_tokens=True)
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError) as e:
            bad += 1
            if len(examples) < 2:
                examples.append(f"{text!r}: {str(e).splitlines()[0]}")
    return bad, tokens, time.perf_counter() - t0, examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = bytes_tokenizer()
    for name, cls in (("llguidance", Llg), ("xgrammar", Xgr)):
        t0 = time.perf_counter()
        lib = cls(tok, len(tok))
        setup = time.perf_counter() - t0
        bad, tokens, secs, examples = run(lib, tok, args.samples)
        print(f"{name:10s} invalid {bad}/{args.samples}  setup {1e3 * setup:.1f} ms  "
              f"{1e6 * secs / max(tokens, 1):.0f} us/token (mask + sample)")
        for e in examples:
            print("   e.g.", e)


if __name__ == "__main__":
    main()
