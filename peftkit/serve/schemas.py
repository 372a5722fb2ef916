"""The OpenAI API's request bodies (the fields peftkit serve reads) and the response bodies it returns.

Requests are validated by pydantic: a wrong type, a negative ``max_tokens`` or an unknown role becomes a 400
whose body names the field (see :mod:`peftkit.serve.errors`). Fields of the OpenAI API that do not change
what is generated here (``user``, ``logit_bias`` left empty, ...) are accepted and ignored; ``n`` other than
1 is refused rather than silently answered once.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # the OpenAI client sends fields a server may ignore

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-sequence (benchmarks)

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stop)}")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError(f"one prompt per request is served, got a list of {len(prompt)}")
            return prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("must not be empty")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (a list of content parts: its text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


MAX_CLASSIFY_INPUTS = 512  # texts in one POST /v1/classify


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: ``input`` is one text, a list of texts, or (token classification) a list of
    pre-split sentences (lists of words); at most :data:`MAX_CLASSIFY_INPUTS` of them."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: Any  # checked below: one message naming `input` rather than one per branch of a union

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        def text_or_words(item) -> bool:
            return isinstance(item, str) or (isinstance(item, list) and all(isinstance(w, str) for w in item))

        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(text_or_words(item) for item in value):
            raise ValueError(
                "must be a text, or a list of texts (or of word lists, for token classification)"
            )
        if not 1 <= len(value) <= MAX_CLASSIFY_INPUTS:
            raise ValueError(f"must hold 1 to {MAX_CLASSIFY_INPUTS} texts, got {len(value)}")
        return value


def classify_body(model: str, task: str, results: list[dict], tokens: int) -> dict:
    """The answer of ``POST /v1/classify``: one entry per input, in order (``label``, ``score`` and every
    label's ``scores`` for sequence classification; per-word ``tokens`` and ``entities`` for token
    classification)."""
    return {
        "id": _id("classify"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "task": task,
        "data": [{"index": i, "object": "classification", **result} for i, result in enumerate(results)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


class AdapterLoadRequest(BaseModel):
    """``POST /v1/adapters``: vLLM's spelling (``lora_name``, ``lora_path``) is accepted too."""

    name: str = Field(min_length=1, validation_alias="name")
    path: str = Field(min_length=1)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> AdapterLoadRequest:
        body = dict(body)
        for alias, field in (("lora_name", "name"), ("lora_path", "path")):
            if alias in body and field not in body:
                body[field] = body.pop(alias)
        return cls.model_validate(body)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    model: str, text: str, finish: str | None, use: dict | None, chunk: bool, rid: str
) -> dict:
    """A ``text_completion`` body (a whole one, or one server-sent chunk of a stream)."""
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_body(model: str, text: str, finish: str | None, use: dict | None, chunk: bool, rid: str) -> dict:
    """A ``chat.completion`` body, or a ``chat.completion.chunk`` whose ``delta`` carries the new text."""
    if chunk:
        choice = {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    body = {
        "id": rid,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if use is not None:
        body["usage"] = use
    return body


def completion_id() -> str:
    return _id("cmpl")


def chat_id() -> str:
    return _id("chatcmpl")


def model_card(name: str, owner: str, parent: str | None, task: str | None = None) -> dict:
    card = {"id": name, "object": "model", "created": 0, "owned_by": owner, "parent": parent}
    return card if task is None else {**card, "task": task}
