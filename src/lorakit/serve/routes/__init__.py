"""The HTTP routes, grouped by API family, each thin over the :class:`~lorakit.serve.frontend.Frontend`:
``openai`` (completions, chat completions), ``vllm`` (classify, dynamic adapters), ``admin`` (health, models,
metrics, the playground page). Errors are raised as :mod:`lorakit.serve.errors` and mapped in the app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..frontend import Frontend


def _front(request: Request) -> Frontend:
    return request.app.state.front


Front = Annotated[Frontend, Depends(_front)]
