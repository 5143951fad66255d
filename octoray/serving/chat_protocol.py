"""The OpenAI chat completions protocol (``POST /v1/chat/completions``): request validation and
response shapes, pure Python like :mod:`octoray.serving.protocol` (whose sampling fields, error
bodies and helpers it shares).

Messages are rendered into one prompt by the model's ``chat_template`` (octoray.modeling holds
the ones ``octoray train`` writes); the completion is then generated exactly as on
``/v1/completions``. Differences from OpenAI, as vLLM: ``max_tokens`` defaults to the rest of the
context window, the sampling extras (``top_k`` ... ``min_tokens``) are accepted, unknown fields
are ignored with a logged warning; tools and images are not supported (400).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from octoray.serving.protocol import (SAMPLING_FIELDS, APIError, CompletionParams, TokenLogprob, boolean_field,
                                      integer_field, json_object, parse_sampling, type_error)

#: Most alternatives ``top_logprobs`` may ask for per token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
#: Roles a message may have; ``developer`` (OpenAI's newer name) is rendered as ``system``.
ROLES = ("system", "developer", "user", "assistant")
_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


@dataclass(frozen=True)
class ChatParams:
    """A validated chat request: the messages and the completion's settings.

    ``completion.max_tokens`` is None when the request gave none (the server fills in the rest
    of the context window); ``completion.logprobs`` is ``top_logprobs`` when ``logprobs`` is on.
    """

    messages: tuple[dict[str, str], ...]  # {"role", "content"}, content flattened to text
    completion: CompletionParams


def parse_chat_request(raw: bytes, *, max_choices: int = 128) -> ChatParams:
    """Parse and check a chat request body; raise :class:`APIError` (400) naming the first bad field."""
    body = json_object(raw)
    messages = _messages(body.get("messages"))
    max_tokens = integer_field(body, "max_completion_tokens", None, low=1)
    if max_tokens is None:
        max_tokens = integer_field(body, "max_tokens", None, low=1)
    common = parse_sampling(body, max_tokens if max_tokens is not None else 2 ** 31, max_choices)
    common["max_tokens"] = max_tokens
    logprobs = boolean_field(body, "logprobs", False)
    top = integer_field(body, "top_logprobs", None, low=0, high=MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
    completion = CompletionParams(prompts=("",), logprobs=(top or 0) if logprobs else None,
                                  ignored=tuple(sorted(set(body) - _FIELDS)), **common)
    return ChatParams(messages=messages, completion=completion)


def chat_response(request_id: str, created: int, model: str, choices: list[tuple[str, str | None]],
                  prompt_tokens: int, completion_tokens: int,
                  logprobs: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object; ``choices`` are ``(text, finish_reason)`` in index order."""
    from octoray.serving.protocol import usage

    logprobs = logprobs or [None] * len(choices)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                         "finish_reason": reason} for i, ((text, reason), lp) in enumerate(zip(choices, logprobs))],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(request_id: str, created: int, model: str, index: int, delta: dict[str, str],
               finish_reason: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk``: the first of a choice carries ``role``, the others
    ``content`` pieces; the last one its ``finish_reason``."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_usage_chunk(request_id: str, created: int, model: str, prompt_tokens: int,
                     completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, usage."""
    from octoray.serving.protocol import usage

    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def entry(text: str, logprob: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(text, lp), "top_logprobs": [entry(t, v) for t, v in (top or [])]}
                        for text, lp, top in tokens]}


def new_chat_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if value is None:
        raise APIError(400, "you must provide a messages parameter", param="messages",
                       code="missing_required_parameter")
    if not isinstance(value, list):
        raise type_error("messages", "an array of messages", value)
    if not value:
        raise APIError(400, "messages must not be empty", param="messages", code="invalid_value")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise type_error(where, "an object", message)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                           param=f"{where}.role", code="invalid_value")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(message.get("content"), f"{where}.content")})
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                    "supported by this server", param=where, code="invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise type_error(where, "a string or a list of text parts", value)
