"""Structured output (``response_format``): a JSON-constrained row and a free row decode in the same
steps, the constrained output parses and validates against its schema (random weights: the grammar alone
makes it JSON), the free row is untouched by its neighbour's mask, and bad formats are 400s naming them."""

from __future__ import annotations

import json
import threading

import jsonschema
import openai
import pytest

from lorakit.serve.jobs import Finished, GenJob
from lorakit.serve.loading import build_frontend
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.structured import RowGrammar
from tests.serve.helpers import openai_client, serving

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
MAX = 96  # tokens: the schema's longest output is ~50 byte-level tokens, so no row is cut by the budget
FREE = 16  # tokens of a free row
# {"type": "json_object"} bounds nothing: with random weights a row may write one string forever. Seed 4 at
# temperature 1 closes its object within 10 tokens on the test model, so those rows are checked in full.
OBJECT_SEED = 4


class _Events(list):
    """A job's results, kept in order (the engine thread puts them)."""

    def put(self, event) -> None:
        self.append(event)


def _job(front, adapter, prompt, fmt=None, temperature=0.0, seed=None):
    events = _Events()
    ids = front.encode(prompt)
    grammar = front.grammars.row(fmt) if fmt is not None else None
    sampling = SamplingParams(temperature=temperature, seed=seed, processors=[lambda: grammar] if grammar else [])
    return GenJob(adapter, ids, MAX if fmt else FREE, events, sampling), events


def _run(front, jobs) -> list[list[tuple[bool, ...]]]:
    """Submit ``jobs`` before the engine starts (one admission, one batch); returns, per decode step, which
    rows were constrained."""
    engine, steps = front.engine, []
    step = engine._step

    def recording():
        steps.append(tuple(any(isinstance(p, RowGrammar) for p in j.sampler.processors) for j in engine.rows))
        step()

    engine._step = recording
    for job, _ in jobs:
        engine.submit(job)
    engine.start()
    engine.stop(timeout=120)
    return steps


def _done(front, job_events) -> tuple[str, str]:
    """(finish reason, text) of a finished job."""
    job, events = job_events
    assert isinstance(events[-1], Finished), events[-1]
    return events[-1].reason, front.decode(job.generated)


def test_constrained_and_free_rows_share_steps(json_llama, json_adapters):
    prompts = ["the cat sat", "what is two plus two ?"]
    alone = build_frontend(str(json_llama), adapters_dir=json_adapters)
    free_alone = _job(alone, "b", prompts[1])
    _run(alone, [free_alone])

    front = build_frontend(str(json_llama), adapters_dir=json_adapters)
    jobs = [_job(front, "a", prompts[0], FORMAT), _job(front, "b", prompts[1]),
            *[_job(front, None, prompts[0], FORMAT, temperature=1.0, seed=s) for s in range(4)],
            _job(front, None, prompts[1], {"type": "json_object"}, temperature=1.0, seed=OBJECT_SEED)]
    steps = _run(front, jobs)
    assert any(True in s and False in s for s in steps)  # both kinds of row in one decode step
    for job, fmt in zip(jobs, [FORMAT, None, *[FORMAT] * 4, {"type": "json_object"}], strict=True):
        reason, text = _done(front, job)
        if fmt is None:
            assert reason == "length"
            continue
        assert reason == "stop", (fmt, text)  # the grammar ended the row, not the budget
        value = json.loads(text)
        if fmt is FORMAT:
            jsonschema.validate(value, SCHEMA)
        else:
            assert isinstance(value, dict)
    # the free row beside the constrained ones gives what it gives alone (greedy)
    assert _done(front, jobs[1]) == _done(alone, free_alone)


@pytest.fixture(scope="module")
def server(json_llama, json_adapters):
    with serving(json_llama, json_adapters, max_batch_size=8) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url)


def test_http_chat_and_completions_json_beside_free(client):
    got: dict = {}

    def chat(key, fmt, model="a"):
        kw = {"response_format": fmt} if fmt else {}
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "the cat"}],
                                           max_tokens=MAX if fmt else FREE, temperature=1.0, seed=3, **kw)
        got[key] = r.choices[0]

    def complete(key, fmt, model="b"):
        kw = {"extra_body": {"response_format": fmt}} if fmt else {}
        seed = OBJECT_SEED if fmt and fmt["type"] == "json_object" else 5
        r = client.completions.create(model=model, prompt="a dog ran", max_tokens=MAX if fmt else FREE,
                                      temperature=1.0, seed=seed, **kw)
        got[key] = r.choices[0]

    calls = [(chat, "chat-json", FORMAT), (chat, "chat-free", None), (complete, "cmpl-json", FORMAT),
             (complete, "cmpl-obj", {"type": "json_object"}), (complete, "cmpl-free", None)]
    threads = [threading.Thread(target=f, args=(k, fmt)) for f, k, fmt in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    jsonschema.validate(json.loads(got["chat-json"].message.content), SCHEMA)
    jsonschema.validate(json.loads(got["cmpl-json"].text), SCHEMA)
    assert got["cmpl-obj"].finish_reason == "stop" and isinstance(json.loads(got["cmpl-obj"].text), dict)
    assert got["chat-free"].finish_reason == got["cmpl-free"].finish_reason == "length"


@pytest.mark.parametrize("fmt, where", [
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}}, "'bad' is not a valid"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "json_schema.name"),
    ({"type": "json_schema"}, "json_schema is required"),
])
def test_bad_response_format_is_a_400_naming_it(client, fmt, where):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}],
                                       response_format=fmt, max_tokens=4)
    assert e.value.status_code == 400 and where in e.value.message
