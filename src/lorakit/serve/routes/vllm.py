"""vLLM's routes beside the OpenAI ones: ``/v1/classify`` and dynamic adapters (load / unload)."""

from __future__ import annotations

from fastapi import APIRouter

from .. import protocol as P
from . import Front

router = APIRouter()


@router.post("/v1/classify")
async def classify(req: P.ClassifyRequest, front: Front) -> P.ClassifyResponse:
    adapter = front.resolve(req.model, "classification")
    probs, n = await front.classify(adapter, req.input)
    labels = front.labels_of(adapter, len(probs[0]))
    data = [P.ClassifyItem(index=i, label=labels[max(range(len(p)), key=p.__getitem__)], probs=p,
                           num_classes=len(p)) for i, p in enumerate(probs)]
    return P.ClassifyResponse(id=P.new_id("classify"), created=P.now(), model=req.model, data=data,
                              usage=P.Usage(prompt_tokens=n, total_tokens=n))


@router.post("/v1/load_lora_adapter")
async def load_lora(req: P.LoadAdapterRequest, front: Front):
    await front.load_adapter(req.lora_name, req.lora_path)
    return {"status": "ok", "lora_name": req.lora_name}


@router.post("/v1/unload_lora_adapter")
async def unload_lora(req: P.UnloadAdapterRequest, front: Front):
    await front.unload_adapter(req.lora_name)
    return {"status": "ok", "lora_name": req.lora_name}
