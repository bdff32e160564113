"""The serving engine: one thread owns the model; generation by continuous batching, classification
batched across adapters. Knows nothing of HTTP.

Loop (one iteration = one token step)::

    take new work -> run commands (load/unload adapters) -> classify everything waiting, one forward
    -> admit waiting generations into the free rows (prefill them together) -> one decode step for all rows
    -> rows that finished or whose client left are dropped

A request that arrives during a long generation joins at the next step and leaves when it is done.
Every forward runs row ``i`` with its own adapter through the resident pool (:mod:`lorakit.ops.pool`):
a new batch composition costs an index. Callers get events through the ``emit`` callback they pass,
called on the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from . import batch as B
from .adapters import AdapterLoadError, AdapterStore, UnknownAdapter

log = logging.getLogger("lorakit.serve")


@dataclass
class Event:
    kind: str  # "text" (a new piece of text), "done", "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 200
    message: str = ""


@dataclass(eq=False)
class GenJob:
    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    emit: object  # Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set from any thread: the row is dropped at the next step
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    generator: torch.Generator | None = None
    grammar: object | None = None  # a structured.RowGrammar: the row's JSON constraint (response_format)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class ClsJob:
    adapter: str | None
    inputs: list[list[int]]
    future: Future
    submitted: float = field(default_factory=time.perf_counter)


class _NoMetrics:
    def __getattr__(self, name):
        return lambda *a, **k: None


class Engine:
    """Scheduler over an :class:`AdapterStore`'s model; ``start()`` runs it on its own thread."""

    def __init__(self, store: AdapterStore, tokenizer, task: str, max_batch_size: int = 32, metrics=None):
        if max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
        self.store, self.tokenizer, self.task = store, tokenizer, task
        self.model = store.model
        self.max_batch_size = max_batch_size
        self.metrics = metrics or _NoMetrics()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        if getattr(self.model.config, "eos_token_id", None) is not None:
            eos = self.model.config.eos_token_id
            self.eos_ids |= set(eos if isinstance(eos, list) else [eos])
        self.incoming: queue.Queue = queue.Queue()
        self.waiting: deque[GenJob] = deque()
        self.classify_waiting: list[ClsJob] = []
        self.rows: list[GenJob] = []
        self._admitting: list[GenJob] = []  # taken from ``waiting``, being prefilled
        self.cache = None
        self.mask: torch.Tensor | None = None
        self._rows_ctx = ExitStack()
        self._rows_names: list | None = None
        self._stopping = False
        self._cache_arg = B.cache_argument(self.model)
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ----- any thread ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish everything submitted, then stop the thread."""
        self._stopping = True
        self.incoming.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: GenJob | ClsJob) -> None:
        if self._stopping:
            raise RuntimeError("the server is shutting down")
        self.incoming.put(job)

    def call(self, fn) -> Future:
        """Run ``fn()`` on the engine thread between steps (adapter loads and unloads)."""
        fut: Future = Future()
        self.incoming.put((fn, fut))
        return fut

    def busy_adapters(self) -> set[str]:
        return {j.adapter for j in [*self.rows, *self.waiting] if j.adapter is not None}

    def running(self) -> int:
        return len(self.rows)

    # ----- engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # this thread only; not inference_mode: the pool's stacks change in place
        while True:
            idle = not (self.rows or self.waiting or self.classify_waiting)
            if idle:
                self._set_rows(None)  # leave the model as it was found while there is nothing to run
            if idle and self._stopping and self.incoming.empty():
                break
            self._take(block=idle)
            try:
                self._classify()
                self._admit()
                if self.rows:
                    self._step()
            except Exception as e:  # noqa: BLE001 -- a bug in one step fails its rows, not the server
                log.exception("engine step failed")
                self._fail_all(e)

    def _take(self, block: bool) -> None:
        try:
            item = self.incoming.get(timeout=0.5) if block else self.incoming.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, GenJob):
                self.waiting.append(item)
            elif isinstance(item, ClsJob):
                self.classify_waiting.append(item)
            elif isinstance(item, tuple):
                fn, fut = item
                self._set_rows(None)
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 -- handed to the caller
                    fut.set_exception(e)
            try:
                item = self.incoming.get_nowait()
            except queue.Empty:
                return

    def _set_rows(self, names: list | None) -> None:
        """Enter ``pool.rows(names)`` unless that composition is already entered (None: leave it)."""
        if names == self._rows_names:
            return
        self._rows_ctx.close()
        self._rows_names = None
        if names is not None:
            self._rows_ctx = ExitStack()
            self._rows_ctx.enter_context(self.store.pool.rows(names))
            self._rows_names = list(names)

    def _ensure(self, job, pinned: set[str]) -> bool | None:
        """Load the job's adapter. True: ready; False: no free slot yet; None: failed (job answered)."""
        if job.adapter is not None and job.adapter not in self.store.loaded:
            self._set_rows(None)  # the pool is about to change under the entered composition
        try:
            return self.store.ensure(job.adapter, pinned)
        except UnknownAdapter as e:
            self._fail(job, 404, str(e.args[0]))
        except AdapterLoadError as e:
            self._fail(job, 500, str(e))
        return None

    def _fail(self, job, status: int, message: str) -> None:
        if isinstance(job, ClsJob):
            job.future.set_exception(AdapterLoadError(message) if status == 500 else UnknownAdapter(message))
        else:
            job.emit(Event("error", status=status, message=message))

    def _fail_all(self, e: Exception) -> None:
        self._set_rows(None)
        message = f"internal error: {type(e).__name__}: {e}"
        for job in self.rows + self._admitting:
            job.emit(Event("error", status=500, message=message))
        for job in self.classify_waiting:
            if not job.future.done():
                job.future.set_exception(RuntimeError(message))
        self.rows, self._admitting, self.classify_waiting, self.cache, self.mask = [], [], [], None, None

    # ----- classification --------------------------------------------------------------------------------
    def _classify(self) -> None:
        while self.classify_waiting:
            jobs, n = [], 0
            pinned = {j.adapter for j in self.rows if j.adapter}
            for job in list(self.classify_waiting):
                if jobs and n + len(job.inputs) > self.max_batch_size:
                    break
                ready = self._ensure(job, pinned)
                if ready is False:
                    break
                self.classify_waiting.remove(job)
                if ready:
                    jobs.append(job)
                    n += len(job.inputs)
                    pinned.add(job.adapter)
            if not jobs:
                return
            names = [job.adapter for job in jobs for _ in job.inputs]
            seqs = [ids for job in jobs for ids in job.inputs]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            self._set_rows(names)
            probs = torch.softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            self.metrics.batch(len(seqs), "classify")
            start = 0
            for job in jobs:
                self.metrics.queued(time.perf_counter() - job.submitted)
                job.future.set_result(probs[start:start + len(job.inputs)].tolist())
                start += len(job.inputs)

    # ----- generation ------------------------------------------------------------------------------------
    def _admit(self) -> None:
        free = self.max_batch_size - len(self.rows)
        new: list[GenJob] = []
        pinned = {j.adapter for j in self.rows if j.adapter}
        for job in list(self.waiting):
            if len(new) >= free:
                break
            if job.cancelled:
                self.waiting.remove(job)
                continue
            ready = self._ensure(job, pinned)
            if ready is False:
                continue  # its adapter waits for a slot; later requests may use loaded ones
            self.waiting.remove(job)
            if ready:
                new.append(job)
                pinned.add(job.adapter)
        if not new:
            return
        self._admitting = new
        for job in new:
            self.metrics.queued(time.perf_counter() - job.submitted)
            if job.temperature > 0:
                job.generator = torch.Generator()
                job.generator.manual_seed(job.seed if job.seed is not None else torch.seed())
        ids, mask = B.left_pad([j.prompt_ids for j in new], self.pad_id)
        self._set_rows([j.adapter for j in new])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=B.positions(mask), use_cache=True)
        self.metrics.batch(len(new), "prefill")
        tensors = B.cache_tensors(B.output_cache(out))
        keep = [i for i, job in enumerate(new) if not self._advance(job, out.logits[i, -1])]
        self._admitting = []
        if not keep:
            return
        tensors, mask = B.select(tensors, mask, keep)
        if self.rows:
            tensors, mask = B.concat((B.cache_tensors(self.cache), self.mask), (tensors, mask))
        self.rows += [new[i] for i in keep]
        self.cache, self.mask = B.make_cache(tensors), mask

    def _step(self) -> None:
        live = [i for i, job in enumerate(self.rows) if not job.cancelled]
        if len(live) < len(self.rows):
            self._drop(live)
            if not self.rows:
                return
        ids = torch.tensor([[job.generated[-1]] for job in self.rows])
        pos = torch.tensor([[len(job.prompt_ids) + len(job.generated) - 1] for job in self.rows])
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        self._set_rows([job.adapter for job in self.rows])
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                         **{self._cache_arg: self.cache})
        self.cache = B.output_cache(out)
        self.steps += 1
        self.metrics.batch(len(self.rows), "decode")
        keep = [i for i, job in enumerate(self.rows) if not self._advance(job, out.logits[i, -1])]
        if len(keep) < len(self.rows):
            self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        rows = [self.rows[i] for i in keep]
        if rows:
            tensors, self.mask = B.select(B.cache_tensors(self.cache), self.mask, keep)
            self.cache = B.make_cache(tensors)
        else:
            self.cache = self.mask = None
        self.rows = rows

    def _advance(self, job: GenJob, logits: torch.Tensor) -> bool:
        """Sample the job's next token and emit its new text; True when the job is finished."""
        if job.cancelled:
            return True
        if job.grammar is not None:
            logits = job.grammar.constrain(logits)
        token = B.sample(logits, job.temperature, job.top_p, job.generator)
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        else:
            job.generated.append(token)
        if job.grammar is not None:
            job.grammar.accept(token)
            finish = "stop" if job.grammar.done else finish  # the JSON is complete: end of the row, as EOS would
        self.metrics.tokens("completion", 1)
        text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif finish is None and len(job.generated) >= job.max_tokens:
            finish = "length"
        if finish is None:  # hold back what may be the start of a stop string or an incomplete character
            hold = max((len(s) - 1 for s in job.stop), default=0)
            ready = len(text) - hold if not text.endswith("\ufffd") else text.rfind("\ufffd")
            if ready > job.sent:
                job.emit(Event("text", text=text[job.sent:ready]))
                job.sent = ready
            return False
        if len(text) > job.sent:
            job.emit(Event("text", text=text[job.sent:]))
        job.emit(Event("done", text=text, finish_reason=finish, prompt_tokens=len(job.prompt_ids),
                       completion_tokens=len(job.generated)))
        return True
