"""Serving metrics of an ``octoray serve`` replica, exported through Ray's metrics (Prometheus).

:class:`ServeMetrics` is the scheduler's ``on_step`` hook: after each decode step it sees the
requests the replica holds and records time to first token, inter-token latency, prompt and
generated tokens, and the running/queued gauges. Every series is tagged with ``model`` and
``replica``. Ray prefixes the names with ``ray_`` on its metrics endpoint (counters also get
``_total``); docs/serving.md lists them and shows how to scrape them.
"""

from __future__ import annotations

import time
from typing import Any

#: Histogram buckets in seconds: 5 ms to 60 s covers a GPU token and a CPU prefill under load.
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]

#: (name, kind, description): the metrics a replica exports.
METRICS = [
    ("octoray_serve_time_to_first_token_seconds", "histogram", "seconds from a request's arrival to its first token"),
    ("octoray_serve_inter_token_latency_seconds", "histogram", "seconds between two tokens of one sequence"),
    ("octoray_serve_prompt_tokens", "counter", "prompt tokens prefilled"),
    ("octoray_serve_generation_tokens", "counter", "tokens generated"),
    ("octoray_serve_running_requests", "gauge", "requests with a sequence in the decode batch"),
    ("octoray_serve_queued_requests", "gauge", "requests waiting for a place in the decode batch"),
]


class ServeMetrics:
    """Ray metrics of one replica, fed once per decode step by the scheduler (on its event loop)."""

    def __init__(self, model: str, replica: str) -> None:
        from ray.util import metrics

        keys = ("model", "replica")
        made = {}
        for name, kind, description in METRICS:
            if kind == "histogram":
                made[name] = metrics.Histogram(name, description, boundaries=LATENCY_BUCKETS_S, tag_keys=keys)
            else:
                made[name] = (metrics.Counter if kind == "counter" else metrics.Gauge)(name, description, tag_keys=keys)
            made[name].set_default_tags({"model": model, "replica": replica})
        (self.ttft, self.itl, self.prompt_tokens, self.generation_tokens, self.running,
         self.queued) = (made[name] for name, _, _ in METRICS)
        self._seen: dict[Any, tuple[int, float]] = {}  # sequence -> (tokens counted, time of the last one)

    def on_step(self, requests: list[Any], now: float) -> None:
        """Record what changed since the last step for every request held (``scheduler._Request``)."""
        running = queued = generated = 0
        seen: dict[Any, tuple[int, float]] = {}
        for request in requests:
            started = False
            for seq in request.seqs:
                count, last = self._seen.get(seq, (0, request.arrived))
                if seq.generated > count:
                    if count == 0:
                        self.ttft.observe(now - request.arrived)
                        self.prompt_tokens.inc(len(seq.prompt_ids))
                    else:  # tokens decoded in one run of steps: each interval counts, at their mean
                        gap = (now - last) / (seq.generated - count)
                        for _ in range(seq.generated - count):
                            self.itl.observe(gap)
                    generated += seq.generated - count
                    count, last = seq.generated, now
                started = started or count > 0
                if not seq.done:
                    seen[seq] = (count, last)
            if any(not seq.done for seq in request.seqs):
                running, queued = (running + 1, queued) if started else (running, queued + 1)
        self._seen = seen
        if generated:
            self.generation_tokens.inc(generated)
        self.running.set(running)
        self.queued.set(queued)


def replica_name() -> str:
    """This Serve replica's id (its unique id within the deployment), or ``local`` outside Serve."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a replica (a test, a script)
        return f"local-{int(time.time())}"
