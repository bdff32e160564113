"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions``, streamed as server-sent events or whole."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from .. import protocol as P
from ..errors import ServeError
from ..frontend import Done, Generation
from ..http import error_body
from ..jobs import SamplingParams
from . import Front

router = APIRouter()


def sampling_of(req: P._Sampling) -> SamplingParams:
    return SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed)


def usage_of(done: Done) -> P.Usage:
    return P.Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                   total_tokens=done.prompt_tokens + done.completion_tokens)


def _data(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def sse(gen: Generation, chunk, final, usage_chunk) -> StreamingResponse:
    """Server-sent events: ``chunk(text)`` per piece of text, ``final(done)``, ``usage_chunk(done)`` if asked,
    then ``[DONE]``. The first event is awaited here, so an adapter that cannot load is an error status."""
    events = gen.events()
    try:
        first = await anext(events)
    except BaseException:
        gen.cancel()
        raise

    async def stream():
        try:
            event = first
            while True:
                if isinstance(event, Done):
                    yield _data(final(event))
                    if usage_chunk is not None:
                        yield f"data: {usage_chunk(event).model_dump_json()}\n\n"
                    break
                yield _data(chunk(event.text))
                event = await anext(events)
        except ServeError as e:  # after the first token: the status is sent already
            yield f"data: {error_body(e).model_dump_json()}\n\n"
        finally:
            gen.cancel()  # client gone mid-stream: the engine drops the row at its next step
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


def _include_usage(req: P._Sampling) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


@router.post("/v1/completions")
async def completions(req: P.CompletionRequest, front: Front):
    adapter = front.resolve(req.model, "sft")
    prompt_ids = front.encode(req.prompt)
    gen = front.generate(adapter, prompt_ids, front.budget(prompt_ids, req.max_tokens, 16), sampling_of(req),
                         req.stop or [])
    rid, created = P.new_id("cmpl"), P.now()

    def make(text: str, finish=None, usage=None) -> P.Completion:
        return P.Completion(id=rid, created=created, model=req.model, usage=usage,
                            choices=[P.CompletionChoice(text=text, finish_reason=finish)])

    if req.stream:
        return await sse(gen, make, lambda done: make("", done.finish_reason),
                         (lambda done: P.Completion(id=rid, created=created, model=req.model, choices=[],
                                                    usage=usage_of(done))) if _include_usage(req) else None)
    done = await gen.result()
    return make(done.text, done.finish_reason, usage_of(done))


@router.post("/v1/chat/completions")
async def chat(req: P.ChatRequest, front: Front):
    adapter = front.resolve(req.model, "sft")
    prompt_ids = front.chat_prompt([m.model_dump() for m in req.messages])
    gen = front.generate(adapter, prompt_ids, front.budget(prompt_ids, req.max_tokens, 256), sampling_of(req),
                         req.stop or [])
    rid, created = P.new_id("chatcmpl"), P.now()

    def make(delta: P.ChatDelta, finish=None) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(id=rid, created=created, model=req.model,
                                     choices=[P.ChatChunkChoice(delta=delta, finish_reason=finish)])

    if req.stream:
        return await sse(gen, lambda text: make(P.ChatDelta(role="assistant", content=text)),
                         lambda done: make(P.ChatDelta(), done.finish_reason),
                         (lambda done: P.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[],
                                                             usage=usage_of(done))) if _include_usage(req) else None)
    done = await gen.result()
    message = P.ChatMessage(role="assistant", content=done.text)
    return P.ChatCompletion(id=rid, created=created, model=req.model, usage=usage_of(done),
                            choices=[P.ChatChoice(message=message, finish_reason=done.finish_reason)])


