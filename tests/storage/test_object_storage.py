"""``octoray pipeline ... out=s3://...`` on a real S3-compatible server (moto_server, 127.0.0.1).

The real command in a subprocess (its own embedded Ray), pointed at the server through
``AWS_ENDPOINT_URL``: killed with SIGKILL during training, rerun to completion (mining and
filtering not redone, training resumed from the checkpoint in the bucket, every step logged once),
then rerun again (every stage skipped, no object rewritten). Nothing lands on local disk but the
per-node cache. What the test checks in the bucket it reads with its own pyarrow S3 client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import OCTORAY, REPO_ROOT, run_cli

MAX_STEPS = 12
CHECKPOINT_EVERY = 4


def _objects(server, bucket: str, prefix: str) -> dict[str, tuple[int, int]]:
    """key -> (size, mtime_ns) of every object under ``prefix``: a rewritten object changes mtime."""
    import pyarrow.fs as pafs

    infos = server.filesystem().get_file_info(pafs.FileSelector(f"{bucket}/{prefix}", recursive=True,
                                                                allow_not_found=True))
    return {i.path: (i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File}


def _exists(server, bucket: str, key: str) -> bool:
    import pyarrow.fs as pafs

    return server.filesystem().get_file_info(f"{bucket}/{key}").type == pafs.FileType.File


def _read(server, bucket: str, key: str) -> str:
    with server.filesystem().open_input_stream(f"{bucket}/{key}") as stream:
        return stream.read().decode()


def _steps(server, bucket: str) -> list[dict]:
    return [json.loads(line) for line in _read(server, bucket, "run/train/metrics.jsonl").splitlines() if line]


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.toolchain
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_pipeline_on_s3_killed_resumes_and_rerun_skips(s3_server, tmp_path: Path, shared_dir: Path) -> None:
    bucket = s3_server.bucket()
    work = tmp_path / "cwd"  # the command runs here: nothing may appear under it (no runs/)
    work.mkdir()
    env = {**os.environ, **s3_server.env, "OCTORAY_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    args = [*OCTORAY, "pipeline", str(REPO_ROOT / "jobs/demo.yaml"), f"out=s3://{bucket}/run",
            f"sources=[{REPO_ROOT}]", "--data-dir", str(shared_dir / "humanevalpack"),
            f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "eval.limit=1", "latency_requests=2"]

    log = tmp_path / "first.log"
    with log.open("w") as handle:
        first = subprocess.Popen(args, cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline, first_ckpt = time.time() + 900, f"checkpoint_{CHECKPOINT_EVERY:06d}"
        while time.time() < deadline:
            snapshot = _exists(s3_server, bucket, "run/train/checkpoint_manager_snapshot.json")
            if snapshot and first_ckpt in _read(s3_server, bucket, "run/train/checkpoint_manager_snapshot.json"):
                break
            assert first.poll() is None, f"pipeline exited ({first.returncode}) early:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        else:
            pytest.fail(f"no checkpoint in the bucket after 900 s:\n{log.read_text()[-3000:]}")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not _objects(s3_server, bucket, "run/train/model"), "the kill came too late: training had finished"
    assert _exists(s3_server, bucket, "run/commits/manifest.json") and _exists(s3_server, bucket, "run/sft/manifest.json")
    data_before = {**_objects(s3_server, bucket, "run/commits"), **_objects(s3_server, bucket, "run/sft")}

    rerun = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"octoray mine: s3://{bucket}/run/commits is already complete" in rerun.stdout
    assert f"octoray filter: s3://{bucket}/run/sft is already complete" in rerun.stdout
    data_after = {**_objects(s3_server, bucket, "run/commits"), **_objects(s3_server, bucket, "run/sft")}
    assert data_after == data_before  # not redone, not re-uploaded

    rows = _steps(s3_server, bucket)
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1))  # every step once, none lost
    resumed = {row["start_step"] for row in rows} - {0}
    assert len(resumed) == 1 and resumed.pop() % CHECKPOINT_EVERY == 0  # resumed from a bucket checkpoint
    keys = set(_objects(s3_server, bucket, "run"))
    for key in ("commits/manifest.json", "sft/manifest.json", "train/manifest.json", "train/model/config.json",
                "train/model/model.safetensors", f"train/checkpoint_{MAX_STEPS:06d}/octoray_state.json", "train/loss.png",
                "eval/manifest.json", "eval/results.parquet", "serve/latency.json", "report/report.md"):
        assert f"{bucket}/run/{key}" in keys, key
    assert list(work.iterdir()) == []  # nothing written to the local working directory

    everything = {k: v for k, v in _objects(s3_server, bucket, "run").items() if "/report/" not in k}
    again = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for line in (f"octoray mine: s3://{bucket}/run/commits is already complete",
                 f"octoray filter: s3://{bucket}/run/sft is already complete",
                 f"octoray train: s3://{bucket}/run/train is already complete",
                 "serve + eval: already complete"):
        assert line in again.stdout, again.stdout[-3000:]
    assert {k: v for k, v in _objects(s3_server, bucket, "run").items() if "/report/" not in k} == everything


@pytest.mark.ray
def test_mine_to_s3_equals_mine_to_disk(s3_server, tmp_path: Path) -> None:
    """Many chunks, a URL source (cloned into the node cache, not the bucket), a rerun that skips."""
    from octoray.storage.locations import location
    from octoray.storage.stage_dirs import read_parquet
    from tests.helpers.gitrepo import KEPT_SUBJECTS, build_rules_repo

    repo = build_rules_repo(tmp_path / "rules")
    bucket = s3_server.bucket()
    env = {"OCTORAY_CACHE": str(tmp_path / "cache")}
    sources = [str(repo.path), f"file://{repo.path}"]
    local = run_cli("mine", *sources, "--out", tmp_path / "local", "chunk_commits=2", "max_file_bytes=1000", env=env)
    remote = run_cli("mine", *sources, "--out", f"s3://{bucket}/commits", "chunk_commits=2", "max_file_bytes=1000", env=env)
    assert local.returncode == 0 and remote.returncode == 0, local.stderr[-2000:] + remote.stderr[-2000:]

    def rows(out: str) -> list[dict]:
        manifest = json.loads(location(f"{out}/manifest.json").read_text())
        # "repo" names whichever copy of a commit deduplication kept: either source, run to run.
        return sorted(({k: v for k, v in r.items() if k != "repo"}
                       for f in manifest["files"] for r in read_parquet(location(f"{out}/{f}")).to_pylist()),
                      key=lambda r: r["commit"])

    assert rows(f"s3://{bucket}/commits") == rows(str(tmp_path / "local"))
    assert {r["subject"] for r in rows(f"s3://{bucket}/commits")} == KEPT_SUBJECTS
    keys = s3_server.keys(bucket)
    assert not any(".repos" in k for k in keys) and list((tmp_path / "cache" / "repos").iterdir())
    assert sum(k.endswith(".parquet") and "/.work/" in k for k in keys) > 2  # several chunks per repository
    before = _objects(s3_server, bucket, "commits")
    again = run_cli("mine", *sources, "--out", f"s3://{bucket}/commits", "chunk_commits=2", "max_file_bytes=1000", env=env)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert _objects(s3_server, bucket, "commits") == before
