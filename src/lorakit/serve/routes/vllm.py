"""vLLM's routes beside the OpenAI ones: ``/v1/classify``, dynamic adapters (load / unload), and the tokenizer
(``/tokenize``, ``/detokenize``, ``/tokenizer_info``: lm-evaluation-harness's remote tokenizer)."""

from __future__ import annotations

from fastapi import APIRouter

from .. import protocol as P
from ..errors import InvalidRequest
from . import Front, declare
from .openai import messages_of

router = APIRouter()


@router.post("/v1/classify", responses=declare(400, 404, 413, 422, 500, 503))
async def classify(req: P.ClassifyRequest, front: Front) -> P.ClassifyResponse:
    adapter = front.resolve(req.model, "classification")
    scores, n = await front.classify(adapter, req.input)
    classes = front.store.num_classes(adapter)
    if classes == 1:  # a regression head: its value
        data = [P.ClassifyItem(index=i, value=s[0], num_classes=1) for i, s in enumerate(scores)]
    else:
        labels = front.labels_of(adapter, classes)
        data = [P.ClassifyItem(index=i, label=labels[max(range(len(p)), key=p.__getitem__)], probs=p,
                               num_classes=classes) for i, p in enumerate(scores)]
    return P.ClassifyResponse(id=P.new_id("classify"), created=P.now(), model=req.model, data=data,
                              usage=P.Usage(prompt_tokens=n, total_tokens=n))


@router.post("/v1/load_lora_adapter", responses=declare(400, 413, 422, 503))
async def load_lora(req: P.LoadAdapterRequest, front: Front) -> P.AdapterStatus:
    await front.load_adapter(req.lora_name, req.lora_path)
    return P.AdapterStatus(lora_name=req.lora_name)


@router.post("/v1/unload_lora_adapter", responses=declare(400, 404, 409, 413, 422, 503))
async def unload_lora(req: P.UnloadAdapterRequest, front: Front) -> P.AdapterStatus:
    await front.unload_adapter(req.lora_name)
    return P.AdapterStatus(lora_name=req.lora_name)


@router.post("/tokenize", responses=declare(400, 404, 413, 422))
async def tokenize(req: P.TokenizeRequest, front: Front) -> P.TokenizeResponse:
    if req.model is not None:
        front.store.info(req.model)  # AdapterNotFound naming what exists
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("send either prompt or messages", "prompt")
    if req.prompt is not None:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = front.encode(req.prompt, add_special_tokens=special)
    else:
        ids = front.chat_prompt(messages_of(req.messages), req.add_generation_prompt)
    strs = [front.tokenizer.convert_ids_to_tokens(i) for i in ids] if req.return_token_strs else None
    return P.TokenizeResponse(count=len(ids), max_model_len=front.context, tokens=ids, token_strs=strs)


@router.post("/detokenize", responses=declare(400, 404, 413, 422))
async def detokenize(req: P.DetokenizeRequest, front: Front) -> P.DetokenizeResponse:
    if req.model is not None:
        front.store.info(req.model)
    return P.DetokenizeResponse(prompt=front.decode(front.check_ids(req.tokens, "tokens")))


@router.get("/tokenizer_info", responses=declare())
async def tokenizer_info(front: Front) -> P.TokenizerInfo:
    tok = front.tokenizer
    return P.TokenizerInfo(tokenizer_class=type(tok).__name__, eos_token=tok.eos_token, bos_token=tok.bos_token,
                           pad_token=tok.pad_token, unk_token=tok.unk_token,
                           chat_template=_str_or_none(getattr(tok, "chat_template", None)), model_max_length=front.context,
                           vocab_size=front.vocab)


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) else None
