"""``octoray serve``: host a causal LM on Ray Serve behind an OpenAI-compatible ``/v1`` API.

    octoray serve runs/demo/train/model --host 127.0.0.1 --port 8000 max_batch_size=32

This module holds the command line and the Ray lifecycle (the config is
:class:`octoray.serving.config.ServeConfig`): it checks the model once,
joins or starts Ray (:func:`octoray.cluster.connection.ensure_ray`) and deploys one Ray Serve deployment
whose replicas answer ``POST /v1/completions`` and ``POST /v1/chat/completions`` (plain and
streamed), ``GET /v1/models`` and ``GET /health`` (= ``/healthz``); with API keys (``--api-key``, or
``OCTORAY_API_KEY``) every ``/v1`` route needs ``Authorization: Bearer KEY``. Replicas autoscale on ongoing requests; each takes ``num_gpus`` when the
cluster has GPUs. ``engine=vllm`` serves the same API through Ray Serve LLM (vLLM) instead.

The replica is built from parts with one job each:

- :mod:`octoray.serving.replica`: the replica (:class:`~octoray.serving.replica.CompletionServer`),
  its HTTP routes and the request -> sequences -> response path;
- :mod:`octoray.serving.protocol`: the protocol's rules (validation, error bodies, response shapes);
- :mod:`octoray.serving.chat_protocol`: the same for chat completions;
- :mod:`octoray.serving.scheduler`: continuous batching (new sequences join the running batch at
  the next step, finished ones leave at once) and the bounded queue;
- :mod:`octoray.serving.decoding`: left-padded batched decoding with a KV cache and per-row sampling
  (:mod:`octoray.serving.kv_cache` joins the caches);
- :mod:`octoray.serving.metrics`: time to first token, inter-token latency, tokens, queue depth.

Python callers (tests, the pipeline) use ``url = start(cfg)`` ... ``shutdown()``; KubeRay's
``RayService`` points at ``octoray.serving.app:app_builder``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any, Iterator, Optional

from octoray.cluster.resources import require_feasible
from octoray.config import from_mapping, to_dict
from octoray.errors import UserError
from octoray.serving.config import FALLBACK_MAX_MODEL_LEN, ServeConfig

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

    from octoray.cluster.connection import ensure_ray

    redeploy = _serving_at == (cfg.host, cfg.port)
    if not redeploy:
        _check_port_free(cfg.host, cfg.port)
    cfg = resolve(cfg)  # a bad model fails here, in one line, before any Ray process starts
    if not ray.is_initialized():
        with _keys_out_of_ray_jobs():
            ensure_ray(address=cfg.ray_address)
        _started_ray = True
    app = _app(cfg)
    _quiet_serve()
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
    _wait_until_up(f"{url}/models", timeout_s=60.0, api_key=cfg.api_key[0] if cfg.api_key else None)
    return url


class _NotActionable(logging.Filter):
    """Drops Serve's note that ``serve.run`` found the Serve instance ``start`` had just begun
    ("Connecting to existing Serve app ... New http_options ... will not be applied"): the
    options it means are the ones already applied, so the line only looks like a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Connecting to existing Serve app" not in record.getMessage()


def _quiet_serve() -> None:
    for name in ("ray.serve", "ray.serve._private.api"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NotActionable) for f in logger.filters):
            logger.addFilter(_NotActionable())


def shutdown() -> None:
    """Stop Ray Serve (every application, and the HTTP proxy), and Ray if :func:`start` started it.

    Returns once the port is free again, so a following :func:`start` can bind it.
    """
    global _started_ray, _serving_at
    import ray
    from ray import serve

    if ray.is_initialized():
        _shutdown_serve(ray, serve)
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


def _shutdown_serve(ray: Any, serve: Any) -> None:
    """``serve.shutdown()``, without the raylet's "Task ServeController.graceful_shutdown failed ...
    killed by ray.kill" line on a clean shutdown.

    ``serve.shutdown()`` waits on a ``graceful_shutdown`` call that only ends when the controller
    kills itself, and the raylet reports that killed call as a failure. Here the controller is
    asked to shut down without waiting (``wait=False``) and its end is watched by its name, so no
    call is pending when it goes. Ray Serve's internals move between releases: anything
    unexpected falls back to ``serve.shutdown()``.
    """
    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
        from ray.serve.context import _disconnect, _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        controller = client._controller if client is not None else None
    except Exception:  # noqa: BLE001 - another Serve version: its own shutdown
        controller = None
    if controller is None:
        serve.shutdown()
        return
    client.shutdown_cached_handles()
    ray.get(controller.graceful_shutdown.remote(wait=False), timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:  # gone: every application and proxy went before it
            break
        time.sleep(0.2)
    _disconnect()


def resolve(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with the model checked (one-line error), a local path made absolute (replicas do not
    share our working directory), ``model_name``, ``max_model_len`` and ``api_key`` (from
    ``OCTORAY_API_KEY`` when the config has none) filled in."""
    model, max_model_len = _preflight(cfg)
    keys = cfg.api_key or tuple(k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip())
    return replace(cfg, model=model, model_name=cfg.model_name or cfg.model, max_model_len=max_model_len,
                   api_key=keys)


def build_app(cfg: ServeConfig) -> Any:
    """The Ray Serve application for ``cfg``, not yet running (``serve.run`` it)."""
    return _app(resolve(cfg))


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for Serve config files / KubeRay ``RayService``: ``import_path: octoray.serving.app:app_builder``.

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

#: The command line (octoray.stage_cli): ``octoray serve MODEL [--host H] [--port P] [--api-key KEY ...] [key=value ...]``.
CONFIG = ServeConfig
INPUT = "model"
#: Read for the API keys when neither ``--api-key`` nor the config gives one (a Kubernetes Secret
#: lands here: docs/cluster.md).
API_KEY_ENV = "OCTORAY_API_KEY"


def redact_keys(argv: list[str]) -> list[str]:
    """``argv`` with the values of ``--api-key KEY``, ``--api-key=KEY`` and ``api_key=KEY`` masked."""
    out, hide = [], False
    for word in argv:
        flag, eq, _ = word.partition("=")
        if hide:
            out.append("***")
        elif eq and flag in ("--api-key", "--api_key", "api_key"):
            out.append(f"{flag}=***")
        else:
            out.append(word)
        hide = word in ("--api-key", "--api_key")
    return out


@contextlib.contextmanager
def _keys_out_of_ray_jobs() -> Iterator[None]:
    """Ray records a driver's command line (``/proc/self/cmdline``) as its job's entrypoint, which
    ``ray list jobs`` and the dashboard show: while Ray connects, it reads it with the keys masked.
    ``ray._private`` moves between releases: without that function there is nothing to patch."""
    try:
        from ray._private import utils
    except ImportError:
        yield
        return
    real = getattr(utils, "get_entrypoint_name", None)
    if real is None:
        yield
        return

    def masked() -> str:
        return " ".join(redact_keys(real().split(" ")))  # the words as Ray joined them, keys masked

    utils.get_entrypoint_name = masked
    try:
        yield
    finally:
        utils.get_entrypoint_name = real


def load(path: Optional[str], overrides: list[str], nested: dict[str, list[str]], *, values: dict[str, Any],
         check_inputs: bool = True) -> tuple[ServeConfig]:
    """The config of ``octoray serve``, where ``--api-key`` adds a key each time it is given
    (every other flag: the last one wins)."""
    from octoray.config import load_config
    from octoray.stage_cli import input_check

    keys = [item.split("=", 1)[1] for item in overrides
            if item.startswith("api_key=") and not item.split("=", 1)[1].startswith("[")]
    rest = [item for item in overrides if not (item.startswith("api_key=") and item.split("=", 1)[1] in keys)]
    if keys:
        values = {**values, "api_key": tuple(keys)}
    return (load_config(ServeConfig, path, rest, section="serve", values=values, check=input_check(check_inputs)),)


# --- helpers -----------------------------------------------------------------------------------

def _app(cfg: ServeConfig) -> Any:
    """:func:`build_app` for a ``cfg`` that :func:`resolve` has already checked and filled in."""
    from ray import serve

    from octoray.serving.replica import CompletionServer

    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else _default_num_gpus()
    if cfg.engine == "vllm":
        return _vllm_app(cfg, num_gpus)
    replica = {"CPU": cfg.num_cpus, "GPU": num_gpus, **(cfg.resources or {})}
    require_feasible("serve", [replica] * max(1, cfg.min_replicas))
    deployment = serve.deployment(serve.ingress()(CompletionServer)).options(
        name="CompletionServer",
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": num_gpus, "resources": dict(cfg.resources or {})},
        max_ongoing_requests=replica_request_limit(cfg),
        autoscaling_config=_autoscaling(cfg),
    )
    from octoray.serving.replica import key_digest

    # the keys stay here: replicas get their digests (deployment arguments live in Ray's state)
    return deployment.bind(to_dict(replace(cfg, api_key=())), tuple(key_digest(k) for k in cfg.api_key))


def replica_request_limit(cfg: ServeConfig) -> int:
    """The ``max_ongoing_requests`` Serve is given: what the replica holds (worked on + queued) plus room.

    The replica itself refuses requests past ``max_ongoing_requests + max_queued_requests`` with
    a fast 429 in OpenAI's shape; the room above that keeps Serve's router passing requests on
    (to be refused, and ``/health`` probes to be answered) instead of queueing them unseen.
    """
    held = cfg.max_ongoing_requests + cfg.max_queued_requests
    return held + max(8, held // 4)


def _preflight(cfg: ServeConfig) -> tuple[str, int]:
    """Resolve a local model path and find the context length, failing in one line before deploying."""
    from octoray.modeling import preflight_model
    from octoray.storage.locations import is_uri, local_copy

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

    from octoray.modeling import load_tokenizer

    has_template = bool(getattr(load_tokenizer(cfg.model), "chat_template", None))
    return build_openai_app({"llm_configs": [LLMConfig(**vllm_llm_config(cfg, has_template=has_template))]})


def vllm_llm_config(cfg: ServeConfig, *, has_template: bool) -> dict[str, Any]:
    """The keyword arguments of Ray Serve LLM's ``LLMConfig`` for ``cfg`` (pure: tested without vLLM).

    Limits map onto vLLM's engine (``max_model_len``, ``max_num_seqs`` = ``max_batch_size``),
    replicas onto the deployment (autoscaling, ``max_ongoing_requests``), ``stream_interval_s``
    onto Ray Serve LLM's ``stream_batching_interval_ms``. A model without its own
    ``chat_template`` gets octoray's default (vLLM takes a template string as its frontend's
    ``chat_template``, which Ray Serve LLM routes from ``engine_kwargs``). API keys are refused:
    Ray Serve LLM's OpenAI ingress checks none, and a key that is silently not enforced is worse
    than an error.
    """
    from octoray.modeling import DEFAULT_TEMPLATE, chat_template

    if cfg.api_key:
        raise UserError("api_key is not enforced by engine=vllm (Ray Serve LLM's ingress checks no key): use "
                        "engine=hf, or put the endpoint behind an authenticating proxy and unset the key")
    engine_kwargs: dict[str, Any] = {"max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_batch_size}
    if cfg.dtype != "auto":
        engine_kwargs["dtype"] = cfg.dtype
    if not has_template:
        engine_kwargs["chat_template"] = chat_template(DEFAULT_TEMPLATE)
    return {"model_loading_config": {"model_id": cfg.model_name, "model_source": cfg.model},
            "deployment_config": {"autoscaling_config": _autoscaling(cfg),
                                  "max_ongoing_requests": cfg.max_ongoing_requests},
            "engine_kwargs": engine_kwargs,
            # the same coalescing of streamed pieces (Ray Serve LLM's own default is 50 ms)
            "experimental_configs": {"stream_batching_interval_ms": 1000 * cfg.stream_interval_s}}


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None


def _wait_until_up(url: str, timeout_s: float, api_key: Optional[str] = None) -> None:
    """Poll ``url`` until it answers 200: serve.run returns before the proxy routes to the app."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the server did not answer at {url} within {timeout_s:.0f} s")
        time.sleep(0.2)
