"""``octoray serve``: request validation and the batched decoder (fast), then one real server.

The ``ray`` tests share one server: ``octoray serve`` run as a user would, in a subprocess, on
the session's local Ray, hosting a tiny GPTBigCode saved to disk. It is queried with the
``openai`` client and raw HTTP, evaluated on a HumanEvalPack slice by ``octoray eval
--endpoint``, and finally stopped with Ctrl-C (SIGINT), which must shut it down cleanly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from octoray.config import ConfigError, load_config
from octoray.serving.app import ServeConfig
from octoray.serving.protocol import APIError, parse_completion_request
from tests.helpers import REPO_ROOT, run_cli
from tests.helpers.serve_process import serve_process

# ------------------------------------------------------------------ request validation (fast)

def _parse(body: Any, **kwargs: Any):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_completion_request(raw, **kwargs)


def test_defaults_follow_openai() -> None:
    params = _parse({"model": "m", "prompt": "def f():"})
    assert params.prompts == ("def f():",)
    assert (params.max_tokens, params.temperature, params.top_p, params.n) == (16, 1.0, 1.0, 1)
    assert params.stop == () and params.seed is None and not params.stream
    params = _parse({"prompt": ["a", "b"], "stop": "\n", "n": 2, "stream": True,
                     "stream_options": {"include_usage": True}, "temperature": 0, "logprobs": None})
    assert params.prompts == ("a", "b") and params.stop == ("\n",) and params.include_usage


#: (body, param the error must name, code)
BAD_REQUESTS = [
    (b"{not json", None, "invalid_json"),
    (b"", None, "invalid_json"),
    ([1, 2], None, "invalid_json"),
    ({"max_tokens": 5}, "prompt", "missing_required_parameter"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": []}, "prompt", "invalid_value"),
    ({"prompt": ["ok", ""]}, "prompt", "invalid_value"),
    ({"prompt": 42}, "prompt", "invalid_type"),
    ({"prompt": [[1, 2], "x"]}, "prompt", "invalid_type"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens", "invalid_type"),
    ({"prompt": "x", "max_tokens": 8.5}, "max_tokens", "invalid_type"),
    ({"prompt": "x", "temperature": -0.1}, "temperature", "invalid_value"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "invalid_type"),
    ({"prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "invalid_value"),
    ({"prompt": "x", "n": 0}, "n", "invalid_value"),
    ({"prompt": "x", "n": True}, "n", "invalid_type"),
    ({"prompt": "x", "n": 1000}, "n", "invalid_value"),
    ({"prompt": ["x"] * 100, "n": 2}, "n", "invalid_value"),
    ({"prompt": "x", "stop": [""]}, "stop", "invalid_value"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop", "invalid_value"),
    ({"prompt": "x", "stop": 3}, "stop", "invalid_type"),
    ({"prompt": "x", "seed": "1"}, "seed", "invalid_type"),
    ({"prompt": "x", "stream": "yes"}, "stream", "invalid_type"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
    ({"prompt": "x", "logprobs": 6}, "logprobs", "invalid_value"),
    ({"prompt": "x", "echo": "yes"}, "echo", "invalid_type"),
    ({"prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter"),
]


@pytest.mark.parametrize("body,param,code", BAD_REQUESTS, ids=[str(b)[:40] for b, _, _ in BAD_REQUESTS])
def test_bad_request_names_the_field(body: Any, param: str | None, code: str) -> None:
    with pytest.raises(APIError) as info:
        _parse(body)
    err = info.value.body()["error"]
    assert info.value.status == 400
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert err["message"] and "\n" not in err["message"]


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ServeConfig, None, ["port=0", "max_batch_size=64", "max_ongoing_requests=8", "min_replicas=3"],
                    values={"model": "m"})
    message = str(info.value)
    for needle in ("port", "max_ongoing_requests (8) must be >= max_batch_size", "min_replicas"):
        assert needle in message


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    for args, needle in ((("m", "max_batchsize=4"), "did you mean 'max_batch_size'"),
                         ((str(tmp_path / "no-such-model"),), "no such model directory, and not a hub id")):
        result = run_cli("serve", *args, "--port", str(_free_port()))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("octoray serve: error:") and needle in lines[0], result.stderr


# ------------------------------------------------------------------ the batched decoder (torch, no Ray)

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPTBigCode with a BPE tokenizer trained on octoray's own code."""
    from octoray.modeling import build_demo_model

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO_ROOT / "octoray").rglob("*.py"))]
    return build_demo_model(tmp_path_factory.mktemp("serve") / "model", texts, n_positions=2048)


@pytest.fixture(scope="module")
def decoder(model_dir: Path):
    from octoray.modeling import load_model, load_tokenizer
    from octoray.serving.decoding import BatchDecoder

    return BatchDecoder(load_model(str(model_dir)).eval(), load_tokenizer(str(model_dir)))


def _seq(decoder, prompt: str, max_tokens: int = 12, **kwargs: Any):
    from octoray.serving.decoding import Sequence

    return Sequence(prompt_ids=decoder.tokenizer(prompt)["input_ids"], max_tokens=max_tokens, **kwargs)


PROMPTS = ["def add(a, b):", "import os\nclass Config:\n    def __init__(self, path):\n        self.path =",
           "for i in range(10):"]


def test_batch_decodes_like_one_at_a_time(decoder) -> None:
    alone = []
    for prompt in PROMPTS:
        seq = _seq(decoder, prompt, temperature=0.0)
        decoder.generate([seq])
        alone.append(seq)
    # left padding, per-row lengths and early-finishing rows must not change any row's tokens
    together = [_seq(decoder, p, temperature=0.0, max_tokens=m) for p, m in zip(PROMPTS, (12, 5, 12))]
    decoder.generate(together)
    assert together[0].token_ids == alone[0].token_ids and together[2].token_ids == alone[2].token_ids
    assert together[1].token_ids == alone[1].token_ids[:5]
    for seq in together:
        assert seq.finish_reason in ("length", "stop") and seq.generated <= seq.max_tokens
        assert seq.text == decoder.decode(seq.token_ids)


def test_seed_reproduces_in_any_batch_and_top_p_narrows(decoder) -> None:
    alone = _seq(decoder, PROMPTS[0], temperature=1.0, seed=7, max_tokens=16)
    decoder.generate([alone])
    mixed = [_seq(decoder, PROMPTS[1], temperature=0.0), _seq(decoder, PROMPTS[0], temperature=1.0, seed=7,
                                                               max_tokens=16),
             _seq(decoder, PROMPTS[2], temperature=0.7, top_p=0.5, seed=1)]
    decoder.generate(mixed)
    assert mixed[1].token_ids == alone.token_ids
    other = _seq(decoder, PROMPTS[0], temperature=1.0, seed=8, max_tokens=16)
    decoder.generate([other])
    assert other.token_ids != alone.token_ids
    # a nucleus this small keeps only the most likely token: sampling becomes greedy
    greedy, nucleus = _seq(decoder, PROMPTS[0], temperature=0.0), _seq(decoder, PROMPTS[0], top_p=1e-6, seed=3)
    decoder.generate([greedy, nucleus])
    assert nucleus.token_ids == greedy.token_ids


def _stop_inside(text: str) -> tuple[str, str]:
    """A 3-character stop string taken from the middle of ``text``, and the text before it."""
    for start in range(len(text) // 2, len(text) - 3):
        stop = text[start:start + 3]
        if text.find(stop) > 0 and "\ufffd" not in stop:
            return stop, text[:text.find(stop)]
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_string_cut_and_never_streamed(decoder) -> None:
    full = _seq(decoder, PROMPTS[1], temperature=1.0, seed=11, max_tokens=40)
    decoder.generate([full])
    stop, expected = _stop_inside(full.text)
    queue: asyncio.Queue = asyncio.Queue()
    cut = _seq(decoder, PROMPTS[1], temperature=1.0, seed=11, max_tokens=40, stop=("\n\n\n\n", stop), queue=queue)
    decoder.generate([cut])
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    pieces = [queue.get_nowait() for _ in range(queue.qsize())]
    assert "".join(text for _, text, _ in pieces) == expected
    assert all(stop not in text for _, text, _ in pieces)
    assert [reason for _, _, reason in pieces][-1] == "stop" and all(r is None for _, _, r in pieces[:-1])


# ------------------------------------------------------------------ one real server (Ray Serve)

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(method: str, url: str, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode()
    return status, json.loads(text) if text.startswith("{") else text


class Server:
    """The ``octoray serve`` subprocess under test."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path, model: str) -> None:
        self.url, self.proc, self.log, self.model = url, proc, log, model

    def post(self, body: Any) -> tuple[int, Any]:
        return _http("POST", f"{self.url}/completions", body)

    def stats(self) -> dict[str, int]:
        return _http("GET", self.url.removesuffix("/v1") + "/healthz")[1]["stats"]


@pytest.fixture(scope="module")
def server(model_dir: Path, ray_local, tmp_path_factory: pytest.TempPathFactory):
    """``octoray serve MODEL --port P`` on the session's Ray (ray_address=), until Ctrl-C."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    url = f"http://127.0.0.1:{port}/v1"
    with serve_process(model_dir, port, ray_local.get_runtime_context().gcs_address, log,
                       lambda: _http("GET", f"{url}/models", timeout=5)[0] == 200,
                       ("max_batch_size=16", "batch_wait_timeout_s=0.02"), env=dict(os.environ)) as proc:
        yield Server(url, proc, log, str(model_dir))


@pytest.mark.ray
def test_openai_client_and_models(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    [model] = client.models.list().data
    assert model.id == server.model
    result = client.completions.create(model=model.id, prompt="def add(a, b):", max_tokens=8, temperature=0)
    choice = result.choices[0]
    assert result.object == "text_completion" and choice.index == 0 and choice.finish_reason in ("length", "stop")
    assert 0 < result.usage.completion_tokens <= 8 and result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    # streaming (greedy) gives the same text, in pieces, closed by a finish_reason
    chunks = list(client.completions.create(model=model.id, prompt="def add(a, b):", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


@pytest.mark.ray
def test_list_prompts_n_and_raw_stream(server: Server) -> None:
    status, body = server.post({"prompt": ["def f(x):", "class A:"], "n": 3, "max_tokens": 6, "seed": 1})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert len({c["text"] for c in body["choices"][:3]}) > 1  # n samples of one prompt differ
    assert body["usage"]["completion_tokens"] <= 36
    status, text = server.post({"prompt": "x = ", "max_tokens": 5, "stream": True,
                                "stream_options": {"include_usage": True}})
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.ray
def test_stop_sequences_honoured(server: Server) -> None:
    request = {"prompt": PROMPTS[1], "max_tokens": 40, "temperature": 1.0, "seed": 5}
    full = server.post(request)[1]["choices"][0]["text"]
    stop, expected = _stop_inside(full)
    status, body = server.post({**request, "stop": [stop, "@@@"]})
    assert status == 200
    assert body["choices"][0]["text"] == expected and body["choices"][0]["finish_reason"] == "stop"
    status, text = server.post({**request, "stop": stop, "stream": True})
    pieces = [json.loads(e.removeprefix("data: "))["choices"][0] for e in text.split("\n\n")[:-2] if e]
    assert "".join(p["text"] for p in pieces) == expected and all(stop not in p["text"] for p in pieces)
    assert pieces[-1]["finish_reason"] == "stop"


@pytest.mark.ray
def test_mixed_settings_batched_like_alone(server: Server) -> None:
    """Concurrent requests with different sampling settings share batches, yet each gets exactly
    what it gets alone (seeded sampling is reproducible in any batch)."""
    bodies = [{"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0},
              {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0.9, "seed": 42},
              {"prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0.7, "top_p": 0.5, "seed": 1},
              {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.5, "seed": 42, "n": 2},
              {"prompt": PROMPTS[2], "max_tokens": 9, "temperature": 0.9, "seed": 42, "stop": ["\n"]},
              {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0.9, "seed": 43}] * 2
    before = server.stats()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        together = [r[1]["choices"] for r in pool.map(server.post, bodies)]
    after = server.stats()
    assert after["batches"] - before["batches"] < len(bodies)  # some requests did share a batch
    alone = [server.post(body)[1]["choices"] for body in bodies[:6]]
    assert together[:6] == alone and together[6:] == alone
    assert alone[1][0]["text"] != alone[5][0]["text"]  # another seed, another sample
    assert alone[3][0]["text"] != alone[3][1]["text"]  # n samples differ


@pytest.mark.ray
def test_bad_requests_get_4xx_and_server_stays_healthy(server: Server) -> None:
    for body, param, code in BAD_REQUESTS[::3]:
        status, answer = server.post(body)
        assert status == 400 and answer["error"]["param"] == param and answer["error"]["code"] == code, answer
    cases = [
        ("POST", "/completions", {"prompt": "hi " * 3000, "max_tokens": 4}, 400, "context_length_exceeded"),
        ("POST", "/completions", {"prompt": "hi", "max_tokens": 10 ** 12}, 400, "context_length_exceeded"),
        ("POST", "/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model_not_found"),
        ("GET", "/completions", None, 405, "method_not_allowed"),
        ("POST", "/chat/nothing", {}, 404, "not_found"),
    ]
    for method, path, body, want, code in cases:
        status, answer = _http(method, server.url + path, body)
        assert status == want and answer["error"]["code"] == code, answer
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    status, body = server.post({"prompt": "def ok():", "max_tokens": 3})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert "Traceback" not in server.log.read_text()


@pytest.mark.ray
@pytest.mark.toolchain
def test_humanevalpack_slice_through_the_endpoint(server: Server, shared_dir: Path, tmp_path: Path,
                                                  ray_local) -> None:
    import pyarrow.parquet as pq

    before = server.stats()["sequences"]
    out = tmp_path / "eval"
    result = run_cli("eval", "--endpoint", server.url, "--tasks", "synthesize", "--languages", "python",
                     "--limit", "2", "--data-dir", shared_dir / "humanevalpack", "--allow-code-execution",
                     "--out", out, "--n-samples", "1", "temperature=0", "max_new_tokens=24", "num_actors=1",
                     f"ray_address={ray_local.get_runtime_context().gcs_address}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "synthesize" in json.dumps(metrics) and "python" in json.dumps(metrics)
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert [s["task_id"] for s in samples] == ["Python/0", "Python/1"]
    assert server.stats()["sequences"] - before == 2
    # the samples are what this server generates: greedy, so asking again gives the same text
    from octoray.evaluation.humanevalpack import stop_sequences

    for sample in samples:
        status, body = server.post({"prompt": sample["prompt"], "max_tokens": 24, "temperature": 0,
                                    "stop": list(stop_sequences("python"))})
        assert status == 200 and body["choices"][0]["text"] == sample["completion"]


@pytest.mark.ray
def test_ctrl_c_shuts_down_cleanly(server: Server) -> None:
    """Last test of the module: it stops the shared server."""
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=90) == 0, server.log.read_text()[-3000:]
    log = server.log.read_text()
    assert "shutting down" in log and "Traceback" not in log
    with pytest.raises(OSError):
        _http("GET", f"{server.url}/models", timeout=5)


# ------------------------------------------------------------------ start() in-process (after the shared server)

@pytest.mark.ray
def test_start_checks_the_model_once(model_dir: Path, ray_local, monkeypatch: pytest.MonkeyPatch) -> None:
    """``start`` resolves the model (tokenizer + config, or a download for a URI) once, not once more
    while building the app. Runs after ``test_ctrl_c_shuts_down_cleanly``: Serve is one per
    cluster, so an in-process ``start`` must not run beside the shared server."""
    from octoray import modeling
    from octoray.serving import app as serving
    checked: list[str] = []
    real = modeling.preflight_model

    def counting(name_or_path: str) -> Any:
        checked.append(name_or_path)
        return real(name_or_path)

    monkeypatch.setattr(modeling, "preflight_model", counting)
    url = serving.start(ServeConfig(model=str(model_dir), port=_free_port(), max_batch_size=4,
                                    max_ongoing_requests=8, app_name="start-once"))
    try:
        assert checked == [str(model_dir)]
        status, body = _http("POST", f"{url}/completions", {"prompt": "def f():", "max_tokens": 3})
        assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        serving.shutdown()
    assert ray_local.is_initialized()  # start() joined the session's Ray, so shutdown() leaves it running
