"""``octoray submit/status/logs/stop``: fast checks of how a job is built, then a real Ray head
(``ray start --head`` with token auth, its own ports and temp dir) that runs submitted jobs.

The head is stopped by killing its own process group, never with ``ray stop`` (which kills every
Ray process on the machine, including other people's local clusters).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from octoray.cluster import jobs_client as jobs
from octoray.errors import UserError
from tests.helpers import REPO_ROOT, run_cli

# Ray's own log-tail client passes ssl=None to aiohttp, which warns; nothing octoray can change.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

# --- fast: building the job ----------------------------------------------------------------------


def test_pipeline_entrypoint_makes_config_relative_to_the_upload(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "demo.yaml").write_text("train: {}\n")
    monkeypatch.chdir(tmp_path / "jobs")  # the user runs from a sub-directory
    command = jobs.entrypoint(["demo.yaml", "lr=1e-3"], None, None, tmp_path)
    assert command == "python -m octoray.cli pipeline -c jobs/demo.yaml lr=1e-3"


def test_stage_entrypoint_passes_the_config_as_dash_c(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text("train: {}\n")
    command = jobs.entrypoint(["c.yaml", "max_steps=2"], "train --data /nfs/sft --out '/nfs/runs/a b'", None, tmp_path)
    assert command == "python -m octoray.cli train --data /nfs/sft --out '/nfs/runs/a b' -c c.yaml max_steps=2"


@pytest.mark.parametrize("stage", ["submit", "frobnicate", "  "])
def test_stage_must_be_a_runnable_verb(stage: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--stage"):
        jobs.entrypoint([], stage, None, tmp_path)


def test_pipeline_needs_an_existing_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        jobs.entrypoint([str(tmp_path / "missing.yaml")], None, None, tmp_path)
    with pytest.raises(UserError, match="one CONFIG"):
        jobs.entrypoint([], None, None, tmp_path)


def test_runtime_env_pip_auto_is_the_project_deps_without_ray() -> None:
    cfg = jobs.SubmitConfig(env_vars=("A=1=2",))
    env = jobs.runtime_env(cfg, REPO_ROOT)
    packages = env["pip"]["packages"]
    assert "torch==2.13.0" in packages and any(p.startswith("deepspeed") for p in packages)
    assert not [p for p in packages if p.lower().startswith("ray")]
    assert env["working_dir"] == str(REPO_ROOT) and ".venv/" in env["excludes"]
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "A": "1=2"}
    assert "pip" not in jobs.runtime_env(jobs.SubmitConfig(pip=("none",)), REPO_ROOT)
    assert jobs.runtime_env(jobs.SubmitConfig(pip=("tqdm",)), REPO_ROOT)["pip"]["packages"] == ["tqdm"]


def test_working_dir_none_uploads_nothing_and_keeps_paths_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text("train: {}\n")
    command = jobs.entrypoint(["c.yaml", "lr=1e-3"], None, None, None)
    assert command == f"python -m octoray.cli pipeline -c {tmp_path / 'c.yaml'} lr=1e-3"
    env = jobs.runtime_env(jobs.SubmitConfig(pip=("none",), working_dir="none"), None)
    assert env == {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    assert jobs._working_dir(jobs.SubmitConfig(working_dir="none")) is None
    assert jobs._working_dir(jobs.SubmitConfig()) == REPO_ROOT


def test_submit_section_of_the_config_is_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train: {lr: 1.0}\nsubmit:\n  pip: none\n  env_vars: {HF_HOME: /nfs/hf}\n  bogus: 1\n")
    result = run_cli("submit", str(config), "--address", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert "unknown key 'bogus'" in result.stderr and "Traceback" not in result.stderr
    config.write_text("train: {lr: 1.0}\nsubmit:\n  pip: none\n  env_vars: {HF_HOME: /nfs/hf}\n")
    args = _parse("submit", str(config), "--num-gpus", "1")
    cfg = jobs._submit_config(args)
    assert cfg.pip == ("none",) and cfg.env_vars == ("HF_HOME=/nfs/hf",) and cfg.entrypoint_num_gpus == 1.0


def test_address_and_token_precedence(tmp_path: Path, monkeypatch) -> None:
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.resolve_address(None) == jobs.DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert jobs.resolve_address(None) == "http://10.0.0.5:8265"
    assert jobs.resolve_address("https://head:8265/") == "https://head:8265"
    with pytest.raises(UserError, match="dashboard"):
        jobs.resolve_address("ray://head:10001")
    assert jobs.resolve_token(None) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert jobs.resolve_token(None) == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.resolve_token(None) == "from-env"
    assert jobs.resolve_token("flag") == "flag"


def test_unreachable_cluster_is_one_line_exit_2(capsys) -> None:
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    result = run_cli("status", "x", "--address", address)  # as the user sees it
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "cannot reach the Ray dashboard" in result.stderr
    code, _, err = _octoray(capsys, "submit", "--entrypoint", "true", "--pip", "none", "--address", address)
    assert code == 2 and "cannot reach the Ray dashboard" in err


def test_commands_without_address_name_the_one_they_use_first() -> None:
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    result = run_cli("status", env={"RAY_ADDRESS": address, "RAY_API_SERVER_ADDRESS": ""})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr
    assert lines[0] == f"octoray status: Ray dashboard http://{address} ($RAY_ADDRESS)"
    assert lines[1].startswith("octoray status: error: cannot reach the Ray dashboard")
    assert "RAY_API_SERVER_ADDRESS" in run_cli("logs", "--help").stdout


# --- a real Ray head -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head():
    """A private Ray head with the dashboard (Jobs API) and token auth; yields (url, token)."""
    token = secrets.token_hex(16)
    # Ray gives a starting raylet a fixed 30 s to register; on a busy shared machine that can run
    # out, and then `ray start` gives up. Such a start is retried, with new ports and temp dir.
    for attempt in range(3):
        head, temp_dir, url = _start_head(token)
        if _wait_for_head(url, head, Path(temp_dir) / "head.log", timeout_s=150, last_try=attempt == 2):
            break
        _kill_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    try:
        yield url, token
    finally:
        if head.poll() is not None:  # died under the tests: say why
            print(f"ray head exited early ({head.returncode}):\n{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
        _kill_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _start_head(token: str) -> tuple[subprocess.Popen, str, str]:
    temp_dir = tempfile.mkdtemp(prefix="ocj", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    ports = {name: _free_port() for name in (
        "port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
    ray_bin = Path(sys.executable).parent / "ray"
    # docs/cluster.md's `ray start --head` line, with private ports and temp dir (no clash with any
    # other Ray here), --block (its own process group to kill) and a small object store.
    recipe = [w for w in shlex.split(_tryout()[0], comments=True)[2:] if not w.startswith("--dashboard-port")]
    command = [str(ray_bin), "start", *recipe, "--block", f"--temp-dir={temp_dir}",
               "--include-log-monitor=false", "--object-store-memory=100000000",
               *(f"--{name}={port}" for name, port in ports.items())]
    env = {**_env_without_ray(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(Path(temp_dir) / "head.log", "w") as log:
        # Own session = own process group: teardown kills exactly this head and what it spawned.
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return head, temp_dir, f"http://127.0.0.1:{ports['dashboard-port']}"


def _cli(url: str, token: str | None, *args: str, timeout: float = 300):
    env = {"RAY_AUTH_TOKEN": token} if token else {}
    return run_cli(*args, "--address", url, env=env, timeout=timeout)


@pytest.mark.ray
@pytest.mark.slow
def test_submit_runs_the_uploaded_checkout_and_streams_logs(ray_head) -> None:
    url, token = ray_head
    probe = "import octoray; print('octoray-from', octoray.__file__)"
    result = _cli(url, token, "submit", "--pip", "none", "--entrypoint", f'python -c "{probe}"')
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("octoray-from"))
    # imported from the uploaded package, not from this checkout
    assert "_ray_pkg_" in line and str(REPO_ROOT / "octoray") not in line
    assert "SUCCEEDED" in result.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_submit_real_stages_with_the_config(ray_head, tmp_path: Path) -> None:
    """``submit CONFIG --stage "VERB ..."``: the job's stage reads its own section of CONFIG, for
    every stage verb (mine used to take an appended CONFIG for a repository, filter and serve
    rejected it). Mine runs for real; every other verb's section holds one bad value, and the
    job's failure names it: the config reached the stage, which stopped before any work."""
    import yaml

    from octoray.storage.stage_dirs import read_manifest
    from tests.helpers.gitrepo import MIT, GitRepo

    url, token = ray_head
    repo = GitRepo(tmp_path / "repo")
    repo.commit("Add license and code", {"LICENSE": MIT, "app.py": "def f():\n    return 1\n"})
    repo.commit("Return two from f", {"app.py": "def f():\n    return 2\n"})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "mine": {"chunk_commits": 1, "progress": False}, "filter": {"min_tokens": 10, "max_tokens": 5},
        "train": {"hparams": str(tmp_path / "no-tune")}, "tune": {"num_samples": 0}, "serve": {"port": 0}, "eval": {"n_samples": 0},
        "pipeline": {"latency_requests": 0}}))
    commits = tmp_path / "commits"
    result = _cli(url, token, "submit", str(config), "--pip", "none", "--stage", f"mine {repo.path} --out {commits}",
                  "workers=1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    manifest = read_manifest(commits)  # written by the job, on this machine's file system
    assert manifest is not None and manifest["stage"] == "mine"
    resolved = yaml.safe_load((commits / "config.yaml").read_text())
    assert (resolved["chunk_commits"], resolved["progress"], resolved["workers"]) == (1, False, 1)
    for stage, fragment in ((f"filter {commits} --out {tmp_path / 'sft'}", "need 0 <= min_tokens <= max_tokens"),
                            ("train --data s3://b/sft --out s3://b/run", "hparams: tune directory not found"),
                            ("tune --data s3://b/sft --out s3://b/tune", "num_samples must be >= 1, got 0"),
                            ("serve runs/demo/model", "port: must be 1-65535, got 0"),
                            ("eval --generator oracle:canonical", "n_samples: must be at least 1"),
                            ("pipeline", "latency_requests and latency_concurrency must be >= 1")):
        result = _cli(url, token, "submit", str(config), "--pip", "none", "--stage", stage)
        assert result.returncode == 1 and fragment in result.stdout, stage + result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.ray
@pytest.mark.slow
def test_failing_stage_exits_1_with_its_error_in_the_logs(ray_head) -> None:
    url, token = ray_head
    result = _cli(url, token, "submit", "--pip", "none", "--stage", "mine /nonexistent/repo --out /nonexistent/out")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "octoray mine: error:" in result.stdout  # the remote command's own one-line error, streamed
    assert "FAILED" in result.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_no_wait_then_status_logs_stop(ray_head, capsys) -> None:
    url, token = ray_head
    sleeper = "import time; print('tick', flush=True); time.sleep(300)"
    result = _cli(url, token, "submit", "--pip", "none", "--no-wait", "--entrypoint", f'python -c "{sleeper}"')
    assert result.returncode == 0, result.stderr[-2000:]
    job_id = result.stdout.strip()
    assert job_id.startswith("raysubmit_")

    client = jobs.connect(url, token)
    deadline = time.monotonic() + 120
    while "tick" not in client.get_job_logs(job_id):
        assert time.monotonic() < deadline, "the job printed nothing in 120 s"
        time.sleep(0.5)
    # The other verbs run in this process (same parser and main as the console script): a
    # subprocess per call would cost seconds of Python and Ray imports each.
    code, out, err = _octoray(capsys, "logs", job_id, "--address", url, "--token", token)
    assert code == 0 and "tick" in out, err
    code, out, err = _octoray(capsys, "status", job_id, "--address", url, "--token", token)
    assert code == 0 and "RUNNING" in out, err
    code, out, err = _octoray(capsys, "stop", job_id, "--address", url, "--token", token)
    assert code == 0 and "STOPPED" in out, out + err
    code, out, err = _octoray(capsys, "logs", job_id, "--follow", "--address", url, "--token", token)
    assert code == 130 and "tick" in out, err
    code, out, err = _octoray(capsys, "status", "--address", url, "--token", token)
    assert code == 0 and job_id in out and "STOPPED" in out
    code, out, err = _octoray(capsys, "status", "raysubmit_nosuchjob", "--address", url, "--token", token)
    assert code == 2 and "no job 'raysubmit_nosuchjob'" in err


def _tryout() -> list[str]:
    """The lines of the block under docs/cluster.md's "Try it on one machine", `ray start` to `ray stop`."""
    section = (REPO_ROOT / "docs" / "cluster.md").read_text(encoding="utf-8").split("## Try it on one machine", 1)[1]
    lines = section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert lines[0].startswith("ray start --head ") and lines[-1].startswith("ray stop"), lines
    return lines


@pytest.mark.ray
@pytest.mark.slow
def test_docs_local_tryout_runs_as_written(ray_head) -> None:
    """docs/cluster.md's try-out between `ray start` and `ray stop`, as one bash script, against the
    head started from its `ray start` line; only the dashboard URL is this head's private one."""
    url, token = ray_head
    script = "\n".join(_tryout()[1:-1]).replace("http://127.0.0.1:8265", url)
    assert f"export RAY_API_SERVER_ADDRESS={url}" in script
    env = {**_env_without_ray(), "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 130, out[-3000:]  # the last line follows a stopped job
    assert f"octoray status: Ray dashboard {url} ($RAY_API_SERVER_ADDRESS)" in result.stderr
    assert f"(the checkout octoray runs from; --working-dir to change) to {url} ($RAY_API_SERVER_ADDRESS)" in out
    assert "SUCCEEDED" in out and "tick" in result.stdout and "RUNNING" in result.stdout
    assert re.search(r"octoray logs: job raysubmit_\w+ STOPPED", result.stderr), out[-3000:]
    assert "Traceback" not in out


@pytest.mark.ray
@pytest.mark.slow
def test_token_is_required_and_checked(ray_head, tmp_path: Path, monkeypatch, capsys) -> None:
    url, _ = ray_head
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = _octoray(capsys, "status", "--address", url)
    assert code == 2 and "RAY_AUTH_TOKEN" in err and err.strip().count("\n") == 0, err
    code, _, err = _octoray(capsys, "status", "--address", url, "--token", "not-the-token")
    assert code == 2 and "refused" in err, err


# --- helpers -------------------------------------------------------------------------------------


def _octoray(capsys, *argv: str) -> tuple[int, str, str]:
    """``octoray ARGV`` in this process: (exit code, stdout, stderr)."""
    from octoray.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _parse(verb: str, *argv: str):
    import argparse

    parser = argparse.ArgumentParser(prog=f"octoray {verb}")
    jobs.add_arguments(parser)
    args = parser.parse_intermixed_args(list(argv))
    args.command = verb
    return args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_without_ray() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def _wait_for_head(url: str, head: subprocess.Popen, log: Path, timeout_s: float, last_try: bool) -> bool:
    """Until ``ray start`` reports the node up and the dashboard answers HTTP (401 counts: it is
    up and enforcing the token). False when ``ray start`` gave up and another try may help."""
    deadline = time.monotonic() + timeout_s
    while True:
        if head.poll() is not None:
            if last_try:
                pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
            return False
        if "Ray runtime started" in log.read_text(errors="replace"):
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                pass
        if time.monotonic() > deadline:
            pytest.fail(f"the Ray head did not come up in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _kill_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the head's process group, SIGKILL what is left; then any stray process of this temp dir."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            with contextlib.suppress(OSError):
                os.killpg(head.pid, signal.SIGKILL)  # children that outlived the head
        break
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in part for part in (proc.info["cmdline"] or [])):
            with contextlib.suppress(psutil.Error, OSError):
                proc.kill()

