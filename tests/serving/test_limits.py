"""``octoray serve`` under load: continuous batching, the bounded queue (429), timeouts, clients
that leave, and ``/health`` -- through real HTTP against a real Ray Serve deployment.

One ``octoray serve`` subprocess (``max_batch_size=4 max_ongoing_requests=4 max_queued_requests=4``,
the settings that must work together) serves the first tests; then, in-process on the same Ray,
the same model with ``request_timeout_s=1``, and a model whose weights are NaN.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.serve_process import serve_process

LONG_PROMPT = "import os\nclass Config:\n    def __init__(self, path):\n        self.path ="
SHORT_PROMPT = "def add(a, b):"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(port: int, method: str, path: str, body: Any = None, timeout: float = 120) -> tuple[int, dict, Any]:
    """(status, headers, parsed body) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read().decode()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw) if raw.startswith("{") else raw
    finally:
        conn.close()


def _complete(port: int, body: dict) -> tuple[int, dict, Any]:
    return _request(port, "POST", "/v1/completions", body)


def _health(port: int) -> tuple[int, dict]:
    status, _, body = _request(port, "GET", "/health", timeout=60)
    return status, body


def _next_event(response: http.client.HTTPResponse) -> str:
    """The next server-sent event's data (the response is chunked: read through http.client)."""
    while not (line := response.readline().decode().strip()):
        pass
    return line.removeprefix("data: ")


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from octoray.modeling import build_demo_model

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO_ROOT / "octoray").rglob("*.py"))]
    return build_demo_model(tmp_path_factory.mktemp("limits") / "model", texts, n_positions=2048)


@pytest.fixture(scope="module")
def server(model_dir: Path, ray_local, tmp_path_factory: pytest.TempPathFactory):
    """``octoray serve MODEL`` with a tiny queue; yields (port, process, log)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("limits-log") / "serve.log"
    with serve_process(model_dir, port, ray_local.get_runtime_context().gcs_address, log,
                       lambda: _request(port, "GET", "/v1/models", timeout=5)[0] == 200,
                       ("max_batch_size=4", "max_ongoing_requests=4", "max_queued_requests=4"),
                       env=dict(os.environ)) as proc:
        yield port, proc, log


def _greedy_alone(model_dir: Path, prompt: str, max_tokens: int) -> str:
    from octoray.modeling import load_model, load_tokenizer
    from octoray.serving.decoding import BatchDecoder, Sequence

    decoder = BatchDecoder(load_model(str(model_dir)).eval(), load_tokenizer(str(model_dir)))
    seq = Sequence(prompt_ids=decoder.tokenizer(prompt)["input_ids"], max_tokens=max_tokens, temperature=0.0)
    decoder.generate([seq])
    return seq.text


@pytest.mark.ray
def test_short_request_finishes_while_a_long_one_runs(server: Any, model_dir: Path) -> None:
    """A long streamed completion is running; a short one sent meanwhile joins the batch at the next
    step and is answered first, and both are token for token what the model gives alone."""
    port = server[0]
    assert _health(port)[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"prompt": LONG_PROMPT, "max_tokens": 256, "temperature": 0, "stream": True}))
    response = conn.getresponse()
    long_text = [json.loads(_next_event(response))["choices"][0]["text"]]
    status, _, short = _complete(port, {"prompt": SHORT_PROMPT, "max_tokens": 8, "temperature": 0})
    long_running = _health(port)[1]["stats"]["running"]
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: {"):
            long_text.append(json.loads(line.removeprefix("data: "))["choices"][0]["text"])
    conn.close()
    assert status == 200 and short["usage"]["completion_tokens"] == 8
    assert long_running == 1, "the long request should still have been decoding"
    assert short["choices"][0]["text"] == _greedy_alone(model_dir, SHORT_PROMPT, 8)
    assert "".join(long_text) == _greedy_alone(model_dir, LONG_PROMPT, 256)


@pytest.mark.ray
def test_streamed_pieces_are_written_together(server: Any, model_dir: Path) -> None:
    """At the default ``stream_interval_s`` (0.05 s) a long stream's pieces reach the client in far
    fewer writes (HTTP chunks) than events, and the events are still one per piece: the text is
    what the model gives alone."""
    port = server[0]
    body = json.dumps({"prompt": LONG_PROMPT, "max_tokens": 256, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        while data := sock.recv(65536):
            raw += data
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"chunked" in head.lower(), head
    chunks = []
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        chunks.append(rest[:n])
        rest = rest[n + 2:]
    events = [line.removeprefix(b"data: ") for c in chunks for line in c.split(b"\n\n") if line.startswith(b"data: {")]
    texts = [json.loads(e)["choices"][0]["text"] for e in events]
    assert "".join(texts) == _greedy_alone(model_dir, LONG_PROMPT, 256)
    assert len(events) > 100  # one per piece (a piece is a token, unless one waits for the next)
    assert len([c for c in chunks if b"data: {" in c]) < len(events) / 3


@pytest.mark.ray
def test_burst_past_the_queue_gets_429_and_the_admitted_complete(server: Any) -> None:
    port = server[0]
    bodies = [{"prompt": SHORT_PROMPT, "max_tokens": 48, "temperature": 0.8, "seed": i} for i in range(24)]

    def send(body: dict) -> tuple[int, dict, Any, float]:
        started = time.monotonic()
        return (*_complete(port, body), time.monotonic() - started)

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        answers = list(pool.map(send, bodies))
    refused = [a for a in answers if a[0] == 429]
    served = [a for a in answers if a[0] == 200]
    assert len(refused) + len(served) == len(answers), [a[:3] for a in answers if a[0] not in (200, 429)]
    assert refused and len(served) >= 8  # 4 decoding + 4 queued, at least
    for _, headers, body, _ in refused:
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["code"] == "rate_limit_exceeded" and set(body["error"]) == {"message", "type", "param", "code"}
    assert min(a[3] for a in refused) < min(a[3] for a in served)  # refused at once, not after queueing
    for _, _, body, _ in served:
        assert body["usage"]["completion_tokens"] == 48 or body["choices"][0]["finish_reason"] == "stop"
    assert _health(port)[1]["stats"]["rejected"] >= len(refused)


@pytest.mark.ray
def test_metrics_reach_prometheus(server: Any, ray_local) -> None:
    """The replica's metrics, as Prometheus scrapes them from the node's Ray metrics endpoint."""
    import urllib.request

    metrics_port = ray_local._private.worker.global_worker.node.metrics_export_port
    assert _complete(server[0], {"prompt": SHORT_PROMPT, "max_tokens": 6})[0] == 200
    wanted = ["ray_octoray_serve_time_to_first_token_seconds_bucket", "ray_octoray_serve_inter_token_latency_seconds_count",
              "ray_octoray_serve_prompt_tokens", "ray_octoray_serve_generation_tokens",
              "ray_octoray_serve_running_requests", "ray_octoray_serve_queued_requests"]
    text = ""

    def scraped() -> bool:
        nonlocal text
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return all(name in text for name in wanted)

    _wait_for(scraped, 90, f"every serving metric on :{metrics_port}/metrics")
    tokens = [line for line in text.splitlines() if line.startswith("ray_octoray_serve_generation_tokens_total{")]
    assert tokens and 'replica="' in tokens[0] and float(tokens[0].rsplit(" ", 1)[1]) >= 6


@pytest.mark.ray
def test_client_that_disconnects_frees_its_rows(server: Any) -> None:
    port = server[0]
    before = _health(port)[1]["stats"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"prompt": LONG_PROMPT, "max_tokens": 1900, "temperature": 0, "stream": True,
                                  "n": 2}))
    response = conn.getresponse()
    assert response.status == 200 and _next_event(response).startswith("{")
    assert _health(port)[1]["stats"]["running"] == 2
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait_for(lambda: _health(port)[1]["stats"]["running"] == 0, 30, "the rows to be freed")
    after = _health(port)[1]["stats"]
    assert after["completion_tokens"] - before["completion_tokens"] < 2 * 1900
    # not streamed: Serve cancels the request when its connection closes
    before = after
    with socket.create_connection(("127.0.0.1", port)) as sock:
        body = json.dumps({"prompt": LONG_PROMPT, "max_tokens": 1900, "temperature": 0}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _wait_for(lambda: _health(port)[1]["stats"]["running"] == 1, 30, "the request to start")
    _wait_for(lambda: _health(port)[1]["stats"]["running"] == 0, 30, "the rows to be freed")
    assert _health(port)[1]["stats"]["completion_tokens"] - before["completion_tokens"] < 1900
    status, _, body = _complete(port, {"prompt": SHORT_PROMPT, "max_tokens": 4})
    assert status == 200


@pytest.mark.ray
def test_ctrl_c_stops_the_server(server: Any) -> None:
    """Last of the subprocess tests: Serve is one per cluster, the in-process ones follow."""
    _, proc, log = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


@pytest.mark.ray
def test_timeout_and_a_broken_model_failing_health(model_dir: Path, ray_local, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from octoray.serving import app as serving
    from octoray.serving.config import ServeConfig

    port = _free_port()
    serving.start(ServeConfig(model=str(model_dir), port=port, request_timeout_s=1.0, app_name="limits"))
    try:
        started = time.monotonic()
        status, _, body = _complete(port, {"prompt": LONG_PROMPT, "max_tokens": 1900, "temperature": 0, "n": 4})
        assert status == 504 and body["error"]["code"] == "timeout", body
        assert time.monotonic() - started < 30
        _wait_for(lambda: _health(port)[1]["stats"]["running"] == 0, 30, "the timed-out rows to be freed")
        assert _health(port)[0] == 200
        # the same model with every weight NaN: it loads, but cannot decode
        broken = tmp_path / "broken"
        shutil.copytree(model_dir, broken)
        [weights] = broken.glob("*.safetensors")
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights,
                  metadata={"format": "pt"})
        serving.start(ServeConfig(model=str(broken), port=port, app_name="limits"))  # redeployed in place
        _wait_for(lambda: _request(port, "GET", "/v1/models")[2]["data"][0]["id"] == str(broken), 120,
                  "the broken model to be deployed")
        status, body = _health(port)
        assert status == 503 and body["status"] == "error" and body["error"]["code"] == "unhealthy", body
        assert _request(port, "GET", "/healthz")[0] == 503
        status, _, body = _complete(port, {"prompt": SHORT_PROMPT, "max_tokens": 4})
        assert status == 500 and body["error"]["type"] == "server_error"
    finally:
        serving.shutdown()
