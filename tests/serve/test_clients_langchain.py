"""LangChain's ``ChatOpenAI`` (langchain-openai), unchanged, against ``lorakit serve``: invoke, stream and batch.
It sends ``max_completion_tokens`` (OpenAI's current name) and messages with the system role; the greedy
answers are checked against the adapter's own greedy continuation computed offline (transformers + PEFT)."""

from __future__ import annotations

import pytest

from tests.serve.helpers_clients import Reference

pytest.importorskip("langchain_openai")
pytest.importorskip("peft")

TOKENS = 5
QUESTIONS = ["say hi", "what is two plus two ?", "the cat sat"]


@pytest.fixture(scope="module")
def chat(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="b", base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=TOKENS,
                      max_retries=0, timeout=60, stream_usage=True)


@pytest.fixture(scope="module")
def reference(llama_dir, llama_adapters):
    return Reference(llama_dir, llama_adapters / "b")


def expected(reference: Reference, messages: list[dict]) -> str:
    return reference.text(reference.greedy(reference.chat_ids(messages), TOKENS))


def test_invoke_sends_max_completion_tokens_and_gets_the_greedy_answer(chat, reference):
    from langchain_core.messages import HumanMessage, SystemMessage

    payload = chat._get_request_payload([HumanMessage("hi")])
    assert payload["max_completion_tokens"] == TOKENS and "max_tokens" not in payload  # what it really sends
    msg = chat.invoke([SystemMessage("the cat"), HumanMessage("say hi")])
    want = expected(reference, [{"role": "system", "content": "the cat"}, {"role": "user", "content": "say hi"}])
    assert msg.content.strip() == want.strip() and want.strip()
    assert msg.usage_metadata["output_tokens"] == TOKENS
    assert msg.response_metadata["finish_reason"] == "length"


def test_stream_pieces_join_to_the_invoked_answer(chat, reference):
    pieces = list(chat.stream("what is two plus two ?"))
    assert len(pieces) >= TOKENS  # it really streamed: at least one chunk per token
    whole = pieces[0]
    for p in pieces[1:]:
        whole = whole + p
    want = expected(reference, [{"role": "user", "content": "what is two plus two ?"}])
    assert whole.content.strip() == want.strip()
    assert whole.usage_metadata["output_tokens"] == TOKENS  # stream_usage: the final usage chunk


def test_batch_answers_each_question_in_order(chat, reference):
    out = chat.batch(QUESTIONS, config={"max_concurrency": 3})  # three requests at once: one engine batch
    want = [expected(reference, [{"role": "user", "content": q}]) for q in QUESTIONS]
    assert [m.content.strip() for m in out] == [w.strip() for w in want]
    assert len(set(want)) == len(QUESTIONS)  # the questions really get different answers
