"""How each row of the batch picks its next token: a small pipeline of per-row logits processors, then the
sampler, then (if asked) the log-probabilities of the model's own distribution.

Each generation row owns a :class:`RowSampler` built from its :class:`SamplingParams`. A processor is an
object with per-row state: ``__call__(logits)`` edits the row's next-token logits ``(V,)`` (float32, in place
allowed) and ``accept(token)`` hears the token the row took. Built-in processors, in the order they run:
:class:`LogitBias`, :class:`MinTokens`, :class:`Penalties`; then those of ``SamplingParams.processors``
(factories, one processor per row: how structured output's grammar mask plugs in, ``structured.RowGrammar``);
a processor whose ``done`` turns True ends its row (``finish_reason: "stop"``). The sampler is greedy at temperature 0,
else softmax(logits / T) cut to top-k, top-p and min-p, drawn with the row's own seeded generator.

A row that asks for none of this (no processor, greedy, no logprobs) is on the fast path: the engine takes
its token from one ``argmax`` over the whole batch, with no per-row work (:attr:`RowSampler.fast`).

Logprobs are those of the model's raw distribution, ``log_softmax(logits)`` before any processor or
temperature (as vLLM's default ``raw_logprobs``): what an evaluation harness scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

FLOAT_MAX = torch.finfo(torch.float32).max


class LogitsProcessor(Protocol):
    done: bool  # True once the row must end (a grammar whose output is complete): finish_reason "stop"

    def __call__(self, logits: Tensor) -> Tensor: ...   # (V,) float32 -> (V,)

    def accept(self, token: int) -> None: ...


@dataclass
class SamplingParams:
    """One row's sampling. Defaults are the fast path: greedy, nothing else."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # top-k logprobs per generated token (0: the token's own only)
    prompt_logprobs: int | None = None  # the same for every prompt token (echo)
    processors: list[Callable[[], LogitsProcessor]] = field(default_factory=list)  # factories, one per row


@dataclass
class Pick:
    """A row's chosen token and, if asked, its raw logprob and the top ``k`` (token, logprob) pairs."""
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


# ----- processors ------------------------------------------------------------------------------------------
class LogitBias:
    """OpenAI's ``logit_bias``: add a fixed bias to some tokens' logits."""

    done = False

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, logits: Tensor) -> Tensor:
        return logits.index_add_(0, self.ids, self.values)

    def accept(self, token: int) -> None:
        pass


class MinTokens:
    """vLLM's ``min_tokens``: the stop tokens cannot be drawn before ``n`` tokens are generated."""

    done = False

    def __init__(self, n: int, stop_ids: set[int]):
        self.left, self.ids = n, torch.tensor(sorted(stop_ids), dtype=torch.long)

    def __call__(self, logits: Tensor) -> Tensor:
        if self.left > 0 and len(self.ids):
            logits[self.ids] = float("-inf")
        return logits

    def accept(self, token: int) -> None:
        self.left -= 1


class Penalties:
    """OpenAI's presence / frequency penalties (over generated tokens: ``- presence * [count > 0] - frequency
    * count``) and the repetition penalty of CTRL / vLLM (over prompt and generated tokens: a seen token's
    positive logit divided by it, a negative one multiplied)."""

    done = False

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.repetition = params.repetition_penalty
        self.prompt_ids, self.generated = prompt_ids, []
        self.counts = self.seen = None  # (V,), made at the first call (V: the logits' width)

    def _start(self, vocab: int) -> None:
        self.counts = torch.zeros(vocab, dtype=torch.float32)
        self.counts.index_add_(0, torch.tensor(self.generated, dtype=torch.long), torch.ones(len(self.generated)))
        self.seen = torch.zeros(vocab, dtype=torch.bool)
        self.seen[torch.tensor(self.prompt_ids, dtype=torch.long)] = True

    def __call__(self, logits: Tensor) -> Tensor:
        if self.counts is None:
            self._start(logits.shape[-1])
        if self.repetition != 1.0:
            seen = self.seen | (self.counts > 0)
            penalized = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            penalized = penalized.clamp(max=FLOAT_MAX)  # a tiny penalty overflows a positive logit to inf
            logits = torch.where(seen, penalized, logits)
        if self.presence or self.frequency:
            logits = logits - self.presence * (self.counts > 0) - self.frequency * self.counts
        return logits

    def accept(self, token: int) -> None:
        if self.counts is None:
            self.generated.append(token)
        else:
            self.counts[token] += 1


# ----- the sampler -----------------------------------------------------------------------------------------
def draw(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / T) cut to top-k, the top-p nucleus and min-p."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(_scaled(logits, params.temperature), -1)
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.min_p > 0.0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        mass = params.top_p * float(sorted_p.sum())  # of what top-k / min-p left
        keep = sorted_p.cumsum(-1) - sorted_p < mass  # the smallest prefix whose mass reaches it
        keep[0] = True  # the most likely token always stays (a top_p that is 0 in float32, e.g. 5e-324)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature``, finite where the logits are: in float64 when float32 overflows (a temperature
    of 1e-300 is 0 in float32); logits that are still too large for float64 tie at its largest value."""
    scaled = logits.float() / temperature
    if scaled.max().isfinite():  # one reduction a token: an overflow shows as +inf, 0/0 as NaN (max keeps it)
        return scaled
    finite = logits.isfinite()
    scaled = logits.double() / temperature
    return torch.where(finite, scaled.nan_to_num(posinf=torch.finfo(torch.float64).max), scaled)


def logprobs_of(logits: Tensor, tokens: Tensor, k: int) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
    """Raw logprobs of ``tokens (n,)`` under ``logits (n, V)``, and the top ``k`` of each row (k=0: none)."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    if k == 0:
        return chosen, None
    values, ids = lp.topk(k, -1)
    return chosen, [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


class RowSampler:
    """One generation row's processors, generator and stop tokens (see the module docstring)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_ids: set[int]):
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.processors: list[LogitsProcessor] = []
        if params.logit_bias:
            self.processors.append(LogitBias(params.logit_bias))
        if params.min_tokens > 0:
            self.processors.append(MinTokens(params.min_tokens, self.stop_ids))
        if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
            self.processors.append(Penalties(params, prompt_ids))
        self.processors += [make() for make in params.processors]
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.fast = not self.processors and params.temperature == 0.0 and params.logprobs is None

    def pick(self, logits: Tensor, argmax: int | None = None) -> Pick:
        """The row's next token from its raw logits ``(V,)``; ``argmax``: that of the raw logits, if known."""
        if self.fast and argmax is not None:
            return Pick(argmax)
        processed = logits.float()
        for proc in self.processors:
            processed = proc(processed)
        token = draw(processed, self.params, self.generator)
        if self.params.logprobs is None:
            return Pick(token)
        chosen, top = logprobs_of(logits[None], torch.tensor([token]), self.params.logprobs)
        return Pick(token, chosen[0], top[0] if top else None)

    def accept(self, token: int) -> None:
        for proc in self.processors:
            proc.accept(token)

    @property
    def done(self) -> bool:
        """A processor ended the row (its grammar's output is complete)."""
        return any(proc.done for proc in self.processors)
