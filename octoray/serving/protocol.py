"""The OpenAI completions protocol: request validation, error bodies, responses, SSE chunks.

Pure Python (no torch, no ray, no web framework), so every rule here is unit-tested without a
server. :mod:`octoray.serving.replica` parses each request with :func:`parse_completion_request`, turns
an :class:`APIError` into its HTTP status and OpenAI-style body, and builds its answers with the
``*_response`` / ``*_chunk`` helpers below.

Field names, defaults and limits follow the OpenAI legacy ``/v1/completions`` API (the one
code-LLM harnesses such as bigcode-evaluation-harness use): ``max_tokens`` defaults to 16,
``temperature`` and ``top_p`` to 1, ``n`` to 1; ``prompt`` may be text or token ids, ``suffix``
asks for fill-in-the-middle, ``echo`` and ``logprobs`` (0-5) give OpenAI's legacy
log-probability object. Differences, as vLLM: up to 16 stop sequences (OpenAI: 4; HumanEvalPack's
Python task needs 8), the sampling extras ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``min_tokens``, and unknown fields ignored (listed for a logged warning) rather
than refused. The chat route's format is :mod:`octoray.serving.chat_protocol`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from octoray.serving.config import DEFAULT_MAX_TOKENS

#: OpenAI accepts up to 4 stop sequences; vLLM has no limit, and HumanEvalPack's Python stop
#: list alone has 8, so this server takes up to 16.
MAX_STOP_SEQUENCES = 16
#: The ``data:`` line that closes every stream.
SSE_DONE = b"data: [DONE]\n\n"

#: Most alternatives ``logprobs`` may ask for per token on /v1/completions (OpenAI's limit).
MAX_LOGPROBS = 5

# Fields the OpenAI API defines that this server accepts only at their "off" value: a client
# that sends them switched on gets a clear 400 rather than silently different behaviour.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},),
}
#: Sampling fields both routes take: OpenAI's, and vLLM's extras (``top_k`` ... ``min_tokens``).
SAMPLING_FIELDS = frozenset({"max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
                             "user", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty",
                             "ignore_eos", "min_tokens", "model", *_OFF_VALUES})
_FIELDS = SAMPLING_FIELDS | {"prompt", "best_of", "echo", "logprobs", "suffix"}


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:  # noqa: A002 - the OpenAI field is called "type"
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,  # noqa: A002
               code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class CompletionParams:
    """A validated ``/v1/completions`` request (chat requests reuse the sampling fields)."""

    prompts: tuple[str | tuple[int, ...], ...]  # text, or token ids (the API's list-of-ints forms)
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    model: str | None
    top_k: int = 0  # 0 (or -1 on the wire): off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    min_tokens: int = 0
    echo: bool = False
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    suffix: str | None = None  # fill-in-the-middle: the text after the completion
    ignored: tuple[str, ...] = ()  # fields this server does not know (logged, not refused)

    def sampling(self) -> dict[str, Any]:
        """The :class:`~octoray.serving.decoding.Sequence` settings of this request's rows."""
        return {"temperature": self.temperature, "top_p": self.top_p, "stop": self.stop, "top_k": self.top_k,
                "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "ignore_eos": self.ignore_eos, "min_tokens": self.min_tokens}


def parse_completion_request(raw: bytes, *, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                             max_choices: int = 128) -> CompletionParams:
    """Parse and check a request body; raise :class:`APIError` (400) naming the first bad field.

    ``max_choices`` bounds ``len(prompts) * n``, the number of sequences one request may start.
    Fields the API does not define are not refused: they are listed in ``ignored`` (the server
    logs them), as vLLM does. Context-length and token-id checks need the tokenizer and are done
    by the server.
    """
    body = json_object(raw)
    prompts = _prompts(body.get("prompt"))
    echo = boolean_field(body, "echo", False)
    logprobs = integer_field(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise type_error("suffix", "a string", suffix)
    if suffix is not None and (echo or any(not isinstance(p, str) for p in prompts)):
        raise APIError(400, "suffix (fill-in-the-middle) needs a text prompt and cannot be combined with echo",
                       param="suffix", code="invalid_value")
    # max_tokens 0 generates nothing: only meaningful with echo (scoring the prompt)
    max_tokens = integer_field(body, "max_tokens", default_max_tokens, low=0 if echo else 1)
    best_of = integer_field(body, "best_of", integer_field(body, "n", 1, low=1, high=max_choices), low=1)
    common = parse_sampling(body, max_tokens, max_choices)
    if best_of != common["n"]:
        raise APIError(400, "'best_of' different from 'n' is not supported by this server", param="best_of",
                       code="unsupported_parameter")
    if len(prompts) * common["n"] > max_choices:
        raise APIError(400, f"{len(prompts)} prompts x n={common['n']} asks for {len(prompts) * common['n']} "
                            f"completions; this server allows at most {max_choices} per request", param="n",
                       code="invalid_value")
    return CompletionParams(prompts=prompts, echo=echo, logprobs=logprobs, suffix=suffix,
                            ignored=tuple(sorted(set(body) - _FIELDS)), **common)


def parse_sampling(body: dict[str, Any], max_tokens: int, max_choices: int) -> dict[str, Any]:
    """The fields both routes share, checked: OpenAI's sampling settings and vLLM's extras."""
    for name, off in _OFF_VALUES.items():
        if name in body and body[name] is not None and not any(_same(body[name], v) for v in off):
            raise APIError(400, f"'{name}' is not supported by this server (leave it unset)", param=name,
                           code="unsupported_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise type_error("model", "a string", model)
    temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0)
    if top_p == 0.0:
        raise APIError(400, "top_p must be greater than 0 and at most 1", param="top_p", code="invalid_value")
    n = integer_field(body, "n", 1, low=1, high=max_choices)
    top_k = integer_field(body, "top_k", 0, low=-1)
    min_tokens = integer_field(body, "min_tokens", 0, low=0)
    if min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({min_tokens}) must be at most max_tokens ({max_tokens})",
                       param="min_tokens", code="invalid_value")
    repetition_penalty = _number(body, "repetition_penalty", 1.0, low=0.0, high=math.inf)
    if repetition_penalty == 0.0:
        raise APIError(400, "repetition_penalty must be greater than 0", param="repetition_penalty",
                       code="invalid_value")
    stream = boolean_field(body, "stream", False)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise type_error("user", "a string", user)
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "n": n,
            "stop": _stop(body.get("stop")), "seed": integer_field(body, "seed", None), "stream": stream,
            "include_usage": _stream_options(body.get("stream_options"), stream), "model": model,
            "top_k": max(top_k, 0), "min_p": _number(body, "min_p", 0.0, low=0.0, high=1.0),
            "repetition_penalty": repetition_penalty,
            "presence_penalty": _number(body, "presence_penalty", 0.0, low=-2.0, high=2.0),
            "frequency_penalty": _number(body, "frequency_penalty", 0.0, low=-2.0, high=2.0),
            "ignore_eos": boolean_field(body, "ignore_eos", False), "min_tokens": min_tokens}


def completion_response(request_id: str, created: int, model: str, choices: list[tuple[str, str | None]],
                        prompt_tokens: int, completion_tokens: int,
                        logprobs: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """A ``text_completion`` object; ``choices`` are ``(text, finish_reason)`` in index order,
    ``logprobs`` their :func:`legacy_logprobs` objects when asked for."""
    logprobs = logprobs or [None] * len(choices)
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
                    for i, ((text, reason), lp) in enumerate(zip(choices, logprobs))],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(request_id: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed piece of choice ``index``."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


#: One token's log-probability record: (its text, its log-probability or None for a prompt's
#: first token, the top alternatives as (text, log-probability) or None).
TokenLogprob = tuple[str, "float | None", "list[tuple[str, float]] | None"]


def legacy_logprobs(tokens: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """``/v1/completions``' ``logprobs`` object: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (a ``{text: logprob}`` per token) and ``text_offset`` (each token's first character in the
    choice's text, counted from ``text_offset``)."""
    offsets, at = [], text_offset
    for text, _, _ in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": [t for t, _, _ in tokens], "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [None if top is None else dict(top) for _, _, top in tokens], "text_offset": offsets}


def usage_chunk(request_id: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream when ``stream_options.include_usage`` is set: no choices, usage."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models_response(model: str, created: int, max_model_len: int) -> dict[str, Any]:
    """``GET /v1/models``: the one model this server hosts."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "octoray", "max_model_len": max_model_len}]}


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event: ``data: {json}`` and a blank line."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def new_request_id() -> tuple[str, int]:
    """A fresh ``cmpl-...`` id and the ``created`` timestamp."""
    return f"cmpl-{uuid.uuid4().hex}", int(time.time())


# --- validation helpers ------------------------------------------------------------------------

def json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (``invalid_json``)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request: it must be a JSON object "
                            "(send Content-Type: application/json)", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, not {_json_type(body)}",
                       code="invalid_json")
    return body


def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """The API's four prompt forms: a string, a list of strings, a list of token ids, a list of
    such lists (token ids come back as tuples)."""
    if value is None:
        raise APIError(400, "you must provide a prompt parameter", param="prompt",
                       code="missing_required_parameter")
    if isinstance(value, list) and value and all(_is_token_id(t) for t in value):
        value = [value]  # one prompt given as token ids
    items = [value] if isinstance(value, str) else value
    # all strings, or all lists of token ids: the API has no mixed form
    if not isinstance(items, list) or not (all(isinstance(p, str) for p in items) or all(
            isinstance(p, list) and all(map(_is_token_id, p)) for p in items)):
        raise type_error("prompt", "a string, a list of strings, a list of token ids or a list of such lists",
                          value)
    if not items:
        raise APIError(400, "prompt must not be an empty list", param="prompt", code="invalid_value")
    if any(len(p) == 0 for p in items):
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if any(isinstance(p, list) and min(p) < 0 for p in items):
        raise APIError(400, "token ids must be >= 0", param="prompt", code="invalid_value")
    return tuple(p if isinstance(p, str) else tuple(p) for p in items)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise type_error("stop", "a string or a list of strings", value)
    if len(items) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}", param="stop",
                       code="invalid_value")
    if any(s == "" for s in items):
        raise APIError(400, "stop sequences must not be empty", param="stop", code="invalid_value")
    return tuple(dict.fromkeys(items))  # drop duplicates, keep order


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise type_error("stream_options", "an object", value)
    if not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                       code="invalid_value")
    unknown = sorted(set(value) - {"include_usage"})
    if unknown:
        raise APIError(400, f"Unrecognized stream_options field: {unknown[0]}", param="stream_options",
                       code="unknown_parameter")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise type_error("stream_options.include_usage", "true or false", include)
    return include


def integer_field(body: dict[str, Any], name: str, default: Any, low: int | None = None,
                  high: int | None = None) -> Any:
    """``body[name]`` as an integer within ``low``..``high`` (``default`` when absent or null), or a 400."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(name, "an integer", value)
    _check_range(name, value, low, high)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise type_error(name, "a number", value)
    _check_range(name, value, low, high)
    return float(value)


def boolean_field(body: dict[str, Any], name: str, default: bool) -> bool:
    """``body[name]`` as a boolean (``default`` when absent or null), or a 400."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise type_error(name, "true or false", value)
    return value


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f"at least {low}" if low is not None else f"at most {high}")
        raise APIError(400, f"{name} must be {bounds}, got {value}", param=name, code="invalid_value")


def type_error(name: str, expected: str, value: Any) -> APIError:
    """The 400 (``invalid_type``) for a field that is not ``expected``."""
    return APIError(400, f"{name} must be {expected}, got {_json_type(value)}", param=name, code="invalid_type")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``0`` is not ``false`` (Python's ``0 == False`` would say it is)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b
