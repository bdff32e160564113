"""The front object between the HTTP routes and the engine thread: text in, text out.

:class:`Frontend` owns the tokenizer (prompts are tokenized here, generated tokens detokenized here, stop
strings found here), the token budgets against the model's context, the check of the ``model`` name, and the
hand-off of every job to the engine thread and back (each job's results arrive as typed events on an
:class:`~lorakit.serve.jobs.AsyncResults`). It knows nothing of HTTP: it raises the typed errors of
:mod:`lorakit.serve.errors`, and the app maps them to status codes.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from .engine import Engine
from .errors import InvalidRequest, ServeError
from .jobs import AsyncResults, ClsJob, CommandJob, Failed, Finished, GenJob, PromptScored, Sampled
from .sampling import SamplingParams
from .structured import Grammars


@dataclass
class TextDelta:
    """New text of a generation, ready to send, and the tokens (with their logprobs, if asked) taken since
    the previous delta."""
    text: str
    scores: list[Sampled] = field(default_factory=list)


@dataclass
class Done:
    """The end of a generation: its whole text, why it ended (``"stop"`` / ``"length"``), its token counts, the
    logprobs of its tokens and of its prompt's (``Sampled`` entries; ``prompt_scores`` None unless asked)."""
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    scores: list[Sampled] = field(default_factory=list)
    prompt_scores: list[Sampled] | None = None
    last: list[Sampled] = field(default_factory=list)  # the scores not sent in a TextDelta yet


@dataclass
class Prompt:
    """One prompt of a request: its token ids and its text (the given string, or the ids decoded)."""
    ids: list[int]
    text: str


class TextStream:
    """Detokenizes one generation incrementally and finds its stop strings.

    Text that may be the start of a stop string, or an incomplete UTF-8 character, is held back until the
    next token settles it.
    """

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self.tokenizer, self.stop, self.skip = tokenizer, stop, skip_special_tokens
        self.hold = max((len(s) - 1 for s in stop), default=0)
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.deferred = False  # set when nobody reads the text before the end: decode once, in rest()

    def add(self, token: int) -> tuple[str, bool]:
        """The text now ready to send, and whether a stop string ended the generation."""
        self.tokens.append(token)
        if self.deferred and not self.stop:
            return "", False
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
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
        if self.deferred and not self.stop:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


class Generation:
    """One running generation: iterate :meth:`events` (``TextDelta``... then ``Done``) or await :meth:`result`.
    :meth:`cancel` (any time, idempotent) frees its batch row at the engine's next step."""

    def __init__(self, job: GenJob, results: AsyncResults, text: TextStream):
        self.job, self.results, self.text = job, results, text
        self.scores: list[Sampled] = []
        self.prompt_scores: list[Sampled] | None = None
        self.unsent = 0  # scores[unsent:] are not in a TextDelta yet

    def cancel(self) -> None:
        self.job.cancel()

    def _delta(self, text: str) -> TextDelta:
        delta = TextDelta(text, self.scores[self.unsent:])
        self.unsent = len(self.scores)
        return delta

    def _done(self, reason: str) -> Done:
        return Done(self.text.text, reason, len(self.job.prompt_ids), len(self.text.tokens), self.scores,
                    self.prompt_scores, self.scores[self.unsent:])

    async def events(self):
        async for event in self.results:
            match event:
                case Sampled(token=token):
                    self.scores.append(event)
                    delta, stopped = self.text.add(token)
                    if delta:
                        yield self._delta(delta)
                    if stopped:
                        self.cancel()  # the engine may have sampled a token more; it is dropped
                        yield self._done("stop")
                        return
                case PromptScored(logprobs=lps, top=top):
                    self.prompt_scores = [Sampled(t, lp, top[j] if top else None)
                                          for j, (t, lp) in enumerate(zip(self.job.prompt_ids, lps, strict=True))]
                case Finished(reason=reason):
                    delta = self.text.rest()
                    if delta:
                        yield self._delta(delta)
                    yield self._done(reason)
                    return
                case Failed(error=error):
                    raise error

    async def result(self) -> Done:
        self.text.deferred = True  # the whole answer at once: no per-token decoding on the event loop
        self.results.hold = not self.text.stop  # nor a wake-up per token, unless stop strings are watched
        try:
            async for event in self.events():
                if isinstance(event, Done):
                    return event
        finally:
            self.cancel()  # a no-op when finished; frees the row if the request was cancelled
        raise AssertionError("unreachable: events() ends with Done or raises")


async def results_of(gens: list[Generation]) -> list[Done]:
    """Every generation's :class:`Done`, in order; the first error cancels the others and is raised."""
    try:
        return list(await asyncio.gather(*(g.result() for g in gens)))
    finally:
        for g in gens:
            g.cancel()


async def merged(gens: list[Generation]):
    """``(index, event)`` of several generations as they come; the first error cancels them all and is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for event in gen.events():
                queue.put_nowait((i, event))
        except ServeError as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, event = await queue.get()
            if event is None:
                left -= 1
            elif isinstance(event, ServeError):
                raise event
            else:
                yield i, event
    finally:
        for task, gen in zip(tasks, gens, strict=True):
            task.cancel()
            gen.cancel()


def sample_seeds(seed: int | None, n: int) -> list[int | None]:
    """One seed per sample of a request: the request's own for the first (n=1 is unchanged), then distinct
    ones derived from it; None (unseeded) stays None."""
    if seed is None:
        return [None] * n
    derived = [int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") >> 1 for i in range(1, n)]
    return [seed, *derived]


class Frontend:
    """Text and names in, typed results out, over one :class:`Engine` (see the module docstring)."""

    def __init__(self, engine: Engine, tokenizer, metrics, base_head_trained: bool = True):
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.store, self.task = engine.store, engine.task
        self.context = context_length(engine.model)
        self.vocab = engine.model.get_input_embeddings().num_embeddings  # token ids run 0..vocab-1
        self._token_strs: dict[int, str] = {}
        self.base_head_trained = base_head_trained  # classification: the base checkpoint brought its head
        self.grammars = Grammars(tokenizer, engine.model.config.vocab_size, engine.eos_ids)

    # ----- requests --------------------------------------------------------------------------------------
    def resolve(self, model: str, task: str) -> str | None:
        """The adapter named by a request's ``model`` (None: the base model), for a ``task`` route."""
        if task != self.task:
            other = "/v1/classify" if self.task == "classification" else "/v1/completions"
            raise InvalidRequest(f"this server's base model is for {self.task}; use {other}", "model")
        self.store.info(model)  # AdapterNotFound naming what exists
        self.metrics.adapter_requests.labels(model).inc()
        return None if model == self.store.base_name else model

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        """``ids`` if each is a token id of this model, else :class:`InvalidRequest` naming the first that is not."""
        bad = next((i for i in ids if not 0 <= i < self.vocab), None)
        if bad is not None:
            raise InvalidRequest(f"{param}: token id {bad} is not in the model's vocabulary (0..{self.vocab - 1})",
                                 param)
        return ids

    def prompts(self, prompt: str | list) -> list[Prompt]:
        """A completion request's ``prompt`` (a string, strings, token ids, lists of token ids) as prompts, in
        order; token ids are used as given."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise InvalidRequest("prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for i, p in enumerate(prompt):
            ids = self.encode(p) if isinstance(p, str) else self.check_ids(p, f"prompt[{i}]")
            if not ids:
                raise InvalidRequest(f"prompt[{i}] is empty", "prompt")
            out.append(Prompt(ids, p if isinstance(p, str) else self.decode(ids, skip_special_tokens=False)))
        return out

    def token_str(self, token: int) -> str:
        """The text of one token alone (special tokens shown), as logprobs name it."""
        text = self._token_strs.get(token)
        if text is None:
            text = self._token_strs[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, ready for the assistant's turn."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InvalidRequest("the base model's tokenizer has no chat template; use /v1/completions", "messages")
        if "developer" not in str(template):  # OpenAI's new name for the system role, as the template knows it
            messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except Exception as e:  # noqa: BLE001 -- the template's own error (jinja's, raise_exception): the messages'
            raise InvalidRequest(f"messages: the chat template refused them: {e}", "messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def budget(self, prompt_ids: list[int], max_tokens: int | None, default: int) -> int:
        """The tokens a generation may add: ``max_tokens`` if the prompt and it fit the context, else refused
        (``max_tokens`` 0, scoring the prompt only, lets the prompt fill the context)."""
        n, ctx = len(prompt_ids), self.context
        if n > ctx or (n == ctx and max_tokens != 0):
            raise InvalidRequest(f"the prompt is {n} tokens; the model's context is {ctx}", "prompt")
        if max_tokens is None:
            return min(default, ctx - n)
        if n + max_tokens > ctx:
            raise InvalidRequest(f"max_tokens={max_tokens} with a {n}-token prompt passes the model's context of "
                                 f"{ctx} tokens", "max_tokens")
        return max_tokens

    async def grammar_rows(self, response_format: dict | None, count: int) -> list:
        """``count`` row grammars of a ``response_format`` (logits processors; None each for free text). The
        first compiles it (once per format, cached; off the event loop), the others copy it."""
        if response_format is None or response_format.get("type") in (None, "text"):
            return [None] * count
        return [await asyncio.to_thread(self.grammars.row, response_format) for _ in range(count)]

    # ----- hand-off to the engine ------------------------------------------------------------------------
    def generate(self, adapter: str | None, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                 stop: list[str], skip_special_tokens: bool = True) -> Generation:
        """Submit one generation; its events come through the returned :class:`Generation`."""
        self.check_ids(list(sampling.logit_bias), "logit_bias")
        self.check_ids(sampling.stop_token_ids, "stop_token_ids")
        if sampling.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens={sampling.min_tokens} is over max_tokens={max_tokens}", "min_tokens")
        results = AsyncResults()
        job = GenJob(adapter, prompt_ids, max_tokens, results, sampling)
        results.on_lost = job.cancel
        self.engine.submit(job)  # Overloaded when shutting down
        self.metrics.tokens("prompt", len(prompt_ids))
        return Generation(job, results, TextStream(self.tokenizer, stop, skip_special_tokens))

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
        """The class names of the head ``adapter``'s rows run (``n`` classes; 0: however many it has): the
        adapter's saved names, else the base config's ``id2label`` when that head is the base's, else
        ``LABEL_<i>``."""
        n = n or self.store.num_classes(adapter)
        info = self.store.known.get(adapter) if adapter else None
        if info is not None and info.labels and len(info.labels) == n:
            return info.labels
        id2label = {} if self.store.own_head(adapter) else (self.engine.model.config.id2label or {})
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(n)]


def context_length(model) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return 2048
