"""OpenAI-shaped request bodies (validated strictly: `"max_tokens": "8"` is an error, not 8) and the
response objects built from finished choices.

Unknown fields are ignored, as OpenAI clients send options (top_p, user, ...) this server does not use.
Lists stop at their first bad item and unions try their members in order: a body of a million wrong items
then costs one error, not a million (pydantic's default collects them all, which takes seconds)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Ids = Annotated[list[int], Field(fail_fast=True)]
Texts = Annotated[list[str], Field(fail_fast=True)]
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}  # a stop string cancels the sequence


class GenerationRequest(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    seed: int | None = None
    stream: bool = False
    stop: str | Texts | None = Field(None, union_mode="left_to_right")
    n: Literal[1] = 1   # one choice per prompt: batching many prompts is what `prompt` lists are for

    def stop_strings(self) -> list[str]:
        strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in strings if s]


class CompletionRequest(GenerationRequest):
    prompt: str | Ids | Texts | Annotated[list[Ids], Field(fail_fast=True)] = Field(union_mode="left_to_right")
    max_tokens: int | None = 16          # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[ContentPart], Field(fail_fast=True)] = Field(union_mode="left_to_right")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_completion_tokens: int | None = None   # the newer name for max_tokens

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


@dataclass
class Logprobs:
    """The legacy completions `logprobs` object, one entry per token (the first prompt token has none)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: Logprobs | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(choices: list[Choice]) -> dict:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(rid: str, model: str, choices: list[Choice]) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": None if c.logprobs is None else vars(c.logprobs)} for c in choices],
            "usage": usage(choices)}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def chat_body(rid: str, model: str, choice: Choice) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": choice.text},
                         "finish_reason": choice.finish_reason, "logprobs": None}],
            "usage": usage([choice])}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
