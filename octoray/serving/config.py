"""The config of ``octoray serve`` (a leaf: imports nothing from octoray.serving, so the app, the
replica and the pipeline import it without a cycle)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from octoray.cluster.resources import resource_problems
from octoray.config import option

#: Context length assumed when neither the config nor the model says one.
FALLBACK_MAX_MODEL_LEN = 2048
#: ``max_tokens`` when a request gives none: OpenAI's default.
DEFAULT_MAX_TOKENS = 16


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
    min_replicas: int = option(1, "autoscaling: fewest replicas")
    max_replicas: int = option(1, "autoscaling: most replicas")
    target_ongoing_requests: float = option(32.0, "autoscaling: ongoing requests per replica to aim for")
    max_ongoing_requests: int = option(128, "requests a replica works on at once (must be >= max_batch_size)")
    max_queued_requests: int = option(
        512, "requests a replica holds waiting beyond max_ongoing_requests; past it a request gets 429 with "
             "Retry-After at once (clients such as openai's retry it)")
    request_timeout_s: Optional[float] = option(
        None, "seconds a request may take, queueing included; past it its rows are freed and it gets 504 "
              "(default: no limit)")
    max_prefill_tokens: int = option(
        4096, "continuous batching: most prompt tokens prefilled in one step (one prompt at least), so running "
              "rows never stall long for newcomers")
    stream_interval_s: float = option(
        0.05, "a streamed completion's pieces are written at most this often, each still its own SSE event (the "
              "first at once, the last never delayed): each write is a message through Serve's proxy, and at one "
              "per token per stream they, not the model, slow a loaded replica; Ray Serve LLM's default too "
              "(0: a write per piece)")
    batch_wait_timeout_s: float = option(
        0.0, "unused since continuous batching (new requests join the running batch at the next step); "
             "kept so existing configs still load")
    num_cpus: float = option(1.0, "CPUs reserved per replica")
    num_gpus: Optional[float] = option(None, "GPUs per replica (default: 1 when the Ray cluster has GPUs, else 0)")
    resources: Optional[dict[str, float]] = option(
        None, "extra Ray resources per replica, e.g. {fake_gpu: 1} for a node type that advertises its "
              "accelerators as a custom resource")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weights dtype; auto = float32 on CPU, the model's half dtype (or bfloat16) on GPU")
    max_model_len: Optional[int] = option(None, "context window, prompt + completion (default: the model's)")
    default_max_tokens: int = option(DEFAULT_MAX_TOKENS, "max_tokens when a request gives none (OpenAI's default is 16)")
    max_choices: int = option(128, "most completions (prompts x n) one request may ask for")
    ray_address: Optional[str] = option(None, "Ray cluster to connect to, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS, else a new local Ray)")
    app_name: str = option("octoray", "Ray Serve application name")
    api_key: tuple[str, ...] = option(
        (), "API keys clients must send as 'Authorization: Bearer KEY' on every /v1 route (--api-key KEY, "
            "repeatable; default: OCTORAY_API_KEY, comma-separated for several; none: open to anyone who "
            "reaches the port)", metavar="KEY", repr=False)

    def problems(self) -> list[str]:
        """Every invalid value, for :class:`octoray.config.ConfigError`."""
        found = []
        if not self.model:
            found.append("model: give the model to serve (a path or a hub id)")
        if not 0 < self.port < 65536:
            found.append(f"port: must be 1-65535, got {self.port}")
        positive = {"max_batch_size": self.max_batch_size, "max_replicas": self.max_replicas,
                    "max_ongoing_requests": self.max_ongoing_requests, "default_max_tokens": self.default_max_tokens,
                    "max_choices": self.max_choices, "target_ongoing_requests": self.target_ongoing_requests,
                    "max_prefill_tokens": self.max_prefill_tokens}
        found += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if v <= 0]
        if self.max_queued_requests < 0:
            found.append(f"max_queued_requests: must be >= 0, got {self.max_queued_requests}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            found.append(f"request_timeout_s: must be > 0, got {self.request_timeout_s}")
        if self.stream_interval_s < 0:
            found.append(f"stream_interval_s: must be >= 0, got {self.stream_interval_s}")
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
        if any(not key or any(c.isspace() for c in key) for key in self.api_key):
            found.append("api_key: a key must be non-empty and hold no whitespace")
        found += resource_problems("resources", self.resources)
        return found
