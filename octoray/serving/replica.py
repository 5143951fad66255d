"""The OpenAI-compatible HTTP layer of ``octoray serve``: one Ray Serve replica and its routes.

:class:`CompletionServer` loads the model, builds a Starlette app with ``POST /v1/completions``
and ``POST /v1/chat/completions`` (plain and streamed), ``GET /v1/models`` and ``GET /health``
(= ``/healthz``, a real one-token decode; every ``/v1`` route behind :class:`RequireAPIKey` when
keys are set), turns each request into
:class:`~octoray.serving.decoding.Sequence` s and hands them to its
:class:`~octoray.serving.scheduler.BatchScheduler`. The protocol's rules (validation, error
bodies, response shapes) live in :mod:`octoray.serving.protocol`; deploying this class is
:func:`octoray.serving.app.build_app`'s job.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import replace
from typing import Any, Optional

from octoray.config import from_mapping
from octoray.modeling import DEFAULT_TEMPLATE, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, chat_template
from octoray.serving.chat_protocol import (chat_chunk, chat_logprobs, chat_response, chat_usage_chunk, new_chat_id,
                                           parse_chat_request)
from octoray.serving.config import FALLBACK_MAX_MODEL_LEN, ServeConfig
from octoray.serving.decoding import BatchDecoder, Sequence, prompt_logprobs
from octoray.serving.metrics import ServeMetrics, replica_name
from octoray.serving.protocol import (SSE_DONE, APIError, CompletionParams, TokenLogprob, completion_chunk,
                                      completion_response, error_body, legacy_logprobs, models_response,
                                      new_request_id, parse_completion_request, sse, usage_chunk)
from octoray.serving.scheduler import BatchScheduler, Overloaded

logger = logging.getLogger("octoray.serve")

#: Largest request body read; far above any prompt that fits a context window.
MAX_BODY_BYTES = 8 * 1024 * 1024
#: How long a /health answer is reused: probes from several load balancers cost one decode.
HEALTH_CACHE_S = 2.0
#: A one-token decode slower than this (the model wedged) fails /health.
HEALTH_TIMEOUT_S = 30.0
#: Seconds a refused client is told to wait (``Retry-After``); openai's client honours it.
RETRY_AFTER_S = 1


class CompletionServer:
    """One Ray Serve replica: the model, its batch scheduler and the HTTP routes.

    Wrapped at deploy time by ``serve.deployment(serve.ingress()(CompletionServer))``, which keeps
    this module free of Ray imports; the ASGI app is built per replica by
    ``__serve_build_asgi_app__`` so its routes can reach ``self``. ``key_digests`` are the SHA-256
    digests of the API keys (the keys themselves never reach Ray: deployment arguments are
    stored in the cluster's state and shown by its dashboard).
    """

    def __init__(self, config: dict[str, Any], key_digests: tuple[str, ...] = ()) -> None:
        import torch

        from octoray.modeling import load_model, load_tokenizer

        self.cfg = from_mapping(ServeConfig, config)
        self.key_digests = tuple(key_digests)
        self.max_model_len = int(self.cfg.max_model_len or FALLBACK_MAX_MODEL_LEN)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.model = load_model(self.cfg.model, dtype=_torch_dtype(self.cfg.dtype, self.device, self.cfg.model))
        decoder = BatchDecoder(self.model.to(self.device).eval(), self.tokenizer)
        self.decoder = decoder
        metrics = ServeMetrics(self.cfg.model_name, replica_name())
        self.scheduler = BatchScheduler(decoder, max_batch_size=self.cfg.max_batch_size,
                                        max_prefill_tokens=self.cfg.max_prefill_tokens,
                                        capacity=self.cfg.max_ongoing_requests + self.cfg.max_queued_requests,
                                        on_step=metrics.on_step)
        self.fim = _has_fim_tokens(self.tokenizer)
        self.chat_template = self.tokenizer.chat_template or chat_template(DEFAULT_TEMPLATE)
        self.created = int(time.time())
        # Readiness waits for the model: Serve routes to this replica only once __init__ returns,
        # after one real decode; its outcome is the first /health answer.
        self._probe_ids = self.tokenizer("def")["input_ids"] or [decoder.pad_id]
        self._health_lock = asyncio.Lock()
        self._health: tuple[float, str] = (time.monotonic(), self._warm_up(decoder))

    def __serve_build_asgi_app__(self) -> Any:
        """The Starlette app with its routes; called by Ray Serve after ``__init__``."""
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        def answering(handler: Any, what: str) -> Any:
            async def route(request: Any) -> Any:
                try:
                    return await handler(request)
                except APIError as exc:
                    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
                    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
                except Exception:  # noqa: BLE001 - a bug must still answer in the protocol's shape
                    logger.exception("%s failed", what)
                    return JSONResponse(error_body("internal server error (see the replica log)", "server_error"),
                                        status_code=500)
            return route

        async def models(request: Any) -> Any:
            return JSONResponse(models_response(self.cfg.model_name, self.created, self.max_model_len))

        async def health(request: Any) -> Any:
            problem = await self._check_health()
            body = {"status": "error" if problem else "ok", "model": self.cfg.model_name,
                    "stats": {**self.scheduler.stats, "running": self.scheduler.running,
                              "queued": self.scheduler.queued}}
            if problem:
                body["error"] = error_body(problem, "server_error", None, "unhealthy")["error"]
            return JSONResponse(body, status_code=503 if problem else 200)

        async def http_error(request: Any, exc: HTTPException) -> Any:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            message = f"{request.method} {request.url.path}: {exc.detail}"
            return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=exc.status_code)

        middleware = [Middleware(RequireAPIKey, digests=self.key_digests)] if self.key_digests else []
        return Starlette(routes=[Route("/v1/completions", answering(self._completions, "completion"), methods=["POST"]),
                                 Route("/v1/chat/completions", answering(self._chat, "chat completion"),
                                       methods=["POST"]),
                                 Route("/v1/models", models, methods=["GET"]),
                                 Route("/health", health, methods=["GET"]),
                                 Route("/healthz", health, methods=["GET"])],
                         middleware=middleware, exception_handlers={HTTPException: http_error})

    # --- /v1/completions ------------------------------------------------------------------------

    async def _completions(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        params = parse_completion_request(await _read_body(request), default_max_tokens=self.cfg.default_max_tokens,
                                          max_choices=self.cfg.max_choices)
        self._check_request(params, "/v1/completions")
        prompt_ids = [self._prompt_ids(p, params.suffix, params.max_tokens) for p in params.prompts]
        # echo returns the prompt before the completion: the text as given, token ids detokenised
        echoes = [(p if isinstance(p, str) else self.tokenizer.decode(list(p))) if params.echo else ""
                  for p in params.prompts]
        seqs = self._sequences(prompt_ids, params)
        if params.max_tokens == 0:  # echo only (prompt scoring): nothing to generate
            for seq in seqs:
                seq.finish_reason = "length"
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        request_id, created = new_request_id()
        model = self.cfg.model_name
        if params.stream:
            scored = (await self._prompt_scores(prompt_ids, params.logprobs)
                      if params.echo and params.logprobs is not None else None)
            admitted = self._submit(seqs, stream=True, decode=params.max_tokens > 0)
            first = [completion_chunk(request_id, created, model, s.index, echoes[s.index // params.n], None,
                                      legacy_logprobs(scored[s.index // params.n]) if scored else None)
                     for s in seqs if echoes[s.index // params.n]]
            # generated tokens' offsets continue after the echoed prompt
            offsets = {s.index: len(echoes[s.index // params.n]) for s in seqs}
            chunks = self._stream(
                seqs, admitted,
                lambda i, text, reason, records, at: completion_chunk(
                    request_id, created, model, i, text, reason,
                    None if records is None else legacy_logprobs(records, offsets[i] + at)),
                lambda done: usage_chunk(request_id, created, model, prompt_tokens, done),
                params.include_usage, first, with_logprobs=params.logprobs is not None)
            return StreamingResponse(chunks, media_type="text/event-stream")
        if params.max_tokens > 0:
            submitted, _, deadline = self._submit(seqs, stream=False)
            await self._wait(submitted, deadline)
        texts = [echoes[s.index // params.n] + s.text for s in seqs]
        logprobs = None
        if params.logprobs is not None:
            scored = await self._prompt_scores(prompt_ids, params.logprobs) if params.echo else None
            logprobs = [legacy_logprobs((scored[s.index // params.n] if scored else []) + self._generated_logprobs(s))
                        for s in seqs]
        body = completion_response(request_id, created, model,
                                   [(text, s.finish_reason) for text, s in zip(texts, seqs)], prompt_tokens,
                                   sum(s.generated for s in seqs), logprobs)
        return JSONResponse(body)

    # --- /v1/chat/completions -------------------------------------------------------------------

    async def _chat(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        chat = parse_chat_request(await _read_body(request), max_choices=self.cfg.max_choices)
        params = chat.completion
        self._check_request(params, "/v1/chat/completions")
        try:
            prompt = self.tokenizer.apply_chat_template([dict(m) for m in chat.messages], tokenize=False,
                                                        add_generation_prompt=True, chat_template=self.chat_template)
        except Exception as exc:  # noqa: BLE001 - a template may raise on any input (jinja2's raise_exception)
            raise APIError(400, f"the model's chat template cannot render these messages: {exc}",
                           param="messages", code="invalid_value") from None
        if params.max_tokens is None:  # as vLLM: the rest of the context window
            room = self.max_model_len - len(self.tokenizer(prompt)["input_ids"])
            params = replace(params, max_tokens=max(room, 1))
        ids = self._encode(prompt, params.max_tokens)
        seqs = self._sequences([ids], params)
        request_id, created = new_chat_id(), int(time.time())
        model = self.cfg.model_name
        if params.stream:
            admitted = self._submit(seqs, stream=True)
            first = [chat_chunk(request_id, created, model, s.index, {"role": "assistant", "content": ""}, None)
                     for s in seqs]
            chunks = self._stream(
                seqs, admitted,
                lambda i, text, reason, records, _: chat_chunk(
                    request_id, created, model, i, {"content": text} if text else {}, reason,
                    None if records is None else chat_logprobs(records)),
                lambda done: chat_usage_chunk(request_id, created, model, len(ids), done),
                params.include_usage, first, with_logprobs=params.logprobs is not None)
            return StreamingResponse(chunks, media_type="text/event-stream")
        submitted, _, deadline = self._submit(seqs, stream=False)
        await self._wait(submitted, deadline)
        logprobs = ([chat_logprobs(self._generated_logprobs(s)) for s in seqs] if params.logprobs is not None
                    else None)
        return JSONResponse(chat_response(request_id, created, model, [(s.text, s.finish_reason) for s in seqs],
                                          len(ids), sum(s.generated for s in seqs), logprobs))

    # --- shared -----------------------------------------------------------------------------------

    def _check_request(self, params: CompletionParams, route: str) -> None:
        if params.ignored:  # vLLM's behaviour: warn and go on (names only: values may be private)
            logger.warning("%s: ignoring unknown request fields: %s", route, ", ".join(params.ignored))
        if params.model not in (None, "", self.cfg.model_name, self.cfg.model):
            raise APIError(404, f"The model '{params.model}' does not exist; this server serves "
                                f"'{self.cfg.model_name}'", param="model", code="model_not_found")

    def _sequences(self, prompt_ids: list[list[int]], params: CompletionParams) -> list[Sequence]:
        return [Sequence(prompt_ids=ids, max_tokens=params.max_tokens, index=i * params.n + j,
                         seed=None if params.seed is None else params.seed + j, logprobs=params.logprobs,
                         **params.sampling())
                for i, ids in enumerate(prompt_ids) for j in range(params.n)]

    def _prompt_ids(self, prompt: str | tuple[int, ...], suffix: str | None, max_tokens: int) -> list[int]:
        """A prompt's token ids: text tokenised (wrapped in StarCoder's FIM order when there is a
        ``suffix``), token ids checked against the vocabulary; either way within the context."""
        if isinstance(prompt, tuple):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if t >= vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the model's vocabulary (size {vocab})",
                               param="prompt", code="invalid_value")
            return self._check_length(list(prompt), max_tokens)
        if suffix is not None and (suffix or self.fim):
            if not self.fim:
                raise APIError(400, f"suffix (fill-in-the-middle) needs a tokenizer with the {FIM_PREFIX}, "
                                    f"{FIM_SUFFIX} and {FIM_MIDDLE} tokens; the tokenizer of "
                                    f"'{self.cfg.model_name}' has none", param="suffix", code="fim_unsupported")
            prompt = f"{FIM_PREFIX}{prompt}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
        return self._encode(prompt, max_tokens)

    def _submit(self, seqs: list[Sequence], stream: bool,
                decode: bool = True) -> tuple[Any, Optional[asyncio.Queue], Optional[float]]:
        """Admit ``seqs`` to the scheduler, or refuse with 429, before any answer is sent (a
        streamed one's 200 included); their stream queue and deadline. ``decode`` False (echo
        with max_tokens 0) admits nothing: the stream only says each row is finished."""
        queue: Optional[asyncio.Queue] = asyncio.Queue() if stream else None
        for seq in seqs:
            seq.queue = queue
        if not decode:
            for seq in seqs if queue is not None else ():
                queue.put_nowait((seq.index, "", seq.finish_reason))
            return None, queue, None
        try:
            submitted = self.scheduler.submit(seqs)
        except Overloaded as exc:
            raise APIError(429, f"The server is overloaded ({exc}); retry after {RETRY_AFTER_S} s",
                           code="rate_limit_exceeded", type="rate_limit_error") from None
        deadline = None if self.cfg.request_timeout_s is None else time.monotonic() + self.cfg.request_timeout_s
        return submitted, queue, deadline

    async def _wait(self, submitted: Any, deadline: Optional[float]) -> None:
        """Until the admitted request is done; past its deadline its rows are freed and it gets 504."""
        try:
            await asyncio.wait_for(self.scheduler.wait(submitted), _left(deadline))
        except asyncio.TimeoutError:
            raise _timeout(self.cfg.request_timeout_s) from None

    def _warm_up(self, decoder: BatchDecoder) -> str:
        """One greedy token, synchronously: '' when the model decodes, else what went wrong."""
        seq = Sequence(prompt_ids=list(self._probe_ids), max_tokens=1, temperature=0.0)
        try:
            decoder.generate([seq])
        except Exception as exc:  # noqa: BLE001 - reported by /health, not fatal to the replica
            logger.exception("the warm-up decode failed")
            return f"the model cannot decode: {type(exc).__name__}: {exc}"
        return "" if seq.finish_reason in ("stop", "length") else "the model cannot decode (non-finite logits)"

    async def _check_health(self) -> str:
        """'' when a one-token decode through the running scheduler succeeds (cached briefly), else why not."""
        async with self._health_lock:  # concurrent probes share one decode
            checked, problem = self._health
            if time.monotonic() - checked < HEALTH_CACHE_S:
                return problem
            seq = Sequence(prompt_ids=list(self._probe_ids), max_tokens=1, temperature=0.0)
            try:
                await asyncio.wait_for(self.scheduler.run([seq], probe=True), HEALTH_TIMEOUT_S)
                problem = ""
            except asyncio.TimeoutError:
                problem = f"a one-token decode took over {HEALTH_TIMEOUT_S:.0f} s"
            except Exception:  # noqa: BLE001 - the row failed: logged by the decoder
                problem = "the model cannot decode (see the replica log)"
            self._health = (time.monotonic(), problem)
            return problem

    def _encode(self, prompt: str, max_tokens: int) -> list[int]:
        return self._check_length(self.tokenizer(prompt)["input_ids"], max_tokens)

    def _check_length(self, ids: list[int], max_tokens: int) -> list[int]:
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in your prompt; "
                                f"{max_tokens} for the completion). Please reduce your prompt or completion length.",
                           param="max_tokens" if len(ids) < self.max_model_len else "prompt",
                           code="context_length_exceeded")
        return ids

    def _token_text(self, token: int) -> str:
        return self.decoder.decode([token])  # as the text is decoded: special tokens dropped

    def _generated_logprobs(self, seq: Sequence) -> list[TokenLogprob]:
        """The returned tokens' log-probability records (EOS and anything past a stop string left out)."""
        return _TokenCursor().advance(seq, self._token_text, len(seq.text), final=True)

    async def _prompt_scores(self, prompt_ids: list[list[int]], top: int) -> list[list[TokenLogprob]]:
        """Each prompt's tokens with their log-probabilities (the first token has none)."""
        out = []
        for ids in prompt_ids:
            scores = await asyncio.to_thread(prompt_logprobs, self.model, ids, top)
            text = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
            out.append([(text(ids[0]), None, None)] +
                       [(text(t), lp, [(text(a), v) for a, v in alts]) for t, (lp, alts) in zip(ids[1:], scores)])
        return out

    async def _stream(self, seqs: list[Sequence], admitted: tuple[Any, asyncio.Queue, Optional[float]], chunk: Any,
                      usage: Any, include_usage: bool, first: list[dict[str, Any]], with_logprobs: bool = False) -> Any:
        """Server-sent events: ``first``, then text pieces as they are decoded (``chunk(index, text,
        finish_reason, records, offset)``: with ``with_logprobs`` the log-probability records of the
        tokens whose text the piece completes and the first one's offset in the choice's text, else
        None and 0), then ``usage(completion_tokens)`` if asked, then [DONE]."""
        by_index = {s.index: s for s in seqs}
        cursors = {s.index: _TokenCursor() for s in seqs}
        submitted, queue, deadline = admitted
        task = asyncio.ensure_future(self.scheduler.wait(submitted) if submitted is not None else asyncio.sleep(0))
        task.add_done_callback(lambda _: queue.put_nowait(None))  # after every piece: same event loop
        try:
            for item in first:
                yield sse(item)
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), _left(deadline))
                except asyncio.TimeoutError:
                    yield sse(_timeout(self.cfg.request_timeout_s).body())
                    return
                # every piece already queued goes out in one write: after a hand-off of several
                # decode steps they arrive together, and each write is a message through Serve's proxy
                items = [item]
                while items[-1] is not None and not queue.empty():
                    items.append(queue.get_nowait())
                ended = items[-1] is None
                events = []
                for index, text, finish_reason in items[:-1] if ended else items:
                    records, at = None, 0
                    if with_logprobs:
                        cursor = cursors[index]
                        at = cursor.covered
                        cursor.emitted += len(text)
                        records = cursor.advance(by_index[index], self._token_text, cursor.emitted,
                                                 final=finish_reason is not None)
                    events.append(sse(chunk(index, text, finish_reason, records, at)))
                if events:
                    yield b"".join(events)
                if ended:
                    break
                if self.cfg.stream_interval_s:
                    # let the next pieces gather; the request finishing (or its deadline) ends the wait
                    wait = self.cfg.stream_interval_s if deadline is None else min(self.cfg.stream_interval_s,
                                                                                       _left(deadline))
                    await asyncio.wait({task}, timeout=wait)
            if task.exception() is not None:
                logger.error("streamed completion failed", exc_info=task.exception())
                yield sse(error_body("internal server error (see the replica log)", "server_error"))
                return
            if include_usage:
                yield sse(usage(sum(s.generated for s in seqs)))
            yield SSE_DONE
        finally:
            if not task.done():  # the client disconnected mid-stream, or the deadline passed
                for seq in seqs:
                    seq.cancelled = True
                task.cancel()


class _TokenCursor:
    """Which of a sequence's sampled tokens have had their log-probability records sent.

    A streamed piece of text may end inside a token (a stop string's possible start is held
    back, an incomplete UTF-8 character waits): a token's record goes with the piece that
    completes its text, and the last piece takes every token up to the end of the final text
    (so EOS and anything past a stop string are never reported, as without streaming).
    """

    def __init__(self) -> None:
        self.sent = 0  # tokens whose records were sent
        self.covered = 0  # characters of the choice's text those tokens make up
        self.emitted = 0  # characters of the choice's text streamed so far

    def advance(self, seq: Sequence, token_text: Any, upto: int, final: bool) -> list[TokenLogprob]:
        """The records of the next tokens whose text ends by character ``upto`` (with ``final``:
        that starts before it)."""
        out: list[TokenLogprob] = []
        # sampled_logprobs grows in the decode thread: take its length once (a whole read under the GIL)
        available = min(len(seq.token_ids), len(seq.sampled_logprobs))
        while self.sent < available:
            text = token_text(seq.token_ids[self.sent])
            if (self.covered >= upto) if final else (self.covered + len(text) > upto):
                break
            logprob, top = seq.sampled_logprobs[self.sent]
            out.append((text, logprob, [(token_text(t), v) for t, v in top]))
            self.sent += 1
            self.covered += len(text)
        return out


class RequireAPIKey:
    """ASGI middleware: every ``/v1`` request needs ``Authorization: Bearer KEY`` with one of the
    keys (compared by SHA-256 digest, in constant time); others get 401 in OpenAI's error shape.
    ``/health`` and ``/healthz`` stay open: load balancers and Kubernetes probe them without keys."""

    def __init__(self, app: Any, digests: tuple[str, ...]) -> None:
        self.app, self.digests = app, digests

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            problem = self._problem(dict(scope.get("headers") or []).get(b"authorization", b""))
            if problem:
                from starlette.responses import JSONResponse

                response = JSONResponse(error_body(problem, "invalid_request_error", None, "invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, header: bytes) -> str | None:
        scheme, _, key = header.decode("latin-1").strip().partition(" ")
        if not header:
            return ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)")
        given = key_digest(key.strip()) if scheme.lower() == "bearer" else ""
        # every digest compared, so the time taken tells nothing about which one nearly matched
        if not sum(hmac.compare_digest(given, d) for d in self.digests):
            return "Incorrect API key provided (send Authorization: Bearer YOUR_KEY)"
        return None


def key_digest(key: str) -> str:
    """The SHA-256 hex digest an API key is known by inside the cluster."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# --- helpers -----------------------------------------------------------------------------------

def _left(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _timeout(limit: Optional[float]) -> APIError:
    return APIError(504, f"the request took longer than request_timeout_s ({limit} s); its rows were freed",
                    code="timeout", type="server_error")


async def _read_body(request: Any) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES // (1024 * 1024)} MiB", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _has_fim_tokens(tokenizer: Any) -> bool:
    """Whether the tokenizer has StarCoder's three FIM sentinels, each one token."""
    vocab = tokenizer.get_vocab()
    return all(t in vocab and len(tokenizer(t)["input_ids"]) == 1 for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))


def _torch_dtype(name: str, device: Any, model: str) -> Any:
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32  # half precision is slow or unsupported on most CPUs
    from transformers import AutoConfig

    from octoray.storage.locations import local_copy

    config = AutoConfig.from_pretrained(local_copy(model))
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16
