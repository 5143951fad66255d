"""``octoray serve``: host a causal LM on Ray Serve behind an OpenAI-compatible ``/v1`` API.

    octoray serve runs/demo/model --host 127.0.0.1 --port 8000 max_batch_size=32

One Ray Serve deployment (:class:`CompletionServer`) loads the model with
:func:`octoray.modeling.load_model` and answers ``POST /v1/completions`` (plain and streamed),
``GET /v1/models`` and ``GET /healthz``. Requests are cut into sequences (prompt x ``n``) and
gathered by ``@serve.batch`` into one left-padded batch that is decoded step by step with a KV
cache; every sequence keeps its own temperature, top_p, seed, stop strings and ``max_tokens``,
so requests with different sampling settings share a batch, and finished sequences leave the
batch early. Replicas autoscale on ongoing requests; each takes ``num_gpus`` when the cluster
has GPUs. ``engine=vllm`` serves the same API through Ray Serve LLM (vLLM) instead.

Python callers (tests, the pipeline) use ``url = start(cfg)`` ... ``shutdown()``; KubeRay's
``RayService`` points at ``octoray.serving:app_builder``. Protocol details (validation, error
bodies, response shapes) live in :mod:`octoray.openai_api`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

from octoray.config import from_mapping, option, to_dict
from octoray.errors import UserError
from octoray.node_types import require_feasible, resource_problems

logger = logging.getLogger("octoray.serve")

#: Largest request body read; far above any prompt that fits a context window.
MAX_BODY_BYTES = 8 * 1024 * 1024
#: Context length assumed when neither the config nor the model says one.
FALLBACK_MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class ServeConfig:
    """Configuration of ``octoray serve`` (YAML section ``serve:``)."""

    model: str = option("", "model to serve: the model/ dir written by `octoray train` (a path or a URI such as "
                            "s3://bucket/runs/x/model, downloaded once per node), a local HF dir or a hub id")
    model_name: str = option("", "name clients pass as `model` and /v1/models lists (default: the model argument)")
    host: str = option("127.0.0.1", "address the HTTP proxy listens on (0.0.0.0 for every interface)")
    port: int = option(8000, "HTTP port; the API is at http://HOST:PORT/v1")
    engine: Literal["hf", "vllm"] = option(
        "hf", "hf: transformers with octoray's batched decoder (CPU or GPU); vllm: Ray Serve LLM (needs vLLM + GPU)")
    max_batch_size: int = option(32, "most sequences decoded together by one replica (1 turns batching off)")
    batch_wait_timeout_s: float = option(0.01, "how long a batch waits to fill before it starts")
    min_replicas: int = option(1, "autoscaling: fewest replicas")
    max_replicas: int = option(1, "autoscaling: most replicas")
    target_ongoing_requests: float = option(32.0, "autoscaling: ongoing requests per replica to aim for")
    max_ongoing_requests: int = option(128, "requests a replica accepts at once (must be >= max_batch_size)")
    num_cpus: float = option(1.0, "CPUs reserved per replica")
    num_gpus: Optional[float] = option(None, "GPUs per replica (default: 1 when the Ray cluster has GPUs, else 0)")
    resources: Optional[dict[str, float]] = option(
        None, "extra Ray resources per replica, e.g. {fake_gpu: 1} for a node type that advertises its "
              "accelerators as a custom resource")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weights dtype; auto = float32 on CPU, the model's half dtype (or bfloat16) on GPU")
    max_model_len: Optional[int] = option(None, "context window, prompt + completion (default: the model's)")
    default_max_tokens: int = option(16, "max_tokens when a request gives none (OpenAI's default is 16)")
    max_choices: int = option(128, "most completions (prompts x n) one request may ask for")
    ray_address: Optional[str] = option(None, "Ray cluster to connect to, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS, else a new local Ray)")
    app_name: str = option("octoray", "Ray Serve application name")

    def problems(self) -> list[str]:
        """Every invalid value, for :class:`octoray.config.ConfigError`."""
        found = []
        if not self.model:
            found.append("model: give the model to serve (a path or a hub id)")
        if not 0 < self.port < 65536:
            found.append(f"port: must be 1-65535, got {self.port}")
        positive = {"max_batch_size": self.max_batch_size, "max_replicas": self.max_replicas,
                    "max_ongoing_requests": self.max_ongoing_requests, "default_max_tokens": self.default_max_tokens,
                    "max_choices": self.max_choices, "target_ongoing_requests": self.target_ongoing_requests}
        found += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if v <= 0]
        if self.batch_wait_timeout_s < 0:
            found.append(f"batch_wait_timeout_s: must be >= 0, got {self.batch_wait_timeout_s}")
        if self.min_replicas < 0 or self.min_replicas > self.max_replicas:
            found.append(f"min_replicas: must be 0..max_replicas ({self.max_replicas}), got {self.min_replicas}")
        if self.max_ongoing_requests < self.max_batch_size:
            found.append(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                         f"({self.max_batch_size}), or batches can never fill")
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            found.append("num_cpus/num_gpus: must be >= 0")
        if self.max_model_len is not None and self.max_model_len < 2:
            found.append(f"max_model_len: must be >= 2, got {self.max_model_len}")
        found += resource_problems("resources", self.resources)
        return found


# --- starting and stopping ---------------------------------------------------------------------

_started_ray = False
_serving_at: Optional[tuple[str, int]] = None  # (host, port) of the proxy start() opened


def start(cfg: ServeConfig) -> str:
    """Deploy the model on Ray Serve without blocking; return the API base URL ``http://HOST:PORT/v1``.

    Connects to ``cfg.ray_address`` (or RAY_ADDRESS) when Ray is not initialised yet, else starts
    a local Ray; returns once the endpoint answers. Called again on the same host and port, it
    redeploys the application in place (new config, same proxy). Stop it with :func:`shutdown`.
    """
    global _started_ray, _serving_at
    import ray
    from ray import serve

    redeploy = _serving_at == (cfg.host, cfg.port)
    if not redeploy:
        _check_port_free(cfg.host, cfg.port)
    cfg = resolve(cfg)  # a bad model fails here, in one line, before any Ray process starts
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, log_to_driver=False)
        _started_ray = True
    app = build_app(cfg)
    if not redeploy:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        _serving_at = (cfg.host, cfg.port)
    try:
        serve.run(app, name=cfg.app_name, route_prefix="/", blocking=False)
    except RuntimeError as exc:  # a replica that fails to start: keep the cause, drop Serve's traceback dump
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise UserError(f"the server failed to start: {lines[-1] if lines else exc}") from None
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    url = f"http://{host}:{cfg.port}/v1"
    _wait_until_up(f"{url}/models", timeout_s=60.0)
    return url


def shutdown() -> None:
    """Stop Ray Serve (every application, and the HTTP proxy), and Ray if :func:`start` started it.

    Returns once the port is free again, so a following :func:`start` can bind it.
    """
    global _started_ray, _serving_at
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        if _started_ray:
            ray.shutdown()
            _started_ray = False
    if _serving_at is not None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                _check_port_free(*_serving_at)
                break
            except UserError:
                time.sleep(0.5)
        _serving_at = None


def resolve(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with the model checked (one-line error), a local path made absolute (replicas do not
    share our working directory), ``model_name`` and ``max_model_len`` filled in."""
    model, max_model_len = _preflight(cfg)
    return replace(cfg, model=model, model_name=cfg.model_name or cfg.model, max_model_len=max_model_len)


def build_app(cfg: ServeConfig) -> Any:
    """The Ray Serve application for ``cfg``, not yet running (``serve.run`` it)."""
    from ray import serve

    cfg = resolve(cfg)
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else _default_num_gpus()
    if cfg.engine == "vllm":
        return _vllm_app(cfg, num_gpus)
    replica = {"CPU": cfg.num_cpus, "GPU": num_gpus, **(cfg.resources or {})}
    require_feasible("serve", [replica] * max(1, cfg.min_replicas))
    deployment = serve.deployment(serve.ingress()(CompletionServer)).options(
        name="CompletionServer",
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": num_gpus, "resources": dict(cfg.resources or {})},
        max_ongoing_requests=cfg.max_ongoing_requests,
        autoscaling_config=_autoscaling(cfg),
    )
    return deployment.bind(to_dict(cfg))


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for Serve config files / KubeRay ``RayService``: ``import_path: octoray.serving:app_builder``.

    ``args`` holds :class:`ServeConfig` keys (``model`` at least); host and port come from the
    Serve config's ``http_options`` there, not from ``args``.
    """
    return build_app(from_mapping(ServeConfig, args, source="serve args"))


def run(cfg: ServeConfig) -> str:
    """Serve until interrupted (Ctrl-C or SIGTERM), then shut down cleanly; returns the URL it served."""
    import signal

    url = start(cfg)
    print(f"octoray serve: {cfg.model_name or cfg.model} at {url}  (Ctrl-C to stop)", flush=True)

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("octoray serve: shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutdown()
    return url


# --- command line ------------------------------------------------------------------------------

#: The command line (octoray.stage_cli): ``octoray serve MODEL [--host H] [--port P] [key=value ...]``.
CONFIG = ServeConfig
INPUT = "model"


# --- the replica -------------------------------------------------------------------------------

class CompletionServer:
    """One Ray Serve replica: the model, the batch queue and the HTTP routes.

    Wrapped at deploy time by ``serve.deployment(serve.ingress()(CompletionServer))``, which keeps
    this module free of Ray imports; the ASGI app is built per replica by
    ``__serve_build_asgi_app__`` so its routes can reach ``self``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import torch
        from ray import serve

        from octoray.modeling import load_model, load_tokenizer

        self.cfg = from_mapping(ServeConfig, config)
        self.max_model_len = int(self.cfg.max_model_len or FALLBACK_MAX_MODEL_LEN)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(self.cfg.model)
        model = load_model(self.cfg.model, dtype=_torch_dtype(self.cfg.dtype, self.device, self.cfg.model))
        self.decoder = BatchDecoder(model.to(self.device).eval(), self.tokenizer)
        self.created = int(time.time())
        #: served so far by this replica, shown by /healthz (the benchmark reads the batch sizes)
        self.stats = {"requests": 0, "sequences": 0, "completion_tokens": 0, "batches": 0, "largest_batch": 0}
        # serve.batch on the bound method, so max_batch_size can come from the config. Serve forms
        # the next batch as soon as requests arrive, not when the model is free, so several small
        # batches can wait at once: they all enter _generate_batch (max_concurrent_batches) and
        # are merged there, up to max_batch_size, into the decode batch that runs next.
        self._waiting: list[Sequence] = []
        self._model_lock = asyncio.Lock()
        self._generate = serve.batch(max_batch_size=self.cfg.max_batch_size,
                                     batch_wait_timeout_s=self.cfg.batch_wait_timeout_s,
                                     max_concurrent_batches=self.cfg.max_ongoing_requests)(self._generate_batch)

    def __serve_build_asgi_app__(self) -> Any:
        """The Starlette app with the three routes; called by Ray Serve after ``__init__``."""
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        from octoray.openai_api import APIError, error_body

        async def completions(request: Any) -> Any:
            try:
                return await self._completions(request)
            except APIError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            except Exception:  # noqa: BLE001 - a bug must still answer in the protocol's shape
                logger.exception("completion failed")
                return JSONResponse(error_body("internal server error (see the replica log)", "server_error"),
                                    status_code=500)

        async def models(request: Any) -> Any:
            from octoray.openai_api import models_response

            return JSONResponse(models_response(self.cfg.model_name, self.created, self.max_model_len))

        async def healthz(request: Any) -> Any:
            return JSONResponse({"status": "ok", "model": self.cfg.model_name, "stats": self.stats})

        async def http_error(request: Any, exc: HTTPException) -> Any:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            message = f"{request.method} {request.url.path}: {exc.detail}"
            return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=exc.status_code)

        return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/models", models, methods=["GET"]),
                                 Route("/healthz", healthz, methods=["GET"])],
                         exception_handlers={HTTPException: http_error})

    async def _completions(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        from octoray.openai_api import APIError, completion_response, new_request_id, parse_completion_request

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
        self.stats["requests"] += 1
        self.stats["sequences"] += len(seqs)
        request_id, created = new_request_id()
        if params.stream:
            chunks = self._stream(seqs, request_id, created, prompt_tokens, params.include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        await self._run(seqs)
        body = completion_response(request_id, created, self.cfg.model_name,
                                   [(s.text, s.finish_reason) for s in seqs], prompt_tokens,
                                   sum(s.generated for s in seqs))
        return JSONResponse(body)

    def _encode(self, prompt: str, max_tokens: int) -> list[int]:
        from octoray.openai_api import APIError

        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in your prompt; "
                                f"{max_tokens} for the completion). Please reduce your prompt or completion length.",
                           param="max_tokens" if len(ids) < self.max_model_len else "prompt",
                           code="context_length_exceeded")
        return ids

    async def _run(self, seqs: list[Sequence]) -> None:
        """Put every sequence into the batch queue and wait for all of them."""
        try:
            await asyncio.gather(*(self._generate(seq) for seq in seqs))
        except asyncio.CancelledError:  # client went away: let the running batch drop these rows
            for seq in seqs:
                seq.cancelled = True
            raise

    async def _stream(self, seqs: list[Sequence], request_id: str, created: int, prompt_tokens: int,
                      include_usage: bool) -> Any:
        """Server-sent events: text pieces as they are decoded, then usage (if asked), then [DONE]."""
        from octoray.openai_api import SSE_DONE, completion_chunk, error_body, sse, usage_chunk

        queue: asyncio.Queue = asyncio.Queue()
        for seq in seqs:
            seq.queue = queue
        task = asyncio.ensure_future(self._run(seqs))
        task.add_done_callback(lambda _: queue.put_nowait(None))  # after every piece: same event loop
        try:
            while (item := await queue.get()) is not None:
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
            if not task.done():  # the client disconnected mid-stream
                for seq in seqs:
                    seq.cancelled = True
                task.cancel()

    async def _generate_batch(self, seqs: list[Sequence]) -> list[Sequence]:
        """``@serve.batch`` target: queue ``seqs``; whoever holds the model decodes what waits.

        Each turn takes up to ``max_batch_size`` waiting sequences (oldest first, from any batch
        Serve formed) and decodes them together until each one finishes; a call returns once
        its own sequences are done, whichever call's turn decoded them.
        """
        self._waiting.extend(seqs)
        while not all(seq.done for seq in seqs):
            async with self._model_lock:
                if all(seq.done for seq in seqs):
                    break
                take = self._waiting[:self.cfg.max_batch_size]
                del self._waiting[:len(take)]
                if not take:
                    break  # ours were taken by a turn that failed; reported below
                await self._decode([seq for seq in take if not seq.done])
        if any(not seq.done or seq.finish_reason == "error" for seq in seqs):
            raise RuntimeError("generation failed in this request's batch (see the replica log)")
        return seqs

    async def _decode(self, live: list[Sequence]) -> None:
        """Decode ``live`` together until each one finishes.

        The forward passes run in a worker thread so the event loop keeps taking requests and
        flushing streamed pieces; sequence bookkeeping (detokenising, stop strings) stays here.
        """
        if not live:
            return
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        try:
            batch = await asyncio.to_thread(self.decoder.prefill, live)
            while keep := self.decoder.advance(batch):
                await asyncio.to_thread(self.decoder.step, batch, keep)
        except BaseException:
            for seq in live:  # no caller may wait forever on a row of a failed batch
                if not seq.done:
                    seq.finish_reason = "error"
            raise
        finally:
            self.stats["completion_tokens"] += sum(seq.generated for seq in live)


# --- batched decoding (torch) ------------------------------------------------------------------

@dataclass(eq=False)
class Sequence:
    """One completion being generated (one prompt, one of its ``n`` samples) and its settings."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    index: int = 0
    seed: Optional[int] = None
    queue: Optional[asyncio.Queue] = None  # streamed pieces go here: (index, text, finish_reason)
    token_ids: list[int] = field(default_factory=list)
    generated: int = 0  # tokens produced, the EOS included (the usage count)
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    finish_reason: Optional[str] = None
    cancelled: bool = False
    uniforms: list[float] = field(default_factory=list)  # one draw per token, from this row's seed

    @property
    def done(self) -> bool:
        """Finished (stop, length) or abandoned by its client."""
        return self.finish_reason is not None or self.cancelled

    def add(self, token: int, eos_ids: frozenset[int], decode: Any) -> None:
        """Append one sampled token; update text, stop/length state and stream the safe new text."""
        self.generated += 1
        if token in eos_ids:
            self.finish_reason = "stop"
        else:
            self.token_ids.append(token)
            self.text = decode(self.token_ids)
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:  # the stop string itself is never returned, as in the OpenAI API
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop"
            elif self.generated >= self.max_tokens:
                self.finish_reason = "length"
        if self.queue is not None:
            self._emit()

    def _emit(self) -> None:
        end = len(self.text)
        if self.finish_reason is None:
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1  # an incomplete UTF-8 character: wait for its remaining bytes
            # hold back what could be the start of a stop string, so it is never sent
            end -= max((len(s) for s in self.stop), default=1) - 1
        if end > self.emitted or self.finish_reason is not None:
            self.queue.put_nowait((self.index, self.text[self.emitted:max(end, self.emitted)], self.finish_reason))
            self.emitted = max(end, self.emitted)


@dataclass(eq=False)
class _Batch:
    """Decoding state of the sequences in flight: KV cache, mask, positions, sampled tokens."""

    seqs: list[Sequence]
    cache: Any
    attention_mask: Any
    positions: Any  # position id of the last token, per row: (B, 1)
    next_tokens: list[int]


class BatchDecoder:
    """Left-padded batch decoding with a KV cache and per-row sampling settings.

    Left padding keeps every row's last token in the last column, so one forward pass per step
    serves all rows; explicit position ids make padded rows see the same positions as unpadded
    ones. Rows that finish are dropped from the cache (``batch_select_indices``).
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        import inspect

        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
        self.eos_ids = frozenset(i for i in eos if i is not None)
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text, special tokens dropped."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate(self, seqs: list[Sequence]) -> None:
        """Decode ``seqs`` together until each one finishes (the synchronous form of the server loop)."""
        batch = self.prefill(seqs)
        while keep := self.advance(batch):
            self.step(batch, keep)

    def advance(self, batch: _Batch) -> list[int]:
        """Hand each row its sampled token; return the rows still going (empty: the batch is done)."""
        for seq, token in zip(batch.seqs, batch.next_tokens):
            if not seq.done:
                seq.add(token, self.eos_ids, self.decode)
        return [i for i, seq in enumerate(batch.seqs) if not seq.done]

    def prefill(self, seqs: list[Sequence]) -> _Batch:
        """Run the prompts (left-padded) and sample each row's first token."""
        import torch

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids):] = 1
            generator = torch.Generator().manual_seed(seq.seed if seq.seed is not None else random.getrandbits(63))
            seq.uniforms = torch.rand(seq.max_tokens, generator=generator, dtype=torch.float64).tolist()
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **self._last_only)
            tokens = self._sample(out.logits[:, -1, :], seqs)
        return _Batch(seqs, _cache_of(out), mask, positions[:, -1:], tokens)

    def step(self, batch: _Batch, keep: list[int]) -> None:
        """Drop finished rows, feed each kept row its last token, sample the next ones."""
        import torch

        with torch.inference_mode():
            tokens = torch.tensor(batch.next_tokens, dtype=torch.long, device=self.device)
            if len(keep) < len(batch.seqs) and hasattr(batch.cache, "batch_select_indices"):
                index = torch.tensor(keep, device=self.device)
                batch.cache.batch_select_indices(index)
                batch.attention_mask = batch.attention_mask[index]
                batch.positions = batch.positions[index]
                batch.seqs = [batch.seqs[i] for i in keep]
                tokens = tokens[index]
            # without a cache that can shrink, finished rows ride along; advance() skips them
            batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((len(tokens), 1))], 1)
            batch.positions = batch.positions + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=batch.attention_mask,
                             position_ids=batch.positions, use_cache=True, **{self._cache_arg: batch.cache})
            batch.cache = _cache_of(out)
            batch.next_tokens = self._sample(out.logits[:, -1, :], batch.seqs)

    def _sample(self, logits: Any, seqs: list[Sequence]) -> list[int]:
        """Greedy where temperature is 0, else temperature + nucleus sampling, row by row settings.

        Sampling is by inverse CDF with one uniform per row drawn from that row's own generator
        (pre-drawn at prefill), so a seeded row gets the same tokens in any batch, and a step
        costs one vectorised search instead of a ``multinomial`` call per row.
        """
        import torch

        chosen = logits.argmax(-1)
        sampled = [i for i, s in enumerate(seqs) if s.temperature > 0 and not s.done]
        if sampled:
            device = logits.device
            index = torch.tensor(sampled, device=device)
            temps = torch.tensor([seqs[i].temperature for i in sampled], device=device)[:, None]
            probs = torch.softmax(logits[index].float() / temps, dim=-1)
            top_p = torch.tensor([seqs[i].top_p for i in sampled], device=device)[:, None]
            if bool((top_p < 1).any()):
                top_p = top_p.masked_fill(top_p >= 1, 2.0)  # rows without top_p keep every token
                ordered, order = probs.sort(dim=-1, descending=True)
                # drop tokens once the mass before them already reaches top_p (the first always stays);
                # the mask goes back to vocabulary order so the draw below sees one canonical order
                drop = (ordered.cumsum(-1) - ordered) >= top_p
                probs = probs.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), 0.0)
            cdf = probs.cumsum(-1)
            draws = torch.tensor([seqs[i].uniforms[seqs[i].generated] for i in sampled], device=device)
            # first token whose cumulative mass exceeds the draw: never one of zero probability
            target = (draws[:, None] * cdf[:, -1:]).clamp(min=torch.finfo(cdf.dtype).tiny)
            picked = torch.searchsorted(cdf, target).clamp(max=cdf.shape[-1] - 1)
            chosen[index] = picked[:, 0]
        return chosen.tolist()


# --- helpers -----------------------------------------------------------------------------------

async def _read_body(request: Any) -> bytes:
    from octoray.openai_api import APIError

    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES // (1024 * 1024)} MiB", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def _torch_dtype(name: str, device: Any, model: str) -> Any:
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32  # half precision is slow or unsupported on most CPUs
    from transformers import AutoConfig

    from octoray.storage import local_copy

    config = AutoConfig.from_pretrained(local_copy(model))
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16


def _preflight(cfg: ServeConfig) -> tuple[str, int]:
    """Resolve a local model path and find the context length, failing in one line before deploying."""
    from octoray.modeling import preflight_model
    from octoray.storage import is_uri, local_copy

    if is_uri(cfg.model):
        # A model directory URI stays a URI: every replica downloads it once to its node's cache
        # (checked here on this node's copy).
        model, config = cfg.model, preflight_model(local_copy(cfg.model))[1]
    else:
        model, config = preflight_model(cfg.model)
    if cfg.max_model_len is not None:
        return model, cfg.max_model_len
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return model, value
    return model, FALLBACK_MAX_MODEL_LEN


def _default_num_gpus() -> float:
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _autoscaling(cfg: ServeConfig) -> dict[str, Any]:
    return {"min_replicas": cfg.min_replicas, "initial_replicas": max(cfg.min_replicas, 1),
            "max_replicas": cfg.max_replicas, "target_ongoing_requests": cfg.target_ongoing_requests}


def _vllm_app(cfg: ServeConfig, num_gpus: float) -> Any:
    """The same API served by Ray Serve LLM's vLLM engine (continuous batching, paged attention)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError("engine=vllm needs vLLM: pip install 'ray[llm]' on a GPU machine, or use engine=hf")
    if num_gpus <= 0:
        raise UserError("engine=vllm needs a GPU in the Ray cluster; use engine=hf on CPU")
    from ray.serve.llm import LLMConfig, build_openai_app

    engine_kwargs: dict[str, Any] = {"max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_batch_size}
    if cfg.dtype != "auto":
        engine_kwargs["dtype"] = cfg.dtype
    llm = LLMConfig(
        model_loading_config={"model_id": cfg.model_name, "model_source": cfg.model},
        deployment_config={"autoscaling_config": _autoscaling(cfg), "max_ongoing_requests": cfg.max_ongoing_requests},
        engine_kwargs=engine_kwargs,
    )
    return build_openai_app({"llm_configs": [llm]})


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None


def _wait_until_up(url: str, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200: serve.run returns before the proxy routes to the app."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the server did not answer at {url} within {timeout_s:.0f} s")
        time.sleep(0.2)
