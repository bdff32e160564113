"""The work the engine runs and the one way its results come back.

A job (:class:`GenJob`, :class:`ClsJob`, :class:`CommandJob`) carries a ``results`` sink; the engine thread
puts typed events into it and nothing else: :class:`Sampled` per new token, then :class:`Finished`, for a
generation; one :class:`Scores` for a classification; one :class:`Value` for a command; :class:`Failed` for
any of them. :class:`AsyncResults` hands them over to an asyncio loop (the front object reads it with
``async for``); anything with a ``put(event)`` method can stand in (the benchmark's counters).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from .errors import ServeError
from .sampling import SamplingParams


# ----- events ----------------------------------------------------------------------------------------------
@dataclass
class Sampled:
    """One new token of a generation row; its raw logprob and top ``(token, logprob)`` pairs if asked."""
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptScored:
    """Raw logprobs of each prompt token given the ones before it (``None`` for the first), and the top
    ``(token, logprob)`` pairs at each position if asked; sent before the first token (echo + logprobs)."""
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None] | None = None


@dataclass
class Finished:
    """The row is done: ``"stop"`` (an end-of-sequence token, not part of the output) or ``"length"``."""
    reason: str


@dataclass
class Scores:
    """Per input of a classification job: its head's class probabilities (as many as the head has classes), or
    ``[value]`` for a regression head (one output)."""
    probs: list[list[float]]


@dataclass
class Value:
    """What a command returned."""
    value: Any


@dataclass
class Failed:
    error: ServeError


Event = Sampled | PromptScored | Finished | Scores | Value | Failed
FINAL = (Finished, Scores, Value, Failed)


class Results(Protocol):
    def put(self, event: Event) -> None: ...


class Outbox:
    """Events bound for one asyncio loop, handed over in one wake-up of that loop per :meth:`flush` (the engine
    flushes every outbox once per step: 64 rows' tokens wake the server's loop once, not 64 times)."""

    _all: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()  # loop -> its outbox
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pending = loop, []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Outbox:
        with cls._lock:
            box = cls._all.get(loop)
            if box is None:
                box = cls._all[loop] = cls(loop)
            return box

    def put(self, results: AsyncResults, event: Event) -> None:
        with self._lock:
            self.pending.append((results, event))

    @classmethod
    def flush_all(cls) -> None:
        """Hand every loop its pending events (engine thread); a closed loop's jobs are told (``on_lost``)."""
        with cls._lock:
            batches = [(box.loop, box.pending) for box in cls._all.values() if box.pending]
            for box in cls._all.values():
                box.pending = []
        for loop, batch in batches:
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is closed
                for results, _ in batch:
                    if results.on_lost is not None:
                        results.on_lost()


def _deliver(batch: list) -> None:
    for results, event in batch:
        if results.hold and not isinstance(event, FINAL):
            results.held.append(event)  # nobody waits for it before the end: no wake-up per token
            continue
        for early in [*results.held, *results.kept]:  # held here came before kept on the engine thread
            results.queue.put_nowait(early)
        results.held.clear()
        results.kept.clear()
        results.queue.put_nowait(event)


class AsyncResults:
    """Events put from the engine thread, read on ``loop`` with ``async for`` (ends after the final event);
    they reach the loop when the engine flushes its step (:class:`Outbox`).

    If the loop is gone (the app stopped) ``on_lost`` is called on the engine thread (the job cancels itself).
    With ``hold`` set (a reader that needs nothing before the end: a whole answer without stop strings), the
    events before the final one reach the queue together with it: one wake-up of the reader, not one a token.
    Once the engine thread sees ``hold``, it keeps those events itself (``kept``) and does not wake the loop
    for them at all; those it sent before are ``held`` on the loop, and go first.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outbox = Outbox.of(self.loop)
        self.on_lost = None
        self.hold = False  # set on the loop, never unset
        self.held: list[Event] = []  # appended on the loop
        self.kept: list[Event] = []  # appended on the engine thread, read on the loop after the final event

    def put(self, event: Event) -> None:
        if self.hold and not isinstance(event, FINAL):
            self.kept.append(event)
        else:
            self.outbox.put(self, event)

    def __aiter__(self):
        return self._events()

    async def _events(self):
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, FINAL):
                return

    async def final(self) -> Event:
        """The final event; :class:`Failed` is raised as its error."""
        async for event in self:
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, FINAL):
                return event
        raise AssertionError("unreachable: the stream ends on a final event")


# ----- jobs ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class GenJob:
    """Continue ``prompt_ids`` by up to ``max_tokens`` tokens with ``adapter`` (None: the base); ``max_tokens``
    0 only scores the prompt."""
    lane: ClassVar[str] = "generate"
    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    results: Results
    sampling: SamplingParams = field(default_factory=SamplingParams)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set from any thread: the row is dropped at the next step
    generated: list[int] = field(default_factory=list)
    sampler: Any = None  # the row's RowSampler, built when it joins the batch

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class ClsJob:
    """Class probabilities of each of ``inputs`` (token ids) with ``adapter``'s head."""
    lane: ClassVar[str] = "classify"
    adapter: str | None
    inputs: list[list[int]]
    results: Results
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class CommandJob:
    """Run ``fn()`` on the engine thread between steps (adapter loads and unloads, a benchmark's gate)."""
    lane: ClassVar[str] = "command"
    fn: Any
    results: Results
