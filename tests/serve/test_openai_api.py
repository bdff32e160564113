"""The OpenAI / vLLM request surface through real HTTP clients, checked against the tiny model's own offline
logits: echo + logprobs on token-id prompts (lm-eval's log-likelihood request), several prompts and ``n``
samples per request, penalties and logit bias decoded beside plain rows, vLLM's sampling extras, chat
content parts and roles, /tokenize and /detokenize, and every refusal by name.

Tolerance for logprobs: 1e-4. The server runs a prompt left-padded in a batch with others (different
matmul shapes: ~1e-6 apart here); a wrong position, token or adapter is off by more than 1e-2.
"""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

import lorakit
from lorakit.models import load_model, load_tokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(llama_dir, llama_adapters):
    """The base with adapter ``a`` active, and the tokenizer: the reference."""
    model, tok = load_model(str(llama_dir), "sft").eval(), load_tokenizer(str(llama_dir))
    lorakit.load_adapter(model, llama_adapters / "a", adapter="a")
    return model, tok


def logprobs_of(model, ids: list[int]) -> torch.Tensor:
    """``(T, V)``: log p(next token | ids[:t+1]) for each position t."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def greedy(model, ids: list[int], n: int, presence=0.0, frequency=0.0, repetition=1.0) -> list[int]:
    """Greedy continuation with OpenAI's penalties (generated tokens) and the repetition penalty (all tokens)."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=len(logits)).float()
        seen = counts > 0
        seen[torch.tensor(ids)] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        out.append(int((logits - presence * (counts > 0) - frequency * counts).argmax()))
    return out


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_logprobs_of_token_id_prompts_equal_offline_logits(http, offline):
    model, tok = offline
    prompts = [tok("the cat sat on a mat")["input_ids"], tok("what is two plus two ?")["input_ids"][:4]]
    body = {"model": "a", "prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0}
    choices = ok(http.post("/v1/completions", json=body))["choices"]  # lm-eval's log-likelihood request
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(prompts, choices, strict=True):
        ref, lp = logprobs_of(model, ids), choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))] + [float(ref[-1].max())]  # then greedy
        assert max(abs(g - w) for g, w in zip(lp["token_logprobs"][1:], want, strict=True)) < TOL
        for j in range(1, len(ids) + 1):  # the top 2 (+ the token itself) with their values
            top2 = ref[j - 1].topk(2)
            got = lp["top_logprobs"][j]
            for t, v in zip(top2.indices.tolist(), top2.values.tolist(), strict=True):
                assert abs(got[tok.decode([t])] - v) < TOL
        assert lp["tokens"][:len(ids)] == [tok.decode([t]) for t in ids]
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(len(ids) + 1)]
        assert choice["text"] == tok.decode(ids) + tok.decode([int(ref[-1].argmax())])
    scored = ok(http.post("/v1/completions", json={**body, "max_tokens": 0}))["choices"]  # the prompt only
    assert [len(c["logprobs"]["tokens"]) for c in scored] == [len(p) for p in prompts]
    assert scored[0]["logprobs"]["token_logprobs"] == choices[0]["logprobs"]["token_logprobs"][:len(prompts[0])]


def test_several_prompts_and_n_samples(client, offline):
    model, tok = offline
    texts = ["the cat sat", "a dog ran", "say hi"]
    r = client.completions.create(model="a", prompt=texts, max_tokens=4, temperature=0, logprobs=0)
    want = [tok.decode(greedy(model, tok(t)["input_ids"], 4)) for t in texts]
    assert [c.text for c in r.choices] == want and [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == sum(len(tok(t)["input_ids"]) for t in texts) and r.usage.completion_tokens == 12
    assert all(len(c.logprobs.tokens) == 4 for c in r.choices)

    def sample(seed, n=4):
        r = client.completions.create(model="a", prompt=["the", "a dog"], max_tokens=6, temperature=1.5, n=n,
                                      seed=seed)
        assert [c.index for c in r.choices] == list(range(2 * n))
        return [c.text for c in r.choices]

    first = sample(3)
    assert first == sample(3)  # reproducible with the seed
    assert len(set(first[:4])) > 1 and len(set(first[4:])) > 1  # n distinct samples of each prompt
    assert sample(3, n=1)[0] == first[0]  # sample 0 keeps the request's own seed
    assert sample(4) != first


def test_penalized_and_plain_rows_decode_in_one_batch(http, offline):
    model, tok = offline
    ids = tok("the cat sat on a mat . a dog")["input_ids"]
    cases = {"plain": {}, "freq": {"frequency_penalty": 2.0, "presence_penalty": 0.5},
             "rep": {"repetition_penalty": 1.8}, "bias": {"logit_bias": {str(tok.convert_tokens_to_ids("cat")): 30}}}
    want = {"plain": greedy(model, ids, 10), "freq": greedy(model, ids, 10, presence=0.5, frequency=2.0),
            "rep": greedy(model, ids, 10, repetition=1.8)}
    assert len({tuple(v) for v in want.values()}) == 3  # each penalty changes this continuation
    got: dict = {}

    def ask(name):
        body = {"model": "a", "prompt": ids, "max_tokens": 10, "temperature": 0, "logprobs": 0, **cases[name]}
        got[name] = ok(http.post("/v1/completions", json=body))["choices"][0]

    threads = [threading.Thread(target=ask, args=(n,)) for n in cases for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, tokens in want.items():
        assert got[name]["logprobs"]["tokens"] == [tok.decode([t]) for t in tokens], name
    assert got["bias"]["text"].split().count("cat") >= 8  # +30 on "cat": nearly every token


def test_vllm_extras_stop_tokens_min_tokens_ignore_eos(http, offline):
    model, tok = offline
    eos, ids = tok.eos_token_id, tok("the cat sat")["input_ids"]
    body = {"model": "a", "prompt": ids, "max_tokens": 5, "temperature": 0, "logit_bias": {str(eos): 100}}

    def run(**extra):
        c = ok(http.post("/v1/completions", json={**body, **extra}))
        return c["choices"][0]["finish_reason"], c["usage"]["completion_tokens"], c["choices"][0]["text"]

    assert run() == ("stop", 0, "")  # EOS forced: it ends the row at once
    assert run(min_tokens=3)[:2] == ("stop", 3)  # EOS barred for 3 tokens
    assert run(ignore_eos=True)[:2] == ("length", 5)
    assert run(ignore_eos=True, skip_special_tokens=False)[2].count("</s>") == 5
    five = greedy(model, ids, 5)
    other = next(t for t in range(5, 50) if t not in five)
    plain = {**body, "logit_bias": None}
    assert run(logit_bias=None, stop_token_ids=[other])[:2] == ("length", 5)
    assert run(logit_bias={str(other): 100}, stop_token_ids=[other])[:2] == ("stop", 0)
    assert run(logit_bias=None, stop_token_ids=[five[0]])[:2] == ("stop", 0)
    c = ok(http.post("/v1/completions", json={**plain, "top_k": 1, "temperature": 1.0, "min_p": 0.1}))
    assert c["choices"][0]["text"] == tok.decode(greedy(model, ids, 5))  # top-k 1 is greedy


def test_chat_parts_roles_and_logprobs(client, http, offline):
    model, tok = offline
    plain = [{"role": "system", "content": "say hi"}, {"role": "user", "content": "the cat\nsat"}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "say hi"}]},
             {"role": "user", "content": [{"type": "text", "text": "the cat"}, {"type": "text", "text": "sat"}]}]
    a = client.chat.completions.create(model="a", messages=plain, max_completion_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    b = client.chat.completions.create(model="a", messages=parts, max_completion_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content and a.usage.completion_tokens == 4
    ids = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    ref = greedy(model, tok(ids, add_special_tokens=False)["input_ids"], 4)
    content = a.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in ref]
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - TOL for c in content)
    history = [*plain, {"role": "assistant", "content": "hi"}, {"role": "tool", "content": "four",
                                                                  "tool_call_id": "t1"}]
    r = client.chat.completions.create(model="a", messages=history, max_tokens=2, n=3, temperature=1.0, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="a", messages=plain, max_completion_tokens=4, temperature=0,
                                                 stream=True, logprobs=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a.choices[0].message.content
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == 4


def test_tokenize_detokenize_round_trip(http, offline):
    _, tok = offline
    r = ok(http.post("/tokenize", json={"model": "a", "prompt": "the cat sat", "return_token_strs": True}))
    assert r["tokens"] == tok("the cat sat")["input_ids"] and r["count"] == 3 and r["max_model_len"] == 64
    assert r["token_strs"] == ["the", "cat", "sat"]
    assert ok(http.post("/detokenize", json={"tokens": r["tokens"]}))["prompt"] == "the cat sat"
    chat = ok(http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    info = ok(http.get("/tokenizer_info"))
    assert info["eos_token"] == "</s>" and info["chat_template"] == tok.chat_template


REFUSALS = [  # (route, extra body, the field the 400 names)
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": [5, 10**6]}, "prompt[0]"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ("/v1/completions", {"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"verbosity": "low"}, "verbosity"),
    ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", {"store": True}, "store"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
     "messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/tokenize", {}, "prompt"),
]


@pytest.mark.parametrize(("route", "extra", "field"), REFUSALS, ids=[f"{r}:{f}" for r, _, f in REFUSALS])
def test_each_refusal_is_a_400_naming_its_field(http, route, extra, field):
    body = {"model": "a", "max_tokens": 2}
    body |= {"prompt": "the cat"} if route == "/v1/completions" else {}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if route == "/v1/chat/completions" else {}
    if route in ("/tokenize", "/detokenize"):
        body = {}
    r = http.post(route, json=body | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field.split("[")[0] in error["message"], error


def test_harmless_fields_are_accepted(client):
    r = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
                                       parallel_tool_calls=True, tool_choice="none")
    assert r.usage.completion_tokens == 2


def test_openapi_declares_every_status_and_content_type(http):
    spec = ok(http.get("/openapi.json"))["paths"]
    assert set(spec["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec[path]["post"]["responses"]
        assert {"400", "401", "404", "413", "422", "500", "503"} <= set(responses)
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {"400", "413", "422"} <= set(spec["/v1/load_lora_adapter"]["post"]["responses"])
    assert {"404", "409"} <= set(spec["/v1/unload_lora_adapter"]["post"]["responses"])
    for path in ("/tokenize", "/detokenize"):
        assert {"400", "404", "422"} <= set(spec[path]["post"]["responses"])
