"""The OpenAI-compatible request and response bodies, and the chat template.

Requests are strict: an unknown field is a 400 (as OpenAI answers "Unrecognized request argument"),
and OpenAI options this server cannot honour (logit_bias, suffix, best_of > 1, non-zero
presence/frequency penalties, tools) are refused by name rather than silently ignored.

Log-probabilities, as OpenAI returns them. Completions: `logprobs: k` (0 to 5) gives, per token,
`tokens` (its text), `token_logprobs`, `top_logprobs` (the k most likely tokens and the chosen one,
{text: log p}) and `text_offset` (where the token starts in the choice's text: the summed lengths
of the tokens before it, as vLLM counts). `echo: true` puts the prompt in front, its tokens scored
too (the first one has null: nothing predicts it), and `max_tokens: 0` scores the prompt without
generating (finish_reason "length"); so `{echo: true, logprobs: 1, max_tokens: 0 or 1}` is the
request lm-evaluation-harness scores multiple-choice answers with. Chat: `logprobs: true` and
`top_logprobs: k` (0 to 20) give `logprobs.content`, one {token, logprob, bytes, top_logprobs} per
generated token. Every generated token is listed, a stop id included (its text is ""), so the
counts match usage.completion_tokens. Streamed chunks carry the log-probabilities of their tokens.
The values are the model's raw distribution (log_softmax of its logits), before temperature,
penalty and filters, in float32; a probability that underflows shows as -9999.0, as OpenAI's does.

Sampling fields left out take the model directory's generation defaults (ModelScope's config.json:
temperature, top_k, top_p, through GenerationConfig.from_defaults, as the pipeline and the CLI),
not OpenAI's, because those are what the checkpoint was published with. The meanings are the
library's (gpt3zh.sampling), which agree with OpenAI's: `temperature=0` and `top_p=0` are greedy.
`top_k` and `repetition_penalty` are extensions. Every numeric field is bounded (OpenAI's bounds
where it has them) and types are strict: "5" is not an integer and "yes" not a boolean.

Chat template. These are plain language models, not chat-tuned ones, so a conversation is rendered
as a transcript the model can continue, one line per message:

    系统：{system message}
    用户：{user message}
    助手：{assistant message}
    ...
    助手：

and generation stops at a newline that starts another turn ("\\n用户：", "\\n系统：") on top of the
request's own stop strings. Roles "developer" and "system" both render as 系统. A message's content
may be a string or a list of {"type": "text", "text": ...} parts, which are joined.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CHAT_LABELS = {"system": "系统", "developer": "系统", "user": "用户", "assistant": "助手"}
CHAT_STOP = ("\n用户：", "\n系统：")
MAX_STOP = 4  # as OpenAI
SEED_LIMIT = 2**63  # torch generators take a signed 64-bit seed
INT_LIMIT = 2**31 - 1  # bound for counts without a natural one (top_k beyond the vocabulary is "off")
PENALTY_RANGE = (1e-6, 1e6)  # as GenerationConfig's


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


# OpenAI options this server cannot honour: {field: (the values that mean "off", what to use instead)}.
UNSUPPORTED = {
    "presence_penalty": ((None, 0, 0.0), "use repetition_penalty"),
    "frequency_penalty": ((None, 0, 0.0), "use repetition_penalty"),
    "logit_bias": ((None, {}), "no per-token biases"),
    "best_of": ((None, 1), "use n"),
    "suffix": ((None, ""), "no insertion mode"),
}


def _refuse_unsupported(value, info):
    off, why = UNSUPPORTED[info.field_name]
    if not any(value == o and type(value) is type(o) or value is o for o in off):
        raise ValueError(f"{info.field_name}={value!r} is not supported by this server ({why})")
    return value


class _Sampling(_Strict):
    """Options shared by completions and chat completions."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=INT_LIMIT)] | None = None  # extension
    repetition_penalty: Annotated[float, Field(ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])] | None = None  # extension
    n: Annotated[int, Field(ge=1, le=128)] = 1  # OpenAI's bound
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, as a tag for the caller's own logs

    _off = field_validator("presence_penalty", "frequency_penalty", "logit_bias")(_refuse_unsupported)


    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


TokenId = Annotated[int, Field(ge=0, le=INT_LIMIT)]
PromptType = str | list[str] | list[TokenId] | list[list[TokenId]]


MAX_LOGPROBS = 5  # OpenAI's bound for completions
MAX_TOP_LOGPROBS = 20  # and for chat


class CompletionRequest(_Sampling):
    prompt: PromptType
    # 0: score the prompt only (with echo and logprobs), as the OpenAI API allows
    max_tokens: Annotated[int, Field(ge=0, le=INT_LIMIT)] | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    _off_c = field_validator("best_of", "suffix")(_refuse_unsupported)

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, value):
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={value}: give 0 to {MAX_LOGPROBS} alternatives per token (OpenAI's "
                             f"bound), or null for none")
        return value


    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be empty (a list of prompts needs at least one, each non-empty)")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts as strings or token-id lists, one per choice group."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT_LIMIT)] | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _check_top(cls, value):
        if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={value}: give 0 to {MAX_TOP_LOGPROBS} alternatives per token "
                             "(OpenAI's bound)")
        return value

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true (as OpenAI requires)")
        return self

    @model_validator(mode="after")
    def _one_max(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


def render_chat(messages: list[ChatMessage]) -> str:
    """The transcript prompt of the module docstring."""
    lines = [f"{CHAT_LABELS[m.role]}：{m.text}\n" for m in messages]
    return "".join(lines) + f"{CHAT_LABELS['assistant']}："


# ------------------------------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------------------------------ tokenizer
# vLLM's tokenizer routes, which lm-evaluation-harness's `tokenizer_backend=remote` (and its "auto"
# detection) uses to count context tokens for loglikelihood requests.
class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str
    # True: the ids a string prompt of /v1/completions gets; False: without the special tokens the
    # tokenizer adds around a text (BERT's [CLS] ... [SEP]; JiebaBPE and char-level add none)
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int
    vocab_size: int


class Health(BaseModel):
    status: Literal["ok"]
    model: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
