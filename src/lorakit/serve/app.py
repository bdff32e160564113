"""The HTTP app of ``lorakit serve`` (FastAPI) over a :class:`~lorakit.serve.frontend.Frontend`.

:func:`create_app` wires the routes (``routes/``: OpenAI, vLLM, admin), the guard middleware and the error
handlers (:mod:`lorakit.serve.http`, where errors become status codes).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .frontend import Frontend
from .guard import Guard
from .http import HANDLERS
from .routes import admin, openai, vllm

MAX_BODY_BYTES = 1 << 20


def create_app(front: Frontend, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app over ``front``; its engine is started and drained with the app's lifespan."""
    engine = front.engine

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=front.metrics)
    app.state.front = front
    for error, handler in HANDLERS.items():
        app.add_exception_handler(error, handler)
    for family in (openai, vllm, admin):
        app.include_router(family.router)
    return app
