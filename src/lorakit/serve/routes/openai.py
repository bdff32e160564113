"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` (with vLLM's extra sampling fields), streamed as
server-sent events or whole. One choice per prompt and sample: choice ``i * n + j`` is sample ``j`` of prompt
``i``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from .. import protocol as P
from ..errors import InvalidRequest, ServeError
from ..frontend import Done, Frontend, Generation, Prompt, TextDelta, merged, results_of, sample_seeds
from ..http import error_body
from ..jobs import Sampled
from ..sampling import SamplingParams
from . import Front, declare

router = APIRouter()
GENERATION = declare(400, 404, 413, 422, 500, 503, stream=True)


# ----- request -> jobs -------------------------------------------------------------------------------------
def refuse(req: P._Request) -> None:
    name = req.refused()
    if name is not None:
        raise InvalidRequest(f"{name}={getattr(req, name)!r} is not supported by this server", name)


def sampling_of(req: P._Sampling, seed: int | None, logprobs: int | None, prompt_logprobs: int | None,
                grammar=None) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0), min_p=req.min_p, seed=seed,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, stop_token_ids=list(req.stop_token_ids or []),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, processors=[lambda: grammar] if grammar else [])


async def start(front: Frontend, req: P._Sampling, adapter: str | None, prompts: list[Prompt],
                max_tokens: int | None, default: int, logprobs: int | None,
                prompt_logprobs: int | None = None) -> list[Generation]:
    """``n`` generations per prompt, in choice order; every budget and the ``response_format`` are checked
    before the first is submitted."""
    budgets = [front.budget(p.ids, max_tokens, default) for p in prompts]
    fmt = req.response_format.as_dict() if req.response_format is not None else None
    grammars = iter(await front.grammar_rows(fmt, len(prompts) * req.n))
    gens: list[Generation] = []
    try:
        for prompt, budget in zip(prompts, budgets, strict=True):
            for seed in sample_seeds(req.seed, req.n):
                sampling = sampling_of(req, seed, logprobs, prompt_logprobs, next(grammars))
                gens.append(front.generate(adapter, prompt.ids, budget, sampling, req.stop or [],
                                           req.skip_special_tokens))
    except BaseException:
        for gen in gens:
            gen.cancel()
        raise
    return gens


def usage_of(dones: list[Done], prompts: list[Prompt]) -> P.Usage:
    prompt = sum(len(p.ids) for p in prompts)
    completion = sum(d.completion_tokens for d in dones)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# ----- streaming -------------------------------------------------------------------------------------------
def _data(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def sse(gens: list[Generation], chunks, tail) -> StreamingResponse:
    """Server-sent events: ``chunks(i, event)`` (models) per event of choice ``i``, ``tail(dones)`` at the end,
    then ``[DONE]``. The first event is awaited here, so an adapter that cannot load is an error status."""
    events = merged(gens)
    first = await anext(events)  # merged() cancels every generation if this raises
    dones: dict[int, Done] = {}

    async def stream():
        try:
            item = first
            while item is not None:
                i, event = item
                if isinstance(event, Done):
                    dones[i] = event
                for chunk in chunks(i, event):
                    yield _data(chunk)
                item = await anext(events, None)
            for chunk in tail([dones[i] for i in sorted(dones)]):
                yield f"data: {chunk.model_dump_json()}\n\n"
        except ServeError as e:  # after the first token: the status is sent already
            yield f"data: {error_body(e).model_dump_json()}\n\n"
        finally:
            await events.aclose()  # client gone mid-stream: every row is dropped at the engine's next step
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


def _include_usage(req: P._Sampling) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


# ----- completions -----------------------------------------------------------------------------------------
def completion_logprobs(front: Frontend, scores: list[Sampled], offset: int = 0) -> P.CompletionLogprobs:
    """OpenAI's legacy logprobs of ``scores``; ``text_offset`` counts from ``offset`` in the choice's text."""
    tokens = [front.token_str(s.token) for s in scores]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top = [None if s.top is None else {front.token_str(t): lp for t, lp in [*s.top, (s.token, s.logprob)]}
           for s in scores]
    return P.CompletionLogprobs(tokens=tokens, token_logprobs=[s.logprob for s in scores], top_logprobs=top,
                                text_offset=offsets)


def completion_choice(front: Frontend, req: P.CompletionRequest, index: int, prompt: Prompt,
                      done: Done) -> P.CompletionChoice:
    text = prompt.text + done.text if req.echo else done.text
    logprobs = None
    if req.logprobs is not None:
        scores = [*(done.prompt_scores or []), *done.scores] if req.echo else done.scores
        logprobs = completion_logprobs(front, scores)
    return P.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=done.finish_reason)


@router.post("/v1/completions", responses=GENERATION)
async def completions(req: P.CompletionRequest, front: Front) -> P.Completion:
    refuse(req)
    adapter = front.resolve(req.model, "sft")
    prompts = front.prompts(req.prompt)
    if len(prompts) > P.MAX_PROMPTS:
        raise InvalidRequest(f"prompt holds {len(prompts)} prompts; at most {P.MAX_PROMPTS} per request", "prompt")
    k = req.logprobs
    gens = await start(front, req, adapter, prompts, req.max_tokens, 16, k, k if req.echo and k is not None else None)
    rid, created = P.new_id("cmpl"), P.now()
    if req.stream:
        return await sse(gens, _completion_chunks(front, req, prompts, gens, rid, created),
                         lambda dones: [P.Completion(id=rid, created=created, model=req.model, choices=[],
                                                     usage=usage_of(dones, prompts))] if _include_usage(req) else [])
    dones = await results_of(gens)
    choices = [completion_choice(front, req, i, prompts[i // req.n], d) for i, d in enumerate(dones)]
    return P.Completion(id=rid, created=created, model=req.model, choices=choices, usage=usage_of(dones, prompts))


def _completion_chunks(front: Frontend, req: P.CompletionRequest, prompts: list[Prompt], gens: list[Generation],
                       rid: str, created: int):
    sent: dict[int, int] = {}  # characters of choice i sent so far (its text_offset)

    def chunks(i: int, event: TextDelta | Done) -> list[P.Completion]:
        text, scores = (event.text, event.scores) if isinstance(event, TextDelta) else ("", event.last)
        if req.echo and i not in sent:  # the first chunk of a choice starts with its prompt
            text = prompts[i // req.n].text + text
            scores = [*(gens[i].prompt_scores or []), *scores]
        logprobs = completion_logprobs(front, scores, sent.get(i, 0)) if req.logprobs is not None else None
        sent[i] = sent.get(i, 0) + len(text)
        finish = event.finish_reason if isinstance(event, Done) else None
        choice = P.CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=finish)
        return [P.Completion(id=rid, created=created, model=req.model, choices=[choice])]

    return chunks


# ----- chat completions ------------------------------------------------------------------------------------
def messages_of(messages: list[P.ChatMessage]) -> list[dict]:
    """The conversation for the chat template: text parts joined, every refusal named by its place."""
    out = []
    for i, m in enumerate(messages):
        name = m.refused()
        if name is not None:
            raise InvalidRequest(f"messages[{i}].{name} is not supported by this server", f"messages[{i}].{name}")
        content = m.content
        if content is None and m.role != "assistant":  # OpenAI: only an assistant message may omit it
            raise InvalidRequest(f"messages[{i}].content is required for a {m.role!r} message",
                                 f"messages[{i}].content")
        if isinstance(content, list):
            content = "\n".join(_text_part(part, f"messages[{i}].content[{j}]") for j, part in enumerate(content))
        message = {"role": m.role, "content": content or ""}
        message.update({k: v for k, v in (("name", m.name), ("tool_call_id", m.tool_call_id)) if v is not None})
        out.append(message)
    return out


def _text_part(part: dict, where: str) -> str:
    kind = part.get("type")
    if kind != "text":
        raise InvalidRequest(f"{where}: content part type {kind!r} is not supported; only 'text' parts are", where)
    if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
        raise InvalidRequest(f"{where}: a text part is {{'type': 'text', 'text': str}}", where)
    return part["text"]


def chat_logprobs(front: Frontend, scores: list[Sampled]) -> P.ChatLogprobs:
    def entry(token: int, logprob: float) -> dict:
        text = front.token_str(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return P.ChatLogprobs(content=[P.TokenLogprob(**entry(s.token, s.logprob),
                                                  top_logprobs=[P.TopLogprob(**entry(t, lp)) for t, lp in s.top or []])
                                   for s in scores])


def _chat_checks(req: P.ChatRequest) -> int | None:
    """The request's token budget after the chat-only refusals."""
    refuse(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if req.max_completion_tokens is not None and req.max_tokens not in (None, req.max_completion_tokens):
        raise InvalidRequest("max_tokens and max_completion_tokens differ; send max_completion_tokens only",
                             "max_tokens")
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


@router.post("/v1/chat/completions", responses=GENERATION)
async def chat(req: P.ChatRequest, front: Front) -> P.ChatCompletion:
    max_tokens = _chat_checks(req)
    adapter = front.resolve(req.model, "sft")
    ids = front.chat_prompt(messages_of(req.messages), req.add_generation_prompt)
    prompts = [Prompt(ids, "")]
    k = (req.top_logprobs or 0) if req.logprobs else None
    gens = await start(front, req, adapter, prompts, max_tokens, 256, k)
    rid, created = P.new_id("chatcmpl"), P.now()

    def chunk(choices: list[P.ChatChunkChoice], usage=None) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choices, usage=usage)

    if req.stream:
        def chunks(i: int, event: TextDelta | Done) -> list[P.ChatCompletionChunk]:
            scores = event.scores if isinstance(event, TextDelta) else event.last
            logprobs = chat_logprobs(front, scores) if k is not None and scores else None
            if isinstance(event, TextDelta):
                delta = P.ChatDelta(role="assistant", content=event.text)
                return [chunk([P.ChatChunkChoice(index=i, delta=delta, logprobs=logprobs)])]
            return [chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(), logprobs=logprobs,
                                             finish_reason=event.finish_reason)])]

        return await sse(gens, chunks, lambda dones: [chunk([], usage_of(dones, prompts))]
                         if _include_usage(req) else [])
    dones = await results_of(gens)
    choices = [P.ChatChoice(index=i, message=P.AssistantMessage(content=d.text), finish_reason=d.finish_reason,
                            logprobs=chat_logprobs(front, d.scores) if k is not None else None)
               for i, d in enumerate(dones)]
    return P.ChatCompletion(id=rid, created=created, model=req.model, usage=usage_of(dones, prompts), choices=choices)
