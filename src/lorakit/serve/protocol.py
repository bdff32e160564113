"""Request and response models of ``lorakit serve`` (pydantic): OpenAI's completions and chat completions,
vLLM's classify and dynamic-adapter shapes. No engine, no HTTP here.

Requests forbid fields they do not know (a typo is named in the 422, never silently ignored). OpenAI's
documented fields are each honoured, accepted as changing nothing in the output (``user``, ``metadata``,
...: said so beside them), or listed in the request's ``REFUSED`` table and refused with a 400 naming them
when set to anything but a value that asks for nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_INPUTS = 256  # texts per /v1/classify request
MAX_N = 16  # samples per prompt
MAX_LOGPROBS = 20  # top logprobs per token
MAX_PROMPTS = 256  # prompts per /v1/completions request


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # documented request fields this server does not honour: name -> a value that asks for nothing (None: unset)
    REFUSED: ClassVar[dict[str, object]] = {}

    def refused(self) -> str | None:
        """The first documented field set to something this server does not do (the route answers 400)."""
        for name, harmless in self.REFUSED.items():
            value = getattr(self, name)
            if value is not None and value != harmless:
                return name
        return None


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def as_dict(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class _Sampling(_Request):
    """Fields completions and chat share: OpenAI's, then vLLM's extra sampling fields."""
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None  # an end-user id for the client's own tracking: accepted, used for nothing
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling fields
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None  # structured output (structured.py)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _null_is_zero(cls, v):
        return 0.0 if v is None else v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 300:
            raise ValueError(f"logit_bias holds {len(v)} tokens; at most 300")
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"logit_bias key {key!r} is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{key}] = {bias} is outside [-100, 100]")
        return v


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # honoured when equal to n (the default)
    suffix: str | None = None
    REFUSED: ClassVar[dict[str, object]] = {"suffix": ""}

    def refused(self) -> str | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().refused()


class ChatMessage(_Request):
    """A message of the conversation; its content a string or a list of parts (only text parts are served)."""
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list | None = None
    function_call: dict | None = None
    audio: dict | None = None
    refusal: str | None = None
    REFUSED: ClassVar[dict[str, object]] = {"tool_calls": [], "function_call": None, "audio": None,
                                            "refusal": None}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # accepted, used for nothing (they change no output): the client's own tracking and billing fields
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # asking to store the completion (true) is refused
    # refused unless they ask for nothing: tools, audio, reasoning, predicted outputs, web search
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict | None = None
    # vLLM's chat extras
    add_generation_prompt: bool = True
    REFUSED: ClassVar[dict[str, object]] = {
        "store": False, "tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "audio": None,
        "modalities": ["text"], "prediction": None, "reasoning_effort": None, "verbosity": None,
        "web_search_options": None}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token of the choice's text (the prompt's too with ``echo``): the token, its logprob (``None`` for
    the first prompt token), its top alternatives, and where it starts in the choice's text."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ClassifyRequest(_Request):
    model: str
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        texts = [v] if isinstance(v, str) else v
        if not texts or any(not t for t in texts):
            raise ValueError("input must be a non-empty string or a non-empty list of non-empty strings")
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"input holds {len(texts)} texts; at most {MAX_INPUTS} per request")
        return texts


class ClassifyItem(BaseModel):
    """One input's result under its model's head: the top class's name and every class's probability
    (``num_classes`` of them), or, for a regression head (``num_classes`` 1), its ``value``."""
    index: int
    label: str | None = None
    probs: list[float] | None = None
    value: float | None = None
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyItem]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorakit"
    root: str
    parent: str | None = None
    loaded: bool
    rank: int | None = None
    target_modules: list[str] | None = None
    size_bytes: int | None = None
    labels: list[str] | None = None  # class names (classification)
    num_classes: int | None = None  # outputs of the head its requests run (classification; 1: regression)
    untrained_head: bool | None = None  # classification: True when that head was never trained (a new base head)
    error: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadAdapterRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=128)


class TokenizeRequest(_Request):
    """vLLM's ``/tokenize``: a ``prompt``, or chat ``messages`` through the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template has them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 16)


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    model_max_length: int
    vocab_size: int


class AdapterStatus(BaseModel):
    status: Literal["ok"] = "ok"
    lora_name: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
