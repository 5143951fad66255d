"""``octoray eval``: CLI refusals and bad input (fast), the endpoint generator against a local
HTTP server (fast), and oracle / resume / hf runs through Ray actors and real toolchains."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from octoray.errors import UserError
from octoray.evaluation import generators
from octoray.evaluation import humanevalpack as hep
from tests.helpers import run_cli

ALL_LANGUAGES = ",".join(hep.LANGUAGES)


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("octoray eval: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


# ------------------------------------------------------------------ fast CLI checks

def test_refuses_without_allow_code_execution(tmp_path, shared_dir) -> None:
    result = run_cli("eval", "--generator", "oracle:canonical", "--data-dir", shared_dir / "humanevalpack",
                     "--out", tmp_path / "out")
    _one_line_error(result, "--allow-code-execution")
    assert not (tmp_path / "out").exists()


def test_unknown_language_and_task_listed_together(tmp_path) -> None:
    result = run_cli("eval", "--generator", "oracle:canonical", "--languages", "python,cobol",
                     "--tasks", "fix,debug", "--allow-code-execution", "--out", tmp_path / "o")
    _one_line_error(result, "'cobol'", "'debug'")


def test_bad_generator_and_key(tmp_path) -> None:
    _one_line_error(run_cli("eval", "--generator", "gpt:4", "--allow-code-execution"), "bad --generator 'gpt:4'")
    _one_line_error(run_cli("eval", "--generator", "oracle:canonical", "n_sample=3", "--allow-code-execution"),
                    "did you mean 'n_samples'")


def test_missing_model_is_one_line_before_any_work(tmp_path) -> None:
    for model in ("/nonexistent", "runs/no/such/model"):
        result = run_cli("eval", "--generator", f"hf:{model}", "--allow-code-execution",
                         "--out", tmp_path / "eval")
        _one_line_error(result, f"model '{model}': no such model directory, and not a hub id")
    assert not (tmp_path / "eval").exists()


def test_missing_model_names_the_model_directories_that_exist(tmp_path) -> None:
    model = tmp_path / "runs" / "demo" / "train" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    result = run_cli("eval", "--generator", "hf:runs/demo/model", "--allow-code-execution", cwd=tmp_path)
    _one_line_error(result, "model 'runs/demo/model': no such model directory",
                    "model directories under runs/: runs/demo/train/model")
    result = run_cli("eval", "--generator", "hf:runs/demo/model", "--allow-code-execution", cwd=tmp_path / "runs")
    _one_line_error(result, "octoray train writes RUN_DIR/model (make demo: runs/demo/train/model)")


def test_unreachable_hub_is_one_fast_line_naming_humanevalpack_dir(tmp_path) -> None:
    """No network (here: an HF_ENDPOINT whose port nothing listens on, and one that does not
    resolve): one line in seconds, not the hub client's ~25 s of retries."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    for endpoint, reason in ((f"http://127.0.0.1:{closed}", f"127.0.0.1:{closed} cannot be reached"),
                             ("https://no-such-host.invalid", "no-such-host.invalid does not resolve")):
        started = time.monotonic()
        result = run_cli("eval", "--generator", "oracle:canonical", "--allow-code-execution", "--out", tmp_path / "o",
                         env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                              "HF_HOME": str(tmp_path / "hf")})
        _one_line_error(result, "cannot load bigcode/humanevalpack from the hub", reason,
                        "--humanevalpack-dir DIR", "../shared/humanevalpack")
        assert "--data-dir" not in result.stderr
        assert time.monotonic() - started < 20  # Python + imports; the retries alone took ~25 s


def test_endpoint_alias_and_generator_last_one_wins() -> None:
    from octoray import stage_cli
    from octoray.evaluation import stage
    def generator(*words: str) -> str:
        return stage_cli.parse("eval", words, stage).configs[0].generator

    assert generator("--endpoint", "http://127.0.0.1:9/v1", "--generator", "oracle:canonical") == "oracle:canonical"
    assert generator("--generator", "oracle:canonical", "--endpoint", "http://h:9/v1") == "endpoint:http://h:9/v1"


def test_file_generator_bad_row_names_its_line(tmp_path, shared_dir) -> None:
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "Python/0", "task": "fix", "completion": "\n    return 1"})
                       + "\n" + json.dumps({"task_id": "Python/1", "task": "fix"}) + "\n")
    result = run_cli("eval", "--generator", f"file:{samples}", "--languages", "python",
                     "--data-dir", shared_dir / "humanevalpack", "--allow-code-execution", "--out", tmp_path / "o")
    _one_line_error(result, "samples.jsonl:2:", "'completion' must be a string")


@pytest.mark.parametrize("line, message", [
    ("{not json", ":1: not valid JSON"),
    ('["Python/0"]', ":1: expected an object"),
    ('{"task_id": "Python/0", "task": "debug", "completion": ""}', ":1: unknown task 'debug'"),
    ('{"task_id": "Kotlin/0", "task": "fix", "completion": ""}', ":1: task_id 'Kotlin/0' is not"),
    ('{"task_id": "Python/999", "task": "fix", "completion": ""}', ":1: no problem 'Python/999'"),
])
def test_file_generator_rejects(tmp_path, shared_dir, line: str, message: str) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(line + "\n")
    problems = {"python": hep.load_problems("python", shared_dir / "humanevalpack")}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        generators.file_samples(path, problems, problems, hep.TASKS, "octocoder")


def test_file_generator_numbers_samples_and_cuts_code(tmp_path, shared_dir) -> None:
    problems = {"python": hep.load_problems("python", shared_dir / "humanevalpack")}
    p0 = problems["python"][0]
    rows = [{"task_id": "Python/0", "task": "synthesize", "completion": "\n    return True\n\nprint(1)"},
            {"task_id": "Python/0", "task": "synthesize", "completion": p0["prompt"] + "    return False\n"},
            {"task_id": "JavaScript/0", "task": "fix", "completion": "x"},  # language not selected
            {"task_id": "Python/0", "task": "fix", "completion": "\n    return 0"}]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = generators.file_samples(path, {"python": problems["python"][:1]}, problems, ("synthesize",), "octocoder")
    assert [(r["task"], r["sample_idx"]) for r in out] == [("synthesize", 0), ("synthesize", 1)]
    assert out[0]["code"].rstrip() == p0["prompt"].rstrip() + "\n    return True"
    assert out[1]["code"] == p0["prompt"].rstrip() + "\n    return False"  # echoed prompt tolerated
    assert out[0]["prompt"] == hep.synthesize_prompt(p0, "python")


def test_yaml_eval_section_and_overrides(tmp_path) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text("train:\n  lr: 1.0\neval:\n  generator: oracle:canonical\n  languages: [python, cobol]\n")
    _one_line_error(run_cli("eval", config, "--allow-code-execution"), "'cobol'")
    _one_line_error(run_cli("eval", config, "languages=go", "template=continue", "--allow-code-execution"),
                    "'continue' only fits --tasks synthesize")


def test_eval_modules_import_light() -> None:
    import subprocess
    import sys

    code = ("import sys, octoray.evaluation.stage, octoray.evaluation.generators, octoray.evaluation.runner; "
            "print([m for m in ('torch', 'transformers', 'deepspeed', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ endpoint generator, real HTTP

class _CannedServer:
    """A tiny OpenAI-compatible /v1/completions server: answers each prompt with the canonical
    body of the problem whose function start ends the prompt; can fail the first requests."""

    def __init__(self, problems: list[dict], fail_first: int = 0, max_choices: int = 100) -> None:
        self.requests: list[dict] = []
        self.failures_left = fail_first
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"data": [{"id": "canned"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if server.failures_left > 0:
                    server.failures_left -= 1
                    return self._send(503, {"error": "warming up"})
                text = next(("\n" + p["canonical_solution"] + "\n\ndef extra():\n    pass\n" for p in problems
                             if body["prompt"].endswith(p["prompt"].strip())), "A description.")
                n = min(body.get("n", 1), max_choices)
                self._send(200, {"choices": [{"index": i, "text": text} for i in range(n)]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def _endpoint_cfg(**kw):
    base = dict(endpoint_model="", concurrency=4, retries=3, request_timeout_s=10.0, max_new_tokens=64,
                temperature=0.2, top_p=0.95)
    return SimpleNamespace(**{**base, **kw})


def test_endpoint_generator_retries_and_fills_n(shared_dir) -> None:
    problems = hep.load_problems("python", shared_dir / "humanevalpack")[:2]
    server = _CannedServer(problems, fail_first=2, max_choices=2)  # server caps n at 2
    try:
        backend = generators.endpoint_backend(server.url, _endpoint_cfg())
        rows = generators.model_samples(backend, {"python": problems}, ("synthesize",), 3, "octocoder")
    finally:
        server.close()
    assert len(rows) == 6 and sorted({r["sample_idx"] for r in rows}) == [0, 1, 2]
    for row in rows:
        p = problems[int(row["task_id"].split("/")[1])]
        assert row["code"].rstrip() == p["prompt"].rstrip() + "\n" + p["canonical_solution"].rstrip()
    sent = server.requests[-1]
    assert sent["model"] == "canned" and sent["temperature"] == 0.2 and "\ndef" in sent["stop"]


def test_endpoint_generator_gives_up_with_one_line(shared_dir) -> None:
    problems = hep.load_problems("go", shared_dir / "humanevalpack")[:1]
    server = _CannedServer(problems, fail_first=100)
    try:
        backend = generators.endpoint_backend(server.url, _endpoint_cfg(retries=1, endpoint_model="m"))
        with pytest.raises(UserError, match=r"failed after 2 tries \(last: HTTP 503\)"):
            backend([generators.Request("x", 1, ())])
    finally:
        server.close()


# ------------------------------------------------------------------ Ray actors + real toolchains
# Execution timeouts are scaled up: the test machine is shared, and a cold Go build cache per
# sandbox process can take longer than Go's 20 s budget under load.
SCALE = "timeout_scale=5"


def _read(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _unexpected(out: Path, expected: str) -> list[str]:
    """Results whose status is not ``expected``, with their output tail (the failure message)."""
    return [f"{r['task']} {r['task_id']} {r['status']}: {r['stderr_tail'][-300:]}"
            for r in _read(out / "results.parquet") if r["status"] != expected]


def _run_in_process(out: Path, data_dir: Path, *extra: str, **values):
    """``octoray eval`` in this process (reusing the session's Ray instead of starting one)."""
    from octoray.config import load_config
    from octoray.evaluation.stage import STAGE, EvalConfig, run

    base = {"humanevalpack_dir": str(data_dir), "out": str(out), "allow_code_execution": True}
    return run(load_config(EvalConfig, None, [SCALE, *extra], section=STAGE, values={**base, **values}))


@pytest.fixture(scope="module")
def canonical_out(ray_local, tmp_path_factory, shared_dir) -> Path:
    """The CLI as a user runs it, attached to the session's Ray (``ray_address``) rather than
    starting a second local cluster on the 2 shared cores."""
    out = tmp_path_factory.mktemp("eval") / "canonical"
    address = ray_local.get_runtime_context().gcs_address
    result = run_cli("eval", "--generator", "oracle:canonical", "--tasks", "fix,synthesize",
                     "--languages", ALL_LANGUAGES, "--data-dir", shared_dir / "humanevalpack",
                     "--allow-code-execution", "--out", out, "--limit", "3", SCALE, f"ray_address={address}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| fix | 100.0 |" in result.stdout  # the table is printed
    return out


@pytest.mark.ray
@pytest.mark.toolchain
def test_oracle_canonical_passes_everywhere(canonical_out: Path) -> None:
    from octoray.storage.stage_dirs import is_complete

    assert _unexpected(canonical_out, "pass") == []
    metrics = json.loads((canonical_out / "metrics.json").read_text())
    assert list(metrics) == ["fix", "synthesize"]
    for task, per_language in metrics.items():
        assert list(per_language) == list(hep.LANGUAGES)
        for lang, cell in per_language.items():
            assert cell == {"pass@1": 1.0, "pass@10": None, "n_problems": 3, "n_samples": 3}, (task, lang)
    results = _read(canonical_out / "results.parquet")
    assert len(results) == 36 and {r["status"] for r in results} == {"pass"}
    assert set(results[0]) == {"task_id", "language", "task", "sample_idx", "status", "stderr_tail", "duration_s"}
    samples = _read(canonical_out / "samples.parquet")
    assert {"task_id", "language", "task", "sample_idx", "prompt", "completion"} <= set(samples[0])
    assert is_complete(canonical_out, "eval") and (canonical_out / "config.yaml").is_file()
    assert not (canonical_out / "results.parts").exists()  # consolidated


@pytest.mark.ray
@pytest.mark.toolchain
def test_oracle_buggy_fix_fails_everywhere(ray_local, tmp_path, shared_dir) -> None:
    out = _run_in_process(tmp_path / "buggy", shared_dir / "humanevalpack", generator="oracle:buggy",
                          tasks="fix", languages=ALL_LANGUAGES, limit=3)
    assert [line for line in _unexpected(out, "fail") if " timeout:" not in line] == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert {lang: cell["pass@1"] for lang, cell in metrics["fix"].items()} == {lang: 0.0 for lang in hep.LANGUAGES}
    statuses = {r["status"] for r in _read(out / "results.parquet")}
    assert "pass" not in statuses and "error" not in statuses  # failures of the code, not of the harness


@pytest.mark.ray
@pytest.mark.toolchain
def test_incomplete_toolchain_is_one_line_before_any_work(tmp_path, shared_dir) -> None:
    """A machine whose Rust crates lack regex's default features (no ``librust-regex+default-dev``):
    one line naming the language and the package, and nothing generated or executed. Its own
    embedded Ray, so that the probe's workers see the registry this test points at."""
    from tests.helpers.toolchains import registry_without

    out = tmp_path / "eval"
    result = run_cli("eval", "--generator", "oracle:canonical", "--languages", "python,rust",
                     "--data-dir", shared_dir / "humanevalpack", "--allow-code-execution",
                     "--out", out, "--limit", "1",
                     env={"OCTORAY_CARGO_REGISTRY": str(registry_without(tmp_path, "aho-corasick"))})
    _one_line_error(result, "cannot execute rust samples", "aho-corasick", "librust-regex+default-dev")
    assert not out.exists()


@pytest.mark.ray
@pytest.mark.toolchain
def test_rerun_resumes_without_re_executing(ray_local, canonical_out: Path, tmp_path, shared_dir) -> None:
    import shutil

    from octoray.evaluation.runner import PARTS, results_table
    from octoray.storage.stage_dirs import read_manifest, write_parquet_atomic

    out = tmp_path / "resume"
    shutil.copytree(canonical_out, out)
    # Simulate a crash: no manifest, no consolidated file, and only the parts of the slow languages.
    before = _read(out / "results.parquet")
    kept = [r for r in before if r["language"] not in ("python", "js")]
    (out / "manifest.json").unlink()
    (out / "results.parquet").unlink()
    write_parquet_atomic(results_table(kept), out / PARTS / "part-1.parquet")
    args = dict(generator="oracle:canonical", tasks="fix,synthesize", languages=ALL_LANGUAGES, limit=3)
    _run_in_process(out, shared_dir / "humanevalpack", **args)
    assert _unexpected(out, "pass") == []
    manifest = read_manifest(out)
    assert manifest["executed_this_run"] == len(before) - len(kept) == 12
    after = {(r["task_id"], r["task"]): r for r in _read(out / "results.parquet")}
    for row in kept:  # untouched rows keep their original timing: they were not re-run
        assert after[(row["task_id"], row["task"])]["duration_s"] == row["duration_s"]
    assert len(after) == 36 and {r["status"] for r in after.values()} == {"pass"}
    # A complete output is left alone.
    _run_in_process(out, shared_dir / "humanevalpack", **args)
    assert read_manifest(out)["started_at"] == manifest["started_at"]
    # Other generation settings into the same directory are refused, not mixed.
    with pytest.raises(UserError, match="other generation settings"):
        _run_in_process(out, shared_dir / "humanevalpack", **{**args, "generator": "oracle:buggy"})


@pytest.mark.ray
@pytest.mark.toolchain
def test_hf_generator_end_to_end(ray_local, tmp_path, shared_dir) -> None:
    from octoray.modeling import build_demo_model

    problems = hep.load_problems("python", shared_dir / "humanevalpack")
    model = build_demo_model(tmp_path / "model", [p["prompt"] + p["canonical_solution"] for p in problems])
    out = _run_in_process(tmp_path / "hf", shared_dir / "humanevalpack", "n_samples=2", "max_new_tokens=24",
                          "batch_size=4", generator=f"hf:{model}", tasks="fix,explain,synthesize",
                          languages="python", limit=2)
    metrics = json.loads((out / "metrics.json").read_text())
    for task in hep.TASKS:
        cell = metrics[task]["python"]
        assert cell["n_problems"] == 2 and cell["n_samples"] == 4 and cell["pass@10"] is None
        assert 0.0 <= cell["pass@1"] <= 1.0
    samples = _read(out / "samples.parquet")
    assert len(samples) == 12
    explain = [s for s in samples if s["task"] == "explain"]
    assert all(s["prompt"].startswith("Question: Write functional code in Python according to the description.\n")
               for s in explain)
    for s in samples:  # every executed program is the function start plus the cut completion
        p = problems[int(s["task_id"].split("/")[1])]
        assert s["code"] == hep.completion_to_code(p, "python", s["task"], s["completion"])
    assert {r["status"] for r in _read(out / "results.parquet")} <= {"pass", "fail", "timeout"}


def test_a_model_exported_before_fingerprints_is_fingerprinted_by_its_bytes(tmp_path) -> None:
    """A train run written by an older octoray has no fingerprint in its manifest: eval records
    the model directory's own (it used to fail with a KeyError)."""
    from octoray.evaluation.config import EvalConfig
    from octoray.evaluation.stage import model_input
    from octoray.storage.fingerprint import fingerprint

    model = tmp_path / "train" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({"stage": "train", "complete": True}))
    found = model_input(EvalConfig(generator=f"hf:{model}", out=str(tmp_path / "eval")))
    assert found["fingerprint"] == fingerprint(model, ["."]) and "run_dir" not in found
