"""The official ``openai`` client, unchanged, with the parameters in everyday use, against ``lorakit serve``;
every answer is checked against the adapter's own logits computed offline (transformers + PEFT, float32).

Tolerance for log-probabilities: 1e-4. Both sides run float32; batching rows of different lengths with
padding moves a log-probability by ~1e-6, a wrong token or position by far more than 1e-4.
"""

from __future__ import annotations

import math

import openai
import pytest

from tests.serve.helpers_clients import Reference

pytest.importorskip("peft")

TOL = 1e-4
N = 5  # tokens per answer


@pytest.fixture(scope="module")
def ref(llama_dir, llama_adapters):
    return Reference(llama_dir, llama_adapters / "a")


def greedy_text(ref: Reference, ids: list[int], n: int = N, **kw) -> str:
    return ref.text(ref.greedy(ids, n, **kw))


# ----- completions: prompt forms ----------------------------------------------------------------------------
def test_prompt_as_string_list_token_ids_and_lists_of_token_ids(client, ref):
    texts = ["the cat sat", "what is two plus two ?", "say hi"]
    ids = [ref.encode(t) for t in texts]
    # token ids are used as given: an EOS inside a prompt would vanish if the server decoded and re-encoded
    odd = ids[0][:2] + [ref.tokenizer.eos_token_id] + ids[0][2:]
    want = [greedy_text(ref, i) for i in ids]
    assert len(set(want)) == len(texts)

    def ask(prompt):
        r = client.completions.create(model="a", prompt=prompt, max_tokens=N, temperature=0)
        assert [c.index for c in r.choices] == list(range(len(r.choices)))
        return r

    assert ask(texts[0]).choices[0].text.strip() == want[0].strip()
    assert [c.text.strip() for c in ask(texts).choices] == [w.strip() for w in want]
    assert ask(ids[1]).choices[0].text.strip() == want[1].strip()
    r = ask([*ids, odd])
    assert [c.text.strip() for c in r.choices] == [w.strip() for w in [*want, greedy_text(ref, odd)]]
    assert r.usage.prompt_tokens == sum(map(len, ids)) + len(odd)
    assert r.usage.completion_tokens == N * 4


# ----- completions: echo and logprobs -------------------------------------------------------------------------
def test_echo_logprobs_as_lm_eval_asks_for_them(client, ref):
    """``echo: true, logprobs: 1, max_tokens: 1`` over several token-id prompts: the prompt's own log-likelihood."""
    prompts = [ref.encode("the cat sat on a mat"), ref.encode("two plus two is four")]
    r = client.completions.create(model="a", prompt=prompts, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert len(r.choices) == 2
    for choice, ids in zip(r.choices, prompts, strict=True):
        lp = choice.logprobs
        full = ref.logprobs(ids)
        nxt = int(full[-1].argmax())
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - float(full[i - 1, ids[i]])) < TOL
            assert abs(max(lp.top_logprobs[i].values()) - float(full[i - 1].max())) < TOL
        assert abs(lp.token_logprobs[-1] - float(full[-1, nxt])) < TOL  # the generated token, greedy
        assert lp.tokens == [ref.tokenizer.decode([t]) for t in ids + [nxt]]
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        assert choice.text.startswith(ref.text(ids))  # echo: the prompt, then the continuation


def test_logprobs_and_top_logprobs_of_generated_tokens(client, ref):
    ids = ref.encode("what is two plus")
    r = client.completions.create(model="a", prompt="what is two plus", max_tokens=N, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    out = ref.greedy(ids, N)
    assert len(lp.tokens) == N
    for i, tok in enumerate(out):
        dist = ref.logprobs(ids + out[:i])[-1]
        assert abs(lp.token_logprobs[i] - float(dist[tok])) < TOL
        top = dist.topk(3)
        assert len(lp.top_logprobs[i]) >= 3
        best = sorted(lp.top_logprobs[i].values(), reverse=True)[:3]
        assert all(abs(a - float(b)) < TOL for a, b in zip(best, top.values, strict=True))
        assert lp.text_offset[i] == len(r.choices[0].text[:lp.text_offset[i]])  # within the text
    assert lp.text_offset == sorted(lp.text_offset)


# ----- completions: n, seed, penalties, logit_bias, vLLM's extra fields --------------------------------------------
def test_n_samples_are_reproducible_with_a_seed(client):
    def ask(seed):
        r = client.completions.create(model="a", prompt="the", max_tokens=N, temperature=2.0, n=8, seed=seed)
        assert [c.index for c in r.choices] == list(range(8)) and r.usage.completion_tokens == 8 * N
        return [c.text for c in r.choices]

    first = ask(3)
    assert ask(3) == first
    assert len(set(first)) > 1  # n distinct samples, not one sample copied n times


def test_penalties_and_logit_bias_match_the_reference(client, ref):
    prompt = "the cat sat"
    ids = ref.encode(prompt)
    plain = greedy_text(ref, ids, 8)

    def ask(**kw):
        return client.completions.create(model="a", prompt=prompt, max_tokens=8, temperature=0, **kw).choices[0].text

    for kw, ref_kw in [({"presence_penalty": 2.0}, {"presence": 2.0}), ({"frequency_penalty": 1.5}, {"frequency": 1.5}),
                       ({"extra_body": {"repetition_penalty": 1.8}}, {"repetition": 1.8})]:
        want = greedy_text(ref, ids, 8, **ref_kw)
        assert ask(**kw).strip() == want.strip(), kw
    assert any(greedy_text(ref, ids, 8, **k).strip() != plain.strip() for k in
               ({"presence": 2.0}, {"frequency": 1.5}, {"repetition": 1.8}))  # the penalties really change things
    mat = ref.tokenizer.convert_tokens_to_ids("mat")
    assert ask(logit_bias={str(mat): 100}).split() == ["mat"] * 8


def test_vllm_sampling_fields(client, ref):
    # a prompt whose greedy answer brings a new token after the first (stop_token_ids below cuts there)
    prompt, out, at = next((p, o, i) for p in ("say hi", "the cat sat", "what is two plus", "a dog ran")
                           for o in [ref.greedy(ref.encode(p), N)] for i in range(1, N) if o[i] not in o[:i])

    def ask(**extra):
        return client.completions.create(model="a", prompt=prompt, max_tokens=N, temperature=1.0, seed=0,
                                         extra_body=extra).choices[0]

    assert ask(top_k=1).text.strip() == ref.text(out).strip()  # top_k=1 at T=1 is greedy
    tiny_p = client.completions.create(model="a", prompt=prompt, max_tokens=N, temperature=1.0, top_p=5e-324)
    assert tiny_p.choices[0].text.strip() == ref.text(out).strip()  # the nucleus keeps the top token (fuzz: a 500)
    cold = client.completions.create(model="a", prompt=prompt, max_tokens=N, temperature=1e-300)
    assert cold.choices[0].text.strip() == ref.text(out).strip()  # logits / 1e-300 overflow: T -> 0 is greedy
    tiny_rep = client.completions.create(model="a", prompt=prompt, max_tokens=N, temperature=1.0,
                                         extra_body={"repetition_penalty": 1e-323, "ignore_eos": True})
    assert tiny_rep.usage.completion_tokens == N  # seen logits / 1e-323 overflow to inf (fuzz: a 500)
    assert ask(min_p=1.0).text.strip() == ref.text(out).strip()  # only the most likely token survives
    stop = ask(stop_token_ids=[out[at]], top_k=1)
    assert stop.finish_reason == "stop" and stop.text.strip() == ref.text(out[:at]).strip()
    r = client.completions.create(model="a", prompt=prompt, max_tokens=N, temperature=0,
                                  extra_body={"min_tokens": 3, "stop_token_ids": [out[0]], "ignore_eos": True})
    assert r.usage.completion_tokens >= 3  # the stop token is held back until min_tokens
    user = ref.tokenizer.convert_tokens_to_ids("<|user|>")  # a special token, forced by logit_bias
    special = client.completions.create(model="a", prompt="say hi", max_tokens=2, temperature=0,
                                        logit_bias={str(user): 100}, extra_body={"skip_special_tokens": False})
    assert special.choices[0].text.split() == ["<|user|>"] * 2
    hidden = client.completions.create(model="a", prompt="say hi", max_tokens=2, temperature=0,
                                       logit_bias={str(user): 100})
    assert "<|user|>" not in hidden.choices[0].text and hidden.usage.completion_tokens == 2


# ----- chat -------------------------------------------------------------------------------------------------------
def test_chat_max_completion_tokens_content_parts_and_roles(client, ref):
    messages = [{"role": "developer", "content": "the cat"}, {"role": "user", "content": "say hi"}]
    # the tiny chat template has no developer role: OpenAI's new name for the system role is served as system
    want = greedy_text(ref, ref.chat_ids([{"role": "system", "content": "the cat"}, messages[1]]))
    assert want != greedy_text(ref, ref.chat_ids(messages))  # a template rendering "<|developer|>" would differ
    r = client.chat.completions.create(model="a", messages=messages, max_completion_tokens=N, temperature=0)
    assert r.usage.completion_tokens == N and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.strip() == want.strip()
    parts = [{"role": "developer", "content": [{"type": "text", "text": "the cat"}]},
             {"role": "user", "content": [{"type": "text", "text": "say"}, {"type": "text", "text": " hi"}]}]
    r2 = client.chat.completions.create(model="a", messages=parts, max_completion_tokens=N, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content  # parts join to the same text
    convo = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "say hi"},
             {"role": "assistant", "content": "hi there"}, {"role": "tool", "content": "four", "tool_call_id": "t1"},
             {"role": "user", "content": "what is two plus two ?"}]
    want = greedy_text(ref, ref.chat_ids([{"role": m["role"], "content": m["content"]} for m in convo]))
    r3 = client.chat.completions.create(model="a", messages=convo, max_completion_tokens=N, temperature=0)
    assert r3.choices[0].message.content.strip() == want.strip()


def test_chat_refuses_a_non_text_part_naming_it(client):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="a", max_completion_tokens=2,
                                       messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}])


def test_chat_logprobs_top_logprobs_n_and_seed(client, ref):
    messages = [{"role": "user", "content": "what is two plus two ?"}]
    ids = ref.chat_ids(messages)
    out = ref.greedy(ids, N)
    r = client.chat.completions.create(model="a", messages=messages, max_completion_tokens=N, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == N
    for i, (tok, item) in enumerate(zip(out, content, strict=True)):
        dist = ref.logprobs(ids + out[:i])[-1]
        assert item.token == ref.tokenizer.decode([tok])
        assert abs(item.logprob - float(dist[tok])) < TOL
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token
        assert abs(item.top_logprobs[1].logprob - float(dist.topk(2).values[1])) < TOL

    def sample(seed):
        r = client.chat.completions.create(model="a", messages=messages, max_completion_tokens=N, temperature=2.0,
                                           n=4, seed=seed)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        return [c.message.content for c in r.choices]

    assert sample(11) == sample(11)
    assert math.isclose(r.usage.completion_tokens, N)
