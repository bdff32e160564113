"""The HTTP routes, grouped by API family, each thin over the :class:`~lorakit.serve.frontend.Frontend`:
``openai`` (completions, chat completions), ``vllm`` (classify, dynamic adapters), ``admin`` (health, models,
metrics, the playground page). Errors are raised as :mod:`lorakit.serve.errors` and mapped in the app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..frontend import Frontend
from ..protocol import ErrorResponse


async def _front(request: Request) -> Frontend:
    """The app's front object. ``async``: FastAPI runs a plain ``def`` dependency on a worker thread, one
    thread hop per request that waits for the GIL behind the engine thread."""
    return request.app.state.front


Front = Annotated[Frontend, Depends(_front)]


_WHY = {400: "bad request (malformed JSON, a field this server cannot honour, a prompt past the context, a bad "
             "adapter path)",
        401: "missing or wrong API key (with --api-key)", 404: "unknown model or adapter",
        409: "the adapter has requests running", 413: "request body over the size limit",
        422: "a missing, mistyped, out-of-range or unknown field", 500: "an adapter that cannot be loaded",
        503: "the server is shutting down"}


def declare(*codes: int, stream: bool = False) -> dict:
    """OpenAPI ``responses`` of a route: each error status it can return (every one an ErrorResponse, 401 with
    ``--api-key`` on every route), and server-sent events beside JSON for a route that streams."""
    out: dict = {code: {"model": ErrorResponse, "description": _WHY[code]} for code in sorted({401, *codes})}
    if stream:
        out[200] = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                    "description": "the response, or with stream: true server-sent events ending in `data: [DONE]`"}
    return out
