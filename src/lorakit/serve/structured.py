"""Structured output: OpenAI's ``response_format`` turned into a per-row token mask (llguidance).

``{"type": "json_object"}`` asks for any JSON object; ``{"type": "json_schema", "json_schema": {"name": ...,
"schema": {...}, "strict": ...}}`` for a JSON value valid under the schema. :class:`Grammars` compiles
each distinct format once for the tokenizer (a bounded cache keyed by the format's compact JSON: the
compiled matcher, validated, is kept and each row gets a cheap copy of it) and hands out a
:class:`RowGrammar` per request: the matcher state of one batch row. Per decode step::

    row.constrain(logits)   # (V,): tokens the grammar forbids next -> -inf
    token = sample(logits)
    row.accept(token)       # advance; row.done is True once nothing but a stop token may follow

so a constrained row and a free one share every forward; only the constrained row's logits are masked
before its own sampling. When the JSON is complete (nothing but EOS may follow) the row ends at once,
``finish_reason: "stop"``, without a step for the EOS. The output is compact JSON (no whitespace between
tokens). llguidance works on bytes: strings are valid UTF-8 and hold no raw control character, and
``maxLength`` counts characters, so the output parses and validates whatever the model's weights.

Bad formats raise :class:`ResponseFormatError` (HTTP 400) naming the field: a schema that is not valid
JSON Schema (checked with ``jsonschema`` against its metaschema) or that llguidance cannot compile, and a
tokenizer that cannot write the first character of JSON. llguidance and jsonschema are imported lazily.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch
from torch import Tensor

from .errors import InvalidRequest

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_CACHED = 64  # compiled grammars kept per tokenizer


class ResponseFormatError(InvalidRequest):
    """A ``response_format`` that cannot be served (HTTP 400); ``param`` names the field."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message, param)


def format_key(fmt: dict) -> str | None:
    """The cache key of a ``response_format`` (its schema as compact JSON), None for plain text; checks it."""
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return '{"type":"json_object"}'
    if kind != "json_schema":
        raise ResponseFormatError(f"response_format.type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                                  "response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ResponseFormatError("response_format.json_schema is required with type 'json_schema'",
                                  "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ResponseFormatError(f"response_format.json_schema.name {name!r}: 1-64 letters, digits, '_' or '-'",
                                  "response_format.json_schema.name")
    schema = spec.get("schema", {})
    check_schema(schema, name)
    return json.dumps({"type": "json_schema", "schema": schema}, separators=(",", ":"))  # keeps property order


def check_schema(schema, name: str) -> None:
    """``schema`` is a valid JSON Schema (its own metaschema's rules), else :class:`ResponseFormatError`."""
    param = "response_format.json_schema.schema"
    if not isinstance(schema, dict | bool):
        raise ResponseFormatError(f"{param} ({name}) must be a JSON object, got {type(schema).__name__}", param)
    try:
        import jsonschema
    except ImportError:  # pragma: no cover -- the serve extra installs it
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ResponseFormatError(f"{param} {name!r} is not a valid JSON Schema at {where}: {e.message}",
                                  param) from None


class RowGrammar:
    """One row's matcher: the mask for its next token, advanced by each token it accepts. A logits processor
    of :mod:`lorakit.serve.sampling` (``__call__`` masks, ``accept`` advances, ``done`` ends the row)."""

    def __init__(self, matcher, vocab_size: int, stop_ids: set[int]):
        self.matcher, self.vocab_size, self.stop_ids = matcher, vocab_size, stop_ids
        self._shift = torch.arange(32, dtype=torch.int32)
        self.allowed = self._next_allowed()
        self.done = False

    def _next_allowed(self) -> Tensor:
        """Bool ``(V,)``: the tokens the grammar accepts next (the bitmask's 32-bit words unpacked)."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # bit j of word w:
        return ((words.unsqueeze(-1) >> self._shift) & 1).bool().flatten()[: self.vocab_size]  # token 32 w + j

    def can_start(self) -> bool:
        return bool(self.allowed.any())

    def constrain(self, logits: Tensor) -> Tensor:
        """``logits (V',)`` with every token the grammar forbids at -inf (ids past V: forbidden)."""
        allowed = self.allowed.to(logits.device)
        if logits.shape[-1] > allowed.shape[0]:
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        return logits.masked_fill(~allowed[: logits.shape[-1]], float("-inf"))

    __call__ = constrain

    def accept(self, token: int) -> None:
        """Advance by ``token``; ``done`` once the JSON is complete and only a stop token may follow."""
        if token in self.stop_ids:
            self.done = True
            return
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"structured output: token {token} refused by the grammar: {self.matcher.get_error()}")
        self.done = self.matcher.is_stopped()
        if not self.done:
            self.allowed = self._next_allowed()


class Grammars:
    """Compiled ``response_format`` grammars for one tokenizer, cached; see the module docstring."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, set(stop_ids)
        self._ll_tokenizer = None
        self._cache: OrderedDict[str, object] = OrderedDict()  # format key -> a fresh, validated matcher
        self._lock = threading.Lock()  # requests compile on worker threads

    def _tokenizer(self):
        if self._ll_tokenizer is None:
            try:
                import llguidance.hf
            except ImportError:
                raise ResponseFormatError("response_format needs the llguidance package: pip install "
                                          "'lorakit[serve]'") from None
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                              eos_token=sorted(self.stop_ids) or None)
        return self._ll_tokenizer

    def _compile(self, fmt: dict, key: str):
        from llguidance import LLMatcher

        schema = {"type": "object"} if fmt["type"] == "json_object" else json.loads(key)["schema"]
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer())
        matcher = LLMatcher(self._tokenizer(), grammar, log_level=0)
        if is_error or matcher.is_error():
            name = fmt["json_schema"]["name"] if fmt["type"] == "json_schema" else "json_object"
            first = ((messages or [matcher.get_error()])[0].strip().splitlines() or ["unknown error"])[0]
            raise ResponseFormatError(f"response_format.json_schema.schema {name!r} cannot be compiled to a "
                                      f"grammar: {first}", "response_format.json_schema.schema")
        return matcher

    def compiled(self, fmt: dict):
        """A fresh matcher of ``fmt`` (None for plain text): compiled once per format, then copied."""
        key = format_key(fmt)
        if key is None:
            return None
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._compile(fmt, key)
                while len(self._cache) > MAX_CACHED:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            return self._cache[key].deep_copy()

    def row(self, fmt: dict | None) -> RowGrammar | None:
        """A matcher for one row asking for ``fmt`` (None: no constraint)."""
        matcher = self.compiled(fmt) if fmt else None
        if matcher is None:
            return None
        row = RowGrammar(matcher, self.vocab_size, self.stop_ids)
        if not row.can_start():
            raise ResponseFormatError("response_format: this model's tokenizer has no token that can start the "
                                      "JSON output (it cannot write '{')")
        return row
