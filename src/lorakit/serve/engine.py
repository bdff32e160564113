"""The serving engine: one thread owns the model; generation by continuous batching, classification
batched across adapters. Knows nothing of HTTP.

Loop (one iteration = one token step)::

    take new work -> run commands (load/unload adapters) -> classify everything waiting, one forward
    -> admit waiting generations into the free rows (prefill them together) -> one decode step for all rows
    -> rows that finished or whose client left are dropped

A request that arrives during a long generation joins at the next step and leaves when it is done.
Every forward runs row ``i`` with its own adapter through the resident pool (:mod:`lorakit.ops.pool`):
a new batch composition costs an index. Every job's results come back as typed events put into its
``results`` sink (:mod:`lorakit.serve.jobs`); failures are typed errors (:mod:`lorakit.serve.errors`).
Token ids in, token ids out: tokenizing, detokenizing and stop strings belong to the front object.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from contextlib import ExitStack

import torch

from . import batch as B
from .adapters import AdapterStore
from .errors import InternalError, Overloaded, ServeError
from .jobs import ClsJob, CommandJob, Failed, Finished, GenJob, Outbox, PromptScored, Sampled, Scores, Value
from .metrics import ServeMetrics
from .sampling import RowSampler, logprobs_of

log = logging.getLogger("lorakit.serve")

GATHER_S = 0.005
"""An idle engine that receives a request waits for more while they keep coming less than this apart, until
a batch is full or :data:`GATHER_MAX_S` has passed, so that a burst of requests starts as one prefill. HTTP
requests of a burst reach the engine 0.6-1.3 ms apart (median), so the first prefill held 1 row and the
other 63 of a burst waited for it, then took a prefill of their own. A lone request waits this long once."""

GATHER_MAX_S = 0.1
"""The longest an idle engine gathers (requests that keep coming without filling a batch)."""


class Engine:
    """Scheduler over an :class:`AdapterStore`'s model; ``start()`` runs it on its own thread."""

    def __init__(self, store: AdapterStore, task: str, pad_id: int = 0, eos_ids: set[int] | None = None,
                 max_batch_size: int = 32, metrics=None, gather_s: float = GATHER_S,
                 gather_max_s: float = GATHER_MAX_S):
        if max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
        for name, value in (("gather_s", gather_s), ("gather_max_s", gather_max_s)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ValueError(f"Engine {name} must be a finite number of seconds >= 0, got {value!r}")
        self.gather_s, self.gather_max_s = gather_s, gather_max_s
        self.store, self.task = store, task
        self.model = store.model
        self.max_batch_size = max_batch_size
        self.metrics = metrics or ServeMetrics()
        self.pad_id = pad_id
        self.eos_ids = set(eos_ids or ())
        eos = getattr(self.model.config, "eos_token_id", None)
        if eos is not None:
            self.eos_ids |= set(eos if isinstance(eos, list) else [eos])
        self.incoming: queue.Queue = queue.Queue()
        self.waiting: deque[GenJob] = deque()
        self.classify_waiting: list[ClsJob] = []
        self.rows: list[GenJob] = []
        self._admitting: list[GenJob] = []  # taken from ``waiting``, being prefilled
        self._classifying: list[ClsJob] = []  # in the classification forward now
        self.cache = None
        self.mask: torch.Tensor | None = None
        self._rows_ctx = ExitStack()
        self._rows_names: list | None = None
        self._stopping = False
        self._cache_arg = B.cache_argument(self.model)
        self._keep_arg = B.accepts(self.model, "logits_to_keep")
        self._thread: threading.Thread | None = None
        self.steps = 0
        self._lanes = {"generate": self.waiting.append, "classify": self.classify_waiting.append,
                       "command": self._command}

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

    def submit(self, job: GenJob | ClsJob | CommandJob) -> None:
        if self._stopping:
            raise Overloaded("the server is shutting down")
        self.incoming.put(job)

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
            Outbox.flush_all()  # this step's events, one hand-over per event loop

    def _take(self, block: bool) -> None:
        """Move new work to its lane. Idle (``block``): wait for work, then gather what follows (``gather_s``)."""
        try:
            item = self.incoming.get(timeout=0.5) if block else self.incoming.get_nowait()
        except queue.Empty:
            return
        deadline = time.perf_counter() + self.gather_max_s if block else 0.0
        while True:
            if item is None:  # stop(): finish what is queued, without gathering more
                return
            self._lanes[item.lane](item)
            full = max(len(self.waiting), len(self.classify_waiting)) >= self.max_batch_size
            wait = 0.0 if full else min(self.gather_s, deadline - time.perf_counter())
            try:
                item = self.incoming.get(timeout=wait) if wait > 0 else self.incoming.get_nowait()
            except queue.Empty:
                return

    def _command(self, job: CommandJob) -> None:
        self._set_rows(None)  # a command may change the pool under the entered composition
        try:
            job.results.put(Value(job.fn()))
        except ServeError as e:
            job.results.put(Failed(e))
        except Exception as e:  # noqa: BLE001 -- a bug in a command fails that command
            log.exception("engine command failed")
            job.results.put(Failed(InternalError(f"internal error: {type(e).__name__}: {e}")))

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
        except ServeError as e:
            job.results.put(Failed(e))
        return None

    def _fail_all(self, e: Exception) -> None:
        self._set_rows(None)
        error = InternalError(f"internal error: {type(e).__name__}: {e}")
        for job in self.rows + self._admitting + self._classifying:
            job.results.put(Failed(error))
        self.rows, self._admitting, self._classifying, self.cache, self.mask = [], [], [], None, None

    # ----- classification --------------------------------------------------------------------------------
    def _classify(self) -> None:
        while self.classify_waiting:
            jobs = self._classify_batch()
            if not jobs:
                return
            self._classifying = jobs
            names = [job.adapter for job in jobs for _ in job.inputs]
            seqs = [ids for job in jobs for ids in job.inputs]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            self._set_rows(names)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()  # (b, widest head)
            self.metrics.batch(len(seqs), "classify")
            start = 0
            for job in jobs:
                self.metrics.queued(time.perf_counter() - job.submitted)
                width = self.store.num_classes(job.adapter)  # heads narrower than the widest are zero-padded
                rows = logits[start:start + len(job.inputs), :width]
                job.results.put(Scores((rows if width == 1 else torch.softmax(rows, -1)).tolist()))
                start += len(job.inputs)
            self._classifying = []

    def _classify_batch(self) -> list[ClsJob]:
        """Waiting jobs, in order, up to ``max_batch_size`` inputs whose adapters are loaded."""
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
        return jobs

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
            job.sampler = RowSampler(job.sampling, job.prompt_ids, self.eos_ids)
        logits, tensors, mask = self._prefill(new)
        keep = [i for i, job in enumerate(new) if not self._first(job, logits[i], len(job.prompt_ids))]
        self._admitting = []
        if not keep:
            return
        tensors, mask = B.select(tensors, mask, keep)
        if self.rows:
            tensors, mask = B.concat((B.cache_tensors(self.cache), self.mask), (tensors, mask))
        self.rows += [new[i] for i in keep]
        self.cache, self.mask = B.make_cache(tensors), mask

    def _prefill(self, new: list[GenJob]):
        """One forward over the new rows' prompts, left-padded: logits ``(b, T or 1, V)``, KV tensors, mask."""
        ids, mask = B.left_pad([j.prompt_ids for j in new], self.pad_id)
        self._set_rows([j.adapter for j in new])
        every = any(job.sampling.prompt_logprobs is not None for job in new)
        last = {} if every or not self._keep_arg else {"logits_to_keep": 1}  # lm_head on the last column only
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=B.positions(mask), use_cache=True, **last)
        self.metrics.batch(len(new), "prefill")
        return out.logits, B.cache_tensors(B.output_cache(out)), mask

    def _first(self, job: GenJob, logits: torch.Tensor, n: int) -> bool:
        """After the prefill (``logits (T, V)``, the prompt in the last ``n`` columns): the prompt's logprobs
        if asked, then the first token; True when the job is finished."""
        k = job.sampling.prompt_logprobs
        if k is not None and not job.cancelled:
            lps, top = logprobs_of(logits[-n:-1], torch.tensor(job.prompt_ids[1:], dtype=torch.long), k)
            job.results.put(PromptScored([None, *lps], [None, *top] if top is not None else None))
        if job.max_tokens == 0 and not job.cancelled:
            job.results.put(Finished("length"))
            return True
        self.metrics.tokens("completion", 1)
        return self._advance(job, logits[-1])

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
        self.metrics.tokens("completion", len(self.rows))  # one token a row (counted here: once a step)
        logits = out.logits[:, -1]
        argmax = logits.argmax(-1).tolist()  # the fast path's tokens, every row at once
        keep = [i for i, job in enumerate(self.rows) if not self._advance(job, logits[i], argmax[i])]
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

    def _advance(self, job: GenJob, logits: torch.Tensor, argmax: int | None = None) -> bool:
        """Pick the job's next token and put it in its results; True when the job is finished."""
        if job.cancelled:
            return True
        pick = job.sampler.pick(logits, argmax)
        if pick.token in job.sampler.stop_ids:
            job.results.put(Finished("stop"))
            return True
        job.sampler.accept(pick.token)
        job.generated.append(pick.token)
        job.results.put(Sampled(pick.token, pick.logprob, pick.top))
        if job.sampler.done:  # e.g. the JSON of a constrained row is complete: ended as EOS would
            job.results.put(Finished("stop"))
            return True
        if len(job.generated) >= job.max_tokens:
            job.results.put(Finished("length"))
            return True
        return False
