"""``octoray serve``: the model behind an OpenAI-compatible HTTP endpoint on Ray Serve.

config (ServeConfig, a leaf) -> app (command line, Ray lifecycle, deployment) -> replica (the
Ray Serve replica and its routes) -> scheduler (continuous batching, the bounded queue) ->
decoding (the batched decoder) -> kv_cache (joining left-padded caches); metrics (Ray/Prometheus)
is the scheduler's step hook; protocol is the wire format (request validation, response shapes).

``octoray.serving:app_builder`` is kept as the import path of Serve config files and KubeRay
``RayService`` manifests written before the package split; new ones use
``octoray.serving.app:app_builder``.
"""
from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so that importing octoray.serving.config loads no Ray Serve.
    if name == "app_builder":
        from octoray.serving.app import app_builder

        return app_builder
    raise AttributeError(f"module 'octoray.serving' has no attribute {name!r}")
