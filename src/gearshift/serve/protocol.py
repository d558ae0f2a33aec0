"""The API's request bodies as pydantic models: every field typed, ranged and finite before anything reaches the
engine (FastAPI validates a body against them and declares them in the served OpenAPI schema).

Fields follow OpenAI's completions and chat completions, with vLLM's extras where clients use them (``top_k``,
``ignore_eos``, ``stop_token_ids``) and gearshift's own (``preset``, ``placement``, ``draft``, ``spec_k``).
A check across fields names the field it refuses first ("field: why"), which becomes the error's ``param``.
Unknown fields are ignored, as vLLM does, so clients that send more than this server reads still work; fields
this server cannot honour (penalties, ``logit_bias``, ``best_of`` > ``n``, non-text content) are refused with
400 rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit; vLLM's default max_logprobs)
INT64 = 2**63


def _utf8(text: str) -> str:
    """Strings must be encodable: JSON's ``\\udcff`` escape decodes to a lone surrogate, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds a character that is not valid Unicode ({exc.reason})") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=INT64)]], Field(min_length=1)]
Placement = Text | list[Text]  # a preset name or letters (F/S/G/K per layer), or mixer names per layer


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Sampling(BaseModel):
    """What both endpoints share: sampling, stopping, streaming and gearshift's extras."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text | None = Field(None, description="NAME, NAME:auto or NAME:<preset> (see GET /v1/models)")
    n: int | None = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    temperature: float | None = Field(
        None, ge=0, le=2, description="default 1; below 1e-5 sampling is greedy (0 is greedy)"
    )
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: off")
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: Text | Annotated[list[Text], Field(max_length=64)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=INT64)]] | None = Field(None, max_length=64)
    ignore_eos: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    # gearshift
    preset: Text | None = Field(None, description="a stored preset or 'auto'; overrides the model id's suffix")
    placement: Placement | None = Field(None, description="any placement, e.g. 'FFGGKS'")
    draft: Placement | None = Field(None, description="a draft preset or placement: self-speculative decoding")
    spec_k: int | None = Field(None, ge=1, le=64, description="first draft length")

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty: penalties are not supported (leave them 0)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        return self

    def stop_strings(self) -> list[str]:
        """The stop strings; an empty one would match before any text, so it stops nothing (as in vLLM)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    prompt: (
        Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="a string, a list of strings, token ids, or a list of token-id lists: one choice each")
    max_tokens: int | None = Field(16, ge=0, lt=INT64, description="0 (with echo and logprobs): score the prompt")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    best_of: int | None = Field(None, ge=1)
    suffix: Text | None = None

    @model_validator(mode="after")
    def _completion(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of: values other than n are not supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be at least 1 (0 only with echo: scoring the prompt)")
        if isinstance(self.prompt, str) and not self.prompt:
            raise ValueError("prompt: empty")
        if isinstance(self.prompt, list) and any(isinstance(p, str) and not p for p in self.prompt):
            raise ValueError("prompt: holds an empty string")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a token-id list."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The content as one string (a list of text parts joined; an assistant's null content empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, lt=INT64, description="default: up to the context")
    max_completion_tokens: int | None = Field(None, ge=1, lt=INT64)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True

    @model_validator(mode="after")
    def _chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self
