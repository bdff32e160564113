"""Schemathesis, driven by the server's own OpenAPI schema, against a live loopback server: every operation gets
generated requests, valid (positive) and invalid (negative) by the schema; no response may be a 5xx, have a
status code or content type the schema does not declare, or a body that does not match the declared schema.
The server must still be healthy afterwards.

Bounded: ``EXAMPLES`` requests per operation and mode, derandomized (the same requests on every run, so CI
cannot flake), no Hypothesis database. ``LORAKIT_FUZZ_EXAMPLES=N`` (positive; negative gets half) and
``LORAKIT_FUZZ_SEED=S`` (random instead of derandomized) run a longer fuzz by hand:

    LORAKIT_FUZZ_EXAMPLES=200 LORAKIT_FUZZ_SEED=1 pytest tests/serve/test_schema_fuzz.py -s
"""

from __future__ import annotations

import os

import pytest

from lorakit.serve.app import create_app
from lorakit.serve.loading import build_frontend
from tests.serve.helpers import running

schemathesis = pytest.importorskip("schemathesis")

_N = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "10"))
EXAMPLES = {"positive": _N, "negative": max(_N // 2, 1)}
SEED = os.environ.get("LORAKIT_FUZZ_SEED")
MODELS = ["a", "llama", "b", "c", "no-such-model"]


@pytest.fixture(scope="module")
def server(llama_dir, llama_adapters):
    # its own server: the fuzzer loads and unloads adapters
    front = build_frontend(str(llama_dir), adapters_dir=llama_adapters, max_loaded=2, max_batch_size=16)
    app = create_app(front)
    with running(app) as url:
        yield url, app


def fuzz_operation(operation, mode, session, url: str, checks) -> tuple[int, list[str]]:
    """Run ``EXAMPLES[mode]`` generated requests against one operation; (requests sent, failures)."""
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.core.failures import FailureGroup

    sent, failures = 0, []

    @settings(max_examples=EXAMPLES[mode.value], deadline=None, database=None, derandomize=SEED is None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate], print_blob=False)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        nonlocal sent
        if mode.value == "positive" and isinstance(case.body, dict) and "model" in case.body:
            # a random name is a 404 before the engine; most requests name a real model so they reach it
            case.body["model"] = MODELS[sent % len(MODELS)]
        response = case.call(base_url=url, session=session, timeout=60)
        sent += 1
        try:
            case.validate_response(response, checks=checks)
        except (AssertionError, FailureGroup) as e:  # checks failed: one line each, with the request
            found = e.exceptions if isinstance(e, FailureGroup) else [e]
            for f in found:
                failures.append(f"{operation.label} [{mode.value}] -> {response.status_code} "
                                f"{response.headers.get('content-type')}: {' '.join(str(f).split())[:160]} "
                                f"body={repr(case.body)[:160]}")

    if SEED is not None:
        run = seed(int(SEED))(run)
    try:
        run()
    except Unsatisfiable:  # negative mode on an operation with nothing to get wrong (GET /health)
        assert mode.value == "negative" and sent == 0
    return sent, failures


def test_schema_fuzz_finds_no_5xx_and_no_undeclared_response(server):
    url, app = server
    import requests
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    # the schema the server serves at /openapi.json, taken from the app (a loaded machine can take longer than
    # schemathesis' 10 s read timeout to build it on the first request)
    schema = schemathesis.openapi.from_dict(app.openapi())
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/load_lora_adapter"} <= \
        {op.label for op in operations}
    sent, failures = 0, []
    with requests.Session() as session:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                n, bad = fuzz_operation(op, mode, session, url, checks)
                sent, failures = sent + n, failures + bad
        print(f"schema fuzz: {len(operations)} operations, {sent} requests, {len(failures)} failures")
        assert session.get(url + "/health", timeout=30).status_code == 200  # still up
    assert sent >= len(operations) * min(EXAMPLES.values())
    assert not failures, "\n".join(failures[:20])
