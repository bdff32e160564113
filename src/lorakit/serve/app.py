"""The HTTP app of ``lorakit serve`` (FastAPI): OpenAI-compatible completions and chat, vLLM's classify and
dynamic adapters, models, health, Prometheus metrics, and the playground page at ``/``.

:func:`create_app` builds the app over a :class:`~lorakit.serve.engine.Engine`; :func:`build_engine`
loads a base model (``lorakit.models``) and its adapters into one. Tests call both with tiny models.
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import protocol as P
from .adapters import AdapterLoadError, AdapterStore, PathRefused, UnknownAdapter, discover
from .engine import ClsJob, Engine, Event, GenJob
from .guard import Guard
from .metrics import ServeMetrics
from .structured import Grammars, ResponseFormatError

MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    body = P.ErrorResponse(error=P.ErrorBody(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


# ----- loading ---------------------------------------------------------------------------------------------
def base_name_of(model: str) -> str:
    path = Path(model)
    if not path.exists():
        return model  # a hub id
    return path.parent.name if path.name == "model" else path.name


def build_engine(model: str, adapters: dict[str, Path] | None = None, adapters_dir: Path | None = None,
                 max_batch_size: int = 32, max_loaded: int = 8, metrics: ServeMetrics | None = None,
                 quantize: str | None = "auto") -> Engine:
    """Load ``model`` (``lorakit.models``) for the adapters' task and wrap it in an (unstarted) engine.

    ``quantize``: the base's 4/8-bit form (``lorakit.models.base_quantization_for``); ``"auto"``: the one the
    first readable adapter was trained on (QLoRA adapters record it), else full precision.
    """
    from ..core.checkpoint import read_adapter
    from ..core.config import LORAKIT_KEY
    from ..models import (
        base_quantization_for,
        load_model,
        load_tokenizer,
        num_labels_in,
        quantize_base,
        task_for_adapter,
    )

    base_name = base_name_of(model)
    known = discover(base_name, adapters, adapters_dir)  # lists and checks every adapter before loading
    task, num_labels, labels, recorded = None, None, None, {}
    for info in known.values():  # the first readable adapter says the task, the classes and the base's form
        if info.error:
            continue
        try:
            config, raw, tensors = read_adapter(info.path)
        except (OSError, ValueError) as e:
            info.error = str(e)  # its requests will fail with this; the others are served
            continue
        task, num_labels = task_for_adapter(config.task_type), num_labels_in(tensors)
        labels = info.labels if info.labels and len(info.labels) == num_labels else None
        recorded = {str(info.path): raw[LORAKIT_KEY].get("quantization")}
        break
    quantization = base_quantization_for(recorded, quantize)  # checked before the model loads
    task = task or _task_of_model(model)
    net = load_model(model, task, num_labels=num_labels, label_names=labels).eval()
    quantize_base(net, quantization)  # before any adapter: each then wraps its 4/8-bit layer
    tokenizer = load_tokenizer(model)
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    store = AdapterStore(net, base_name, known, adapters_dir, max_loaded)
    return Engine(store, tokenizer, task, max_batch_size=max_batch_size, metrics=metrics)


def _task_of_model(model: str) -> str:
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(model).architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "sft" if causal else "classification"  # an encoder (BertModel, ...) gets a classification head


def context_length(engine: Engine) -> int:
    cfg = engine.model.config
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return 2048


# ----- the app ---------------------------------------------------------------------------------------------
def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               metrics: ServeMetrics | None = None) -> FastAPI:
    """The app over ``engine``; the engine is started and drained with the app's lifespan."""
    from contextlib import asynccontextmanager

    if metrics is None:
        metrics = engine.metrics if isinstance(engine.metrics, ServeMetrics) else ServeMetrics()
    engine.metrics = metrics
    store, tokenizer = engine.store, engine.tokenizer
    ctx = context_length(engine)
    grammars = Grammars(tokenizer, engine.model.config.vocab_size, engine.eos_ids)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {err.get('msg')}", None)
        field = ".".join(loc) or "body"
        return error_response(422, f"{field}: {err.get('msg')}", field)

    def check_model(name: str, task: str) -> str | None:
        if task != engine.task:
            other = "/v1/classify" if engine.task == "classification" else "/v1/completions"
            raise ApiError(400, f"this server's base model is for {engine.task}; use {other}", "model")
        try:
            store.info(name)
        except UnknownAdapter as e:
            raise ApiError(404, e.args[0], "model", "not_found_error") from None
        metrics.adapter_requests.labels(name).inc()
        return None if name == store.base_name else name

    def budget(prompt_ids: list[int], max_tokens: int | None, default: int) -> int:
        if len(prompt_ids) >= ctx:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; the model's context is {ctx}", "prompt")
        if max_tokens is None:
            return min(default, ctx - len(prompt_ids))
        if len(prompt_ids) + max_tokens > ctx:
            raise ApiError(400, f"max_tokens={max_tokens} with a {len(prompt_ids)}-token prompt passes the "
                                f"model's context of {ctx} tokens", "max_tokens")
        return max_tokens

    async def run_generation(req: P._Sampling, adapter: str | None, prompt_ids: list[int], default_max: int):
        job = GenJob(adapter, prompt_ids, budget(prompt_ids, req.max_tokens, default_max), emit=None,
                     temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop or [])
        if req.response_format is not None:
            try:  # compiling a new schema can take a while: off the event loop
                job.grammar = await asyncio.to_thread(grammars.row, req.response_format.as_dict())
            except ResponseFormatError as e:
                raise ApiError(400, str(e), e.param) from None
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone
                job.cancel()

        job.emit = emit
        metrics.tokens("prompt", len(prompt_ids))
        try:
            engine.submit(job)
        except RuntimeError as e:
            raise ApiError(503, str(e), None, "unavailable") from None
        return job, events

    async def collect(job: GenJob, events: asyncio.Queue) -> Event:
        try:
            while True:
                event = await events.get()
                if event.kind == "error":
                    raise ApiError(event.status, event.message, "model" if event.status == 404 else None,
                                   "not_found_error" if event.status == 404 else "server_error")
                if event.kind == "done":
                    return event
        finally:
            job.cancel()  # a no-op when finished; frees the row if the request was cancelled

    def sse(job: GenJob, events: asyncio.Queue, chunk, final, usage_chunk):
        async def stream():
            try:
                while True:
                    event = await events.get()
                    if event.kind == "error":
                        body = P.ErrorResponse(error=P.ErrorBody(message=event.message, type="server_error",
                                                                 code=event.status))
                        yield f"data: {body.model_dump_json()}\n\n"
                        break
                    if event.kind == "text":
                        yield f"data: {chunk(event.text).model_dump_json(exclude_none=True)}\n\n"
                    else:
                        yield f"data: {final(event).model_dump_json(exclude_none=True)}\n\n"
                        if usage_chunk is not None:
                            yield f"data: {usage_chunk(event).model_dump_json()}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # client gone mid-stream: the engine drops the row at its next step

        return StreamingResponse(stream(), media_type="text/event-stream")

    def usage(e: Event) -> P.Usage:
        return P.Usage(prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens,
                       total_tokens=e.prompt_tokens + e.completion_tokens)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest):
        adapter = check_model(req.model, "sft")
        prompt_ids = tokenizer(req.prompt)["input_ids"]
        job, events = await run_generation(req, adapter, prompt_ids, 16)
        rid, created = P.new_id("cmpl"), P.now()

        def make(text, finish=None, use=None):
            return P.Completion(id=rid, created=created, model=req.model, usage=use,
                                choices=[P.CompletionChoice(text=text, finish_reason=finish)])

        if req.stream:
            include = req.stream_options is not None and req.stream_options.include_usage
            return sse(job, events, lambda t: make(t), lambda e: make("", e.finish_reason),
                       (lambda e: P.Completion(id=rid, created=created, model=req.model, choices=[],
                                               usage=usage(e))) if include else None)
        done = await collect(job, events)
        return make(done.text, done.finish_reason, usage(done))

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatRequest):
        adapter = check_model(req.model, "sft")
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "the base model's tokenizer has no chat template; use /v1/completions", "messages")
        text = tokenizer.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                             tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        job, events = await run_generation(req, adapter, prompt_ids, 256)
        rid, created = P.new_id("chatcmpl"), P.now()

        def make(delta: P.ChatDelta, finish=None):
            return P.ChatCompletionChunk(id=rid, created=created, model=req.model,
                                         choices=[P.ChatChunkChoice(delta=delta, finish_reason=finish)])

        if req.stream:
            include = req.stream_options is not None and req.stream_options.include_usage
            return sse(job, events, lambda t: make(P.ChatDelta(role="assistant", content=t)),
                       lambda e: make(P.ChatDelta(), e.finish_reason),
                       (lambda e: P.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[],
                                                        usage=usage(e))) if include else None)
        done = await collect(job, events)
        message = P.ChatMessage(role="assistant", content=done.text)
        return P.ChatCompletion(id=rid, created=created, model=req.model, usage=usage(done),
                                choices=[P.ChatChoice(message=message, finish_reason=done.finish_reason)])

    def labels_of(adapter: str | None, n: int) -> list[str]:
        """The adapter's saved class names, else the base config's ``id2label``."""
        info = store.known.get(adapter) if adapter else None
        if info is not None and info.labels and (n == 0 or len(info.labels) == n):
            return info.labels
        id2label = engine.model.config.id2label or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(n or len(id2label))]

    @app.post("/v1/classify")
    async def classify(req: P.ClassifyRequest):
        adapter = check_model(req.model, "classification")
        inputs = [tokenizer(t)["input_ids"] for t in req.input]
        for i, ids in enumerate(inputs):
            if len(ids) > ctx:
                raise ApiError(400, f"input[{i}] is {len(ids)} tokens; the model's context is {ctx}", "input")
        from concurrent.futures import Future

        job = ClsJob(adapter, inputs, Future())
        metrics.tokens("prompt", sum(map(len, inputs)))
        try:
            engine.submit(job)
        except RuntimeError as e:
            raise ApiError(503, str(e), None, "unavailable") from None
        try:
            probs = await asyncio.wrap_future(job.future)
        except UnknownAdapter as e:
            raise ApiError(404, e.args[0], "model", "not_found_error") from None
        except AdapterLoadError as e:
            raise ApiError(500, str(e), "model", "adapter_error") from None
        labels = labels_of(adapter, len(probs[0]))
        data = [P.ClassifyItem(index=i, label=labels[max(range(len(p)), key=p.__getitem__)], probs=p,
                               num_classes=len(p)) for i, p in enumerate(probs)]
        n = sum(map(len, inputs))
        return P.ClassifyResponse(id=P.new_id("classify"), created=P.now(), model=req.model, data=data,
                                  usage=P.Usage(prompt_tokens=n, total_tokens=n))

    @app.get("/v1/models")
    async def models() -> P.ModelList:
        created = P.now()
        base_labels = labels_of(None, 0) if engine.task == "classification" else None
        cards = [P.ModelCard(id=store.base_name, created=created, root=store.base_name, loaded=True,
                             labels=base_labels)]
        for name, info in list(store.known.items()):
            cards.append(P.ModelCard(id=name, created=created, root=str(info.path.name), parent=store.base_name,
                                     loaded=name in store.loaded, rank=info.rank, target_modules=info.target_modules,
                                     size_bytes=info.size_bytes, error=info.error,
                                     labels=info.labels if engine.task == "classification" else None))
        return P.ModelList(data=cards)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(req: P.LoadAdapterRequest):
        fut = engine.call(lambda: store.add(req.lora_name, req.lora_path))
        try:
            await asyncio.wrap_future(fut)
        except PathRefused as e:
            raise ApiError(400, str(e), "lora_path") from None
        except ValueError as e:
            raise ApiError(400, str(e), "lora_name") from None
        metrics.loaded.set(len(store.loaded))
        return {"status": "ok", "lora_name": req.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(req: P.UnloadAdapterRequest):
        fut = engine.call(lambda: store.remove(req.lora_name, engine.busy_adapters()))
        try:
            await asyncio.wrap_future(fut)
        except UnknownAdapter as e:
            raise ApiError(404, e.args[0], "lora_name", "not_found_error") from None
        except ValueError as e:
            raise ApiError(409, str(e), "lora_name") from None
        metrics.loaded.set(len(store.loaded))
        return {"status": "ok", "lora_name": req.lora_name}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        metrics.loaded.set(len(store.loaded))
        metrics.running.set(engine.running())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = resources.files("lorakit.serve").joinpath("static/playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return page.replace("__LORAKIT_TASK__", json.dumps(engine.task))

    return app
