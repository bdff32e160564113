"""The front object between the HTTP routes and the engine thread: text in, text out.

:class:`Frontend` owns the tokenizer (prompts are tokenized here, generated tokens detokenized here, stop
strings found here), the token budgets against the model's context, the check of the ``model`` name, and the
hand-off of every job to the engine thread and back (each job's results arrive as typed events on an
:class:`~lorakit.serve.jobs.AsyncResults`). It knows nothing of HTTP: it raises the typed errors of
:mod:`lorakit.serve.errors`, and the app maps them to status codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import Engine
from .errors import InvalidRequest
from .jobs import AsyncResults, ClsJob, CommandJob, Failed, Finished, GenJob, Sampled, SamplingParams


@dataclass
class TextDelta:
    """New text of a generation, ready to send."""
    text: str


@dataclass
class Done:
    """The end of a generation: its whole text, why it ended (``"stop"`` / ``"length"``) and its token counts."""
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TextStream:
    """Detokenizes one generation incrementally and finds its stop strings.

    Text that may be the start of a stop string, or an incomplete UTF-8 character, is held back until the
    next token settles it.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) - 1 for s in stop), default=0)
        self.tokens: list[int] = []
        self.text, self.sent = "", 0

    def add(self, token: int) -> tuple[str, bool]:
        """The text now ready to send, and whether a stop string ended the generation."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.rest(), True
        ready = len(self.text) - self.hold if not self.text.endswith("\ufffd") else self.text.rfind("\ufffd")
        if ready <= self.sent:
            return "", False
        delta, self.sent = self.text[self.sent:ready], ready
        return delta, False

    def rest(self) -> str:
        """Everything not sent yet (the generation has ended)."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


class Generation:
    """One running generation: iterate :meth:`events` (``TextDelta``... then ``Done``) or await :meth:`result`.
    :meth:`cancel` (any time, idempotent) frees its batch row at the engine's next step."""

    def __init__(self, job: GenJob, results: AsyncResults, text: TextStream):
        self.job, self.results, self.text = job, results, text

    def cancel(self) -> None:
        self.job.cancel()

    def _done(self, reason: str) -> Done:
        return Done(self.text.text, reason, len(self.job.prompt_ids), len(self.text.tokens))

    async def events(self):
        async for event in self.results:
            match event:
                case Sampled(token=token):
                    delta, stopped = self.text.add(token)
                    if delta:
                        yield TextDelta(delta)
                    if stopped:
                        self.cancel()  # the engine may have sampled a token more; it is dropped
                        yield self._done("stop")
                        return
                case Finished(reason=reason):
                    delta = self.text.rest()
                    if delta:
                        yield TextDelta(delta)
                    yield self._done(reason)
                    return
                case Failed(error=error):
                    raise error

    async def result(self) -> Done:
        try:
            async for event in self.events():
                if isinstance(event, Done):
                    return event
        finally:
            self.cancel()  # a no-op when finished; frees the row if the request was cancelled
        raise AssertionError("unreachable: events() ends with Done or raises")


class Frontend:
    """Text and names in, typed results out, over one :class:`Engine` (see the module docstring)."""

    def __init__(self, engine: Engine, tokenizer, metrics):
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.store, self.task = engine.store, engine.task
        self.context = context_length(engine.model)

    # ----- requests --------------------------------------------------------------------------------------
    def resolve(self, model: str, task: str) -> str | None:
        """The adapter named by a request's ``model`` (None: the base model), for a ``task`` route."""
        if task != self.task:
            other = "/v1/classify" if self.task == "classification" else "/v1/completions"
            raise InvalidRequest(f"this server's base model is for {self.task}; use {other}", "model")
        self.store.info(model)  # AdapterNotFound naming what exists
        self.metrics.adapter_requests.labels(model).inc()
        return None if model == self.store.base_name else model

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("the base model's tokenizer has no chat template; use /v1/completions", "messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def budget(self, prompt_ids: list[int], max_tokens: int | None, default: int) -> int:
        """The tokens a generation may add: ``max_tokens`` if the prompt and it fit the context, else refused."""
        n, ctx = len(prompt_ids), self.context
        if n >= ctx:
            raise InvalidRequest(f"the prompt is {n} tokens; the model's context is {ctx}", "prompt")
        if max_tokens is None:
            return min(default, ctx - n)
        if n + max_tokens > ctx:
            raise InvalidRequest(f"max_tokens={max_tokens} with a {n}-token prompt passes the model's context of "
                                 f"{ctx} tokens", "max_tokens")
        return max_tokens

    # ----- hand-off to the engine ------------------------------------------------------------------------
    def generate(self, adapter: str | None, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                 stop: list[str]) -> Generation:
        results = AsyncResults()
        job = GenJob(adapter, prompt_ids, max_tokens, results, sampling)
        results.on_lost = job.cancel
        self.engine.submit(job)  # Overloaded when shutting down
        self.metrics.tokens("prompt", len(prompt_ids))
        return Generation(job, results, TextStream(self.tokenizer, stop))

    async def classify(self, adapter: str | None, texts: list[str]) -> tuple[list[list[float]], int]:
        """Class probabilities of each text, and the prompt tokens they took."""
        inputs = [self.encode(t) for t in texts]
        for i, ids in enumerate(inputs):
            if len(ids) > self.context:
                raise InvalidRequest(f"input[{i}] is {len(ids)} tokens; the model's context is {self.context}",
                                     "input")
        results = AsyncResults()
        self.engine.submit(ClsJob(adapter, inputs, results))
        n = sum(map(len, inputs))
        self.metrics.tokens("prompt", n)
        return (await results.final()).probs, n

    async def run(self, fn):
        """``fn()`` on the engine thread between steps; its value, or its error raised here."""
        results = AsyncResults()
        self.engine.submit(CommandJob(fn, results))
        return (await results.final()).value

    async def load_adapter(self, name: str, path: str) -> None:
        await self.run(lambda: self.store.add(name, path))
        self.metrics.loaded.set(len(self.store.loaded))

    async def unload_adapter(self, name: str) -> None:
        await self.run(lambda: self.store.remove(name, self.engine.busy_adapters()))
        self.metrics.loaded.set(len(self.store.loaded))

    # ----- what the server holds -------------------------------------------------------------------------
    def labels_of(self, adapter: str | None, n: int) -> list[str]:
        """The adapter's saved class names, else the base config's ``id2label``."""
        info = self.store.known.get(adapter) if adapter else None
        if info is not None and info.labels and (n == 0 or len(info.labels) == n):
            return info.labels
        id2label = self.engine.model.config.id2label or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(n or len(id2label))]


def context_length(model) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return 2048
