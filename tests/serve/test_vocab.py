"""``lorakit serve`` with adapters that added tokens (``lorakit train --add-tokens``): the server adds the union of
their tokens to its tokenizer and grows the embeddings once, at start; each row of a mixed batch runs its own
adapter's token rows (and LoRA), other rows the base.

One tiny untied LLaMA (56 tokens). Adapters: ``tools`` adds ``<tool> </tool>`` (ids 56, 57; rows in the embedding,
LoRA on q_proj), ``calls`` adds ``<tool> </tool> <call>`` (56..58; rows in the embedding and the untied head, no
LoRA), ``plain`` is LoRA only. Every served greedy continuation equals the offline one of its adapter alone
(token ids), and each token's logprob agrees within 1e-4: the server pads rows of a mixed batch, which changes
fp32 summation order (~1e-6 here); a row given the wrong adapter's rows or the base's differs by far more.
"""

from __future__ import annotations

import threading

import openai
import pytest
import torch

import lorakit
from lorakit.core.checkpoint import read_adapter
from lorakit.models import add_vocabulary, apply_vocabulary, load_model, load_tokenizer, plan_vocabulary
from lorakit.variants.tokens import record_added_tokens
from tests.serve.helpers import add_random_adapters, openai_client, serving

PROMPTS = ["the cat <tool> sat", "<tool> say hi </tool>"]
MAX = 4
SEEN = {"skip_special_tokens": False}  # added tokens are special: shown only when asked


def save_token_adapter(llama_dir, root, name: str, tokens: list[str], head: bool, lora: bool, seed: int) -> dict:
    """Train-like: ``tokens`` added to a fresh base (``lorakit train --add-tokens``), random rows (and LoRA), saved
    as ``root/name``. ``head``: the untied head's rows too, the last token's made to win greedy decoding."""
    model, tok = load_model(str(llama_dir), "sft"), load_tokenizer(str(llama_dir))
    model.config.name_or_path = str(llama_dir)
    ids = add_vocabulary(model, tok, tokens)
    rows = sorted(ids.values())
    spec = {"embed_tokens": rows, "lm_head": rows} if head else rows
    config = lorakit.LoraConfig(r=2, alpha=8, target_modules=["q_proj"] if lora else [], trainable_token_indices=spec,
                                task_type="CAUSAL_LM")
    lorakit.add_lora(model, config, adapter=name)
    record_added_tokens(model, ids, adapter=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, m in model.named_modules():
            if name in getattr(m, "adapters", {}):
                for p in m.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if path.endswith("q_proj") else 1.0))
        if head:
            model.lm_head.adapters[name].trainable_tokens_delta[-1] *= 40.0  # the last added token wins
    lorakit.save_adapter(model, root, adapter=name)
    return ids


@pytest.fixture(scope="module")
def token_dir(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("token_adapters")
    save_token_adapter(llama_dir, root, "tools", ["<tool>", "</tool>"], head=False, lora=True, seed=1)
    save_token_adapter(llama_dir, root, "calls", ["<tool>", "</tool>", "<call>"], head=True, lora=False, seed=2)
    model = load_model(str(llama_dir), "sft")
    model.config.name_or_path = str(llama_dir)
    add_random_adapters(model, root, ["plain"])
    return root


def offline(llama_dir, root, names: list[str]) -> tuple[dict, object]:
    """Greedy ids and their logprobs of each adapter (and the base) alone, batch 1: the base with the union
    vocabulary and every adapter loaded, one at a time active."""
    model, tok = load_model(str(llama_dir), "sft").eval(), load_tokenizer(str(llama_dir))
    meta = {n: read_adapter(root / n)[1]["lorakit"] for n in names}
    vocabulary = plan_vocabulary(tok, meta)
    assert not vocabulary.refused
    apply_vocabulary(model, tok, vocabulary)
    for n in names:
        lorakit.load_adapter(model, root / n, adapter=n)
    want = {}
    for n in [None, *names]:
        with lorakit.disabled(model) if n is None else lorakit.use_adapter(model, n), torch.no_grad():
            for p in PROMPTS:
                ids, new, logprobs = tok(p)["input_ids"], [], []
                for _ in range(MAX):
                    lp = torch.log_softmax(model(torch.tensor([ids + new])).logits[0, -1].float(), -1)
                    new.append(int(lp.argmax()))
                    logprobs.append(float(lp[new[-1]]))
                want[(n, p)] = (new, logprobs)
    return want, tok


def test_served_token_adapters_match_offline_per_row(llama_dir, token_dir):
    names = ["calls", "plain", "tools"]
    want, tok = offline(llama_dir, token_dir, names)
    assert tok.convert_tokens_to_ids(["<tool>", "</tool>", "<call>"]) == [56, 57, 58]
    call = tok.convert_tokens_to_ids("<call>")
    assert all(call in want[("calls", p)][0] and call not in want[(None, p)][0] for p in PROMPTS)  # the head rows
    for p in PROMPTS:  # the embedding rows + LoRA matter far beyond the tolerance
        assert (torch.tensor(want[("tools", p)][1]) - torch.tensor(want[(None, p)][1])).abs().max() > 1e-2
    with serving(llama_dir, token_dir, max_batch_size=8) as url:
        client = openai_client(url)
        got: dict = {}

        def ask(model, p):
            try:
                r = client.completions.create(model=model, prompt=p, max_tokens=MAX, temperature=0, logprobs=0,
                                              extra_body=SEEN)
                got[(None if model == "llama" else model, p)] = r.choices[0]
            except openai.APIError as e:
                got[(model, p)] = e

        threads = [threading.Thread(target=ask, args=(m, p)) for m in ["llama", *names] for p in PROMPTS]
        for t in threads:  # 8 requests over 4 models at once: mixed batches, token rows beside LoRA and base rows
            t.start()
        for t in threads:
            t.join(120)
    assert set(got) == set(want), [e for e in got.values() if isinstance(e, Exception)]
    for key, choice in got.items():
        ids, logprobs = want[key]
        assert choice.text == tok.decode(ids, skip_special_tokens=False), key
        torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs), torch.tensor(logprobs),
                                   atol=1e-4, rtol=0)


def test_the_tokenizer_knows_the_added_tokens(llama_dir, token_dir):
    import httpx

    with serving(llama_dir, token_dir) as url:
        r = httpx.post(url + "/tokenize", json={"model": "tools", "prompt": "<tool> hi <call>"}, timeout=30)
        assert r.status_code == 200, r.text
        tokens = r.json()["tokens"]
    assert tokens[0] == 56 and tokens[-1] == 58 and len(tokens) == 3


def test_plan_vocabulary_takes_the_union_and_refuses_conflicts_by_name(llama_dir):
    tok = load_tokenizer(str(llama_dir))
    n, the = len(tok), tok.convert_tokens_to_ids("the")
    metadata = {
        "a": {"added_tokens": {"<a>": n}, "vocab_size": n + 1},
        "b": {"added_tokens": {"<a>": n, "<b>": n + 1}, "vocab_size": n + 2},  # a superset of a's: joins
        "c": {"added_tokens": {"<c>": n}},  # another token as a's id
        "d": {"added_tokens": {"<b>": n + 2}},  # b's token at another id
        "e": {"added_tokens": {"the": the + 1}},  # a base token at another id
        "f": {"added_tokens": {"<f>": 3}},  # an id the base tokenizer holds
        "g": {"added_tokens": {"<g>": n + 5}},  # a gap after the others' ids: trained on a longer vocabulary
        "h": {"vocab_size": n + 8},  # rows padded beyond the tokens (no token added)
    }
    plan = plan_vocabulary(tok, metadata)
    assert plan.tokens == {"<a>": n, "<b>": n + 1} and plan.rows == n + 8
    assert plan.refused == {
        "c": f"adapters 'a' and 'c' both add id {n}, as '<a>' and '<c>'; one tokenizer cannot hold both: serve "
             "them from separate servers",
        "d": f"adapters 'b' and 'd' add token '<b>' as ids {n + 1} and {n + 2}; one tokenizer cannot hold both: "
             "serve them from separate servers",
        "e": f"adapter 'e' was trained with token 'the' as id {the + 1}; this base tokenizer gives it id {the}: not "
             "the tokenizer it was trained with (serve it with its own base)",
        "f": f"adapter 'f' was trained with token '<f>' as id 3; this base tokenizer has id 3 as "
             f"{tok.convert_ids_to_tokens(3)!r}: not the tokenizer it was trained with (serve it with its own base)",
        "g": f"adapter 'g' was trained with token '<g>' as id {n + 5}, but this base tokenizer and the tokens of the "
             f"other adapters end at id {n + 1}: not the tokenizer it was trained with (serve it with its own base)",
    }
    grown = []
    for _ in range(2):  # the same base grown twice: the same new rows (a fixed seed)
        model, tok = load_model(str(llama_dir), "sft"), load_tokenizer(str(llama_dir))
        apply_vocabulary(model, tok, plan)
        assert tok.convert_tokens_to_ids(["<a>", "<b>"]) == [n, n + 1] and len(tok) == n + 2
        grown.append((model.model.embed_tokens.weight, model.lm_head.weight))
    assert grown[0][0].shape == (n + 8, 32) and grown[0][1].shape == (n + 8, 32)
    assert torch.equal(grown[0][0], grown[1][0]) and torch.equal(grown[0][1], grown[1][1])


@pytest.fixture(scope="module")
def clash_dir(llama_dir, tmp_path_factory):
    """``a_tools`` and ``b_other`` each added a token as id 56; under ``later/`` (not listed at start, loadable
    while running): ``c_same`` added ``<tool>`` as 56 too, ``d_new`` added ``<tool> <new>``."""
    root = tmp_path_factory.mktemp("clash")
    save_token_adapter(llama_dir, root, "a_tools", ["<tool>"], head=False, lora=False, seed=3)
    save_token_adapter(llama_dir, root, "b_other", ["<other>"], head=False, lora=False, seed=4)
    save_token_adapter(llama_dir, root / "later", "c_same", ["<tool>"], head=False, lora=True, seed=5)
    save_token_adapter(llama_dir, root / "later", "d_new", ["<tool>", "<new>"], head=False, lora=False, seed=6)
    return root


def test_conflicting_adapter_fails_by_name_and_dynamic_loads_keep_the_vocabulary(llama_dir, clash_dir):
    """The first listed of two conflicting adapters is served, the other's requests fail naming both. Loaded while
    running: an adapter whose tokens the server holds works; one that needs a new token is refused (the
    embeddings do not grow under running requests), the server unchanged."""
    import httpx

    with serving(llama_dir, clash_dir) as url:
        client = openai_client(url)
        with pytest.raises(openai.APIStatusError, match="adapters 'a_tools' and 'b_other' both add id 56, as "
                                                        "'<tool>' and '<other>'; one tokenizer cannot hold both"):
            client.completions.create(model="b_other", prompt="<tool> hi", max_tokens=2)
        assert client.completions.create(model="a_tools", prompt="<tool> hi", max_tokens=2).usage.completion_tokens
        load = {"lora_name": "c_same", "lora_path": "later/c_same"}
        assert httpx.post(url + "/v1/load_lora_adapter", json=load, timeout=30).status_code == 200
        with_same = client.completions.create(model="c_same", prompt="<tool> hi", max_tokens=2, logprobs=0)
        assert with_same.usage.completion_tokens == 2
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "d_new", "lora_path": "later/d_new"},
                       timeout=30)
        assert r.status_code == 400
        assert "adapter 'd_new' was trained with token '<new>' as id 57; this server does not hold it (the " \
               "vocabulary is fixed at start: put the adapter in --adapters-dir and restart the server)" in r.text
        cards = {m["id"]: m for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
        tokens = httpx.post(url + "/tokenize", json={"prompt": "<tool> <new>"}, timeout=30).json()["tokens"]
    assert "d_new" not in cards and cards["c_same"]["error"] is None and cards["a_tools"]["error"] is None
    assert "adapters 'a_tools' and 'b_other' both add id 56" in cards["b_other"]["error"]
    assert tokens[0] == 56 and len(tokens) > 2  # '<new>' was not added: split into the base's tokens


def test_lorakit_serve_prints_the_adapter_it_will_not_serve(llama_dir, clash_dir, capsys, monkeypatch):
    """The command itself (uvicorn's loop replaced by a no-op: the server starts and stops at once)."""
    import uvicorn

    from lorakit.cli.main import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    assert main(["serve", "--model", str(llama_dir), "--adapters-dir", str(clash_dir), "--port", "0"]) == 0
    out = capsys.readouterr()
    assert "with 2 adapter(s) at http://127.0.0.1:" in out.out
    assert out.err.strip() == ("lorakit serve: adapter 'b_other' fails its requests: adapters 'a_tools' and 'b_other' "
                               "both add id 56, as '<tool>' and '<other>'; one tokenizer cannot hold both: serve them "
                               "from separate servers")
