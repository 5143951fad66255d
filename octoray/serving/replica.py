"""The OpenAI-compatible HTTP layer of ``octoray serve``: one Ray Serve replica and its routes.

:class:`CompletionServer` loads the model, builds a Starlette app with ``POST /v1/completions``
(plain and streamed), ``GET /v1/models`` and ``GET /health`` (= ``/healthz``, a real one-token
decode), turns each request into
:class:`~octoray.serving.decoding.Sequence` s and hands them to its
:class:`~octoray.serving.scheduler.BatchScheduler`. The protocol's rules (validation, error
bodies, response shapes) live in :mod:`octoray.serving.protocol`; deploying this class is
:func:`octoray.serving.app.build_app`'s job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from octoray.config import from_mapping
from octoray.serving.config import FALLBACK_MAX_MODEL_LEN, ServeConfig
from octoray.serving.decoding import BatchDecoder, Sequence
from octoray.serving.metrics import ServeMetrics, replica_name
from octoray.serving.protocol import (SSE_DONE, APIError, completion_chunk, completion_response, error_body,
                                      models_response, new_request_id, parse_completion_request, sse, usage_chunk)
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
    ``__serve_build_asgi_app__`` so its routes can reach ``self``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from octoray.modeling import load_model, load_tokenizer

        self.cfg = from_mapping(ServeConfig, config)
        self.max_model_len = int(self.cfg.max_model_len or FALLBACK_MAX_MODEL_LEN)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(self.cfg.model)
        model = load_model(self.cfg.model, dtype=_torch_dtype(self.cfg.dtype, self.device, self.cfg.model))
        decoder = BatchDecoder(model.to(self.device).eval(), self.tokenizer)
        metrics = ServeMetrics(self.cfg.model_name, replica_name())
        self.scheduler = BatchScheduler(decoder, max_batch_size=self.cfg.max_batch_size,
                                        max_prefill_tokens=self.cfg.max_prefill_tokens,
                                        capacity=self.cfg.max_ongoing_requests + self.cfg.max_queued_requests,
                                        on_step=metrics.on_step)
        self.created = int(time.time())
        # Readiness waits for the model: Serve routes to this replica only once __init__ returns,
        # after one real decode; its outcome is the first /health answer.
        self._probe_ids = self.tokenizer("def")["input_ids"] or [decoder.pad_id]
        self._health_lock = asyncio.Lock()
        self._health: tuple[float, str] = (time.monotonic(), self._warm_up(decoder))

    def __serve_build_asgi_app__(self) -> Any:
        """The Starlette app with the three routes; called by Ray Serve after ``__init__``."""
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def completions(request: Any) -> Any:
            try:
                return await self._completions(request)
            except APIError as exc:
                headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
                return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
            except Exception:  # noqa: BLE001 - a bug must still answer in the protocol's shape
                logger.exception("completion failed")
                return JSONResponse(error_body("internal server error (see the replica log)", "server_error"),
                                    status_code=500)

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

        return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/models", models, methods=["GET"]),
                                 Route("/health", health, methods=["GET"]),
                                 Route("/healthz", health, methods=["GET"])],
                         exception_handlers={HTTPException: http_error})

    async def _completions(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        params = parse_completion_request(await _read_body(request), default_max_tokens=self.cfg.default_max_tokens,
                                          max_choices=self.cfg.max_choices)
        if params.model not in (None, "", self.cfg.model_name, self.cfg.model):
            raise APIError(404, f"The model '{params.model}' does not exist; this server serves "
                                f"'{self.cfg.model_name}'", param="model", code="model_not_found")
        prompt_ids = [self._encode(p, params.max_tokens) for p in params.prompts]
        seqs = [Sequence(prompt_ids=ids, max_tokens=params.max_tokens, temperature=params.temperature,
                         top_p=params.top_p, stop=params.stop, index=i * params.n + j,
                         seed=None if params.seed is None else params.seed + j)
                for i, ids in enumerate(prompt_ids) for j in range(params.n)]
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        request_id, created = new_request_id()
        queue: Optional[asyncio.Queue] = asyncio.Queue() if params.stream else None
        for seq in seqs:
            seq.queue = queue
        try:  # admitted (or refused) here, before a streamed answer sends its 200
            submitted = self.scheduler.submit(seqs)
        except Overloaded as exc:
            raise APIError(429, f"The server is overloaded ({exc}); retry after {RETRY_AFTER_S} s",
                           code="rate_limit_exceeded", type="rate_limit_error") from None
        deadline = None if self.cfg.request_timeout_s is None else time.monotonic() + self.cfg.request_timeout_s
        if params.stream:
            chunks = self._stream(seqs, submitted, queue, deadline, request_id, created, prompt_tokens,
                                  params.include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        try:
            await asyncio.wait_for(self.scheduler.wait(submitted), _left(deadline))
        except asyncio.TimeoutError:
            raise _timeout(self.cfg.request_timeout_s) from None
        body = completion_response(request_id, created, self.cfg.model_name,
                                   [(s.text, s.finish_reason) for s in seqs], prompt_tokens,
                                   sum(s.generated for s in seqs))
        return JSONResponse(body)

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
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in your prompt; "
                                f"{max_tokens} for the completion). Please reduce your prompt or completion length.",
                           param="max_tokens" if len(ids) < self.max_model_len else "prompt",
                           code="context_length_exceeded")
        return ids

    async def _stream(self, seqs: list[Sequence], submitted: Any, queue: asyncio.Queue, deadline: Optional[float],
                      request_id: str, created: int, prompt_tokens: int, include_usage: bool) -> Any:
        """Server-sent events: text pieces as they are decoded, then usage (if asked), then [DONE]."""
        task = asyncio.ensure_future(self.scheduler.wait(submitted))
        task.add_done_callback(lambda _: queue.put_nowait(None))  # after every piece: same event loop
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), _left(deadline))
                except asyncio.TimeoutError:
                    yield sse(_timeout(self.cfg.request_timeout_s).body())
                    return
                if item is None:
                    break
                index, text, finish_reason = item
                yield sse(completion_chunk(request_id, created, self.cfg.model_name, index, text, finish_reason))
            if task.exception() is not None:
                logger.error("streamed completion failed", exc_info=task.exception())
                yield sse(error_body("internal server error (see the replica log)", "server_error"))
                return
            if include_usage:
                yield sse(usage_chunk(request_id, created, self.cfg.model_name, prompt_tokens,
                                      sum(s.generated for s in seqs)))
            yield SSE_DONE
        finally:
            if not task.done():  # the client disconnected mid-stream, or the deadline passed
                for seq in seqs:
                    seq.cancelled = True
                task.cancel()


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
