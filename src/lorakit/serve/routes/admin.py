"""Routes about the server itself: health, the models it serves, Prometheus metrics, the playground page."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import protocol as P
from . import Front, declare

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/models", responses=declare())
async def models(front: Front) -> P.ModelList:
    store, created = front.store, P.now()
    classify = front.task == "classification"
    cards = [P.ModelCard(id=store.base_name, created=created, root=store.base_name, loaded=True,
                         **(_head(front, None) if classify else {}))]
    for name, info in list(store.known.items()):
        cards.append(P.ModelCard(id=name, created=created, root=str(info.path.name), parent=store.base_name,
                                 loaded=name in store.loaded, rank=info.rank, target_modules=info.target_modules,
                                 size_bytes=info.size_bytes, error=info.error,
                                 **(_head(front, name) if classify and not info.error else {})))
    return P.ModelList(data=cards)


def _head(front, name: str | None) -> dict:
    """What a model card says of the head that ``name``'s requests run (classification)."""
    classes = front.store.num_classes(name)
    return {"labels": None if classes == 1 else front.labels_of(name, classes), "num_classes": classes,
            "untrained_head": False if front.store.own_head(name) else not front.base_head_trained}


@router.get("/metrics", response_class=Response, responses={
    **declare(), 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                       "description": "Prometheus' text format (version 0.0.4)"}})
async def prometheus(front: Front) -> Response:
    front.metrics.loaded.set(len(front.store.loaded))
    front.metrics.running.set(front.engine.running())
    return Response(generate_latest(front.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@cache
def _page() -> str:
    return resources.files("lorakit.serve").joinpath("static/playground.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def playground(front: Front):
    return _page().replace("__LORAKIT_TASK__", json.dumps(front.task))
