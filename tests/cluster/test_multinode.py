"""Two Ray nodes on one machine that share no scratch directory (tests/helpers/raycluster.py), with the
stage outputs on a real S3-compatible server (moto_server on 127.0.0.1).

* a node-private output path stops ``octoray pipeline`` up front with one line;
* with ``out=s3://...`` the demo pipeline completes and its tasks ran on both nodes (node ids
  read from Ray's State API and written to ``node_usage.json``);
* node loss: the worker node is SIGKILLed while mining and again while training (after the first
  checkpoint), a fresh worker node joins each time; the run finishes, mines exactly the rows of a
  run without faults, and training resumes from the last checkpoint in the bucket with every step
  logged once.

Marked ``cluster`` (several minutes); they run in the default ``pytest -q`` too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import OCTORAY, REPO_ROOT, raycluster

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Head + one worker node; the worker has a private tmpfs over ``cluster.scratch``."""
    if not raycluster.can_unshare():
        pytest.skip("needs root (or CAP_SYS_ADMIN) for unshare --mount and a tmpfs mount")
    scratch = tmp_path_factory.mktemp("scratch")
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(REPO_ROOT)}
    running = raycluster.start(scratch, env, workers=1)
    try:
        yield running
    finally:
        running.stop()


def _driver_env(cluster) -> dict[str, str]:
    return {**cluster.env, "RAY_ADDRESS": cluster.address, "OCTORAY_CACHE": str(Path(cluster.temp_dir) / "cache-driver")}


def _run(cluster, *args: str, timeout: float = 1500, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*OCTORAY, *args], cwd=cwd, env=_driver_env(cluster), capture_output=True, text=True,
                          timeout=timeout)


def _node_usage(cluster) -> dict[str, list[str]]:
    """node id -> names of the finished tasks and live/dead actors Ray recorded on it."""
    script = """
import json, logging, ray
from ray.util.state import list_actors, list_tasks
ray.init(logging_level=logging.ERROR, log_to_driver=False)
usage = {}
for t in list_tasks(filters=[("state", "=", "FINISHED")], limit=10000, detail=True, raise_on_missing_output=False):
    if t.node_id:
        usage.setdefault(t.node_id, set()).add(t.name)
for a in list_actors(limit=10000, detail=True, raise_on_missing_output=False):
    if a.node_id:
        usage.setdefault(a.node_id, set()).add(a.class_name)
print(json.dumps({k: sorted(v) for k, v in usage.items()}))
"""
    out = subprocess.run([sys.executable, "-c", script], env=_driver_env(cluster), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_node_private_output_path_stops_up_front(cluster) -> None:
    out = cluster.scratch / "run"  # the head sees this directory; the worker sees its own tmpfs
    result = _run(cluster, "pipeline", str(REPO_ROOT / "jobs/demo.yaml"), f"out={out}", timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(out) in lines[0] and "not shared" in lines[0] and "s3://" in lines[0] and "shared mount" in lines[0]
    assert not (out / "commits").exists()  # stopped before any work
    assert [p.name for p in out.iterdir()] == []  # the probe file is cleaned up


def test_pipeline_on_two_nodes_with_outputs_in_s3(cluster, s3_server, shared_dir: Path, tmp_path: Path) -> None:
    bucket = s3_server.bucket()
    cluster.ensure_workers(1)
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    result = _run(cluster, "pipeline", str(REPO_ROOT / "jobs/demo.yaml"), f"out=s3://{bucket}/run", f"sources=[{REPO_ROOT}]",
                  "--data-dir", str(shared_dir / "humanevalpack"), "train.max_steps=4", "train.checkpoint_every=2",
                  "eval.limit=1", "latency_requests=2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    keys = s3_server.keys(bucket, "run")
    for key in ("run/commits/manifest.json", "run/sft/manifest.json", "run/train/manifest.json",
                "run/train/model/model.safetensors", "run/eval/manifest.json", "run/report/report.md"):
        assert key in keys, key
    assert list(tmp_path.iterdir()) == []  # nothing on the driver's local disk

    usage = _node_usage(cluster)
    (tmp_path.parent / "node_usage.json").write_text(json.dumps(usage, indent=1))  # the record, for humans
    print("node usage:", json.dumps(usage, indent=1))
    assert set(nodes) <= set(usage), f"tasks ran only on {sorted(usage)}, nodes {nodes}"
    # One CPU per node and two Ray Train workers of one CPU each: one worker on each node.
    train_nodes = {node for node, names in usage.items() if "RayTrainWorker" in names}
    assert train_nodes == set(nodes)


def _wait_for(what: str, predicate, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"no {what} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def test_worker_node_lost_while_mining_and_while_training(cluster, s3_server, shared_dir: Path, tmp_path: Path) -> None:
    from octoray.storage.locations import location
    from octoray.storage.stage_dirs import read_parquet

    bucket = s3_server.bucket()
    cluster.ensure_workers(1)
    chunk = "chunk_commits=2"  # many small mining tasks, so the kill lands while they run
    baseline = _run(cluster, "mine", str(REPO_ROOT), "--out", f"s3://{bucket}/baseline/commits", chunk)
    assert baseline.returncode == 0, baseline.stdout[-2000:] + baseline.stderr[-2000:]

    fs = s3_server.filesystem()
    run = f"{bucket}/run"
    max_steps, every = 8, 2
    args = [*OCTORAY, "pipeline", str(REPO_ROOT / "jobs/demo.yaml"), f"out=s3://{run}", f"sources=[{REPO_ROOT}]",
            "--data-dir", str(shared_dir / "humanevalpack"),
            "stages=[mine,filter,train]", f"mine.{chunk}", f"train.max_steps={max_steps}",
            f"train.checkpoint_every={every}"]
    log = tmp_path / "run.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=_driver_env(cluster), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def mined_parts() -> int:
            return sum(1 for k in s3_server.keys(bucket, "run/commits/.work") if k.endswith(".parquet"))

        _wait_for("a mined chunk", lambda: mined_parts() >= 1, proc, log)
        assert "run/commits/manifest.json" not in s3_server.keys(bucket, "run/commits"), "mining was already over"
        cluster.kill_worker(cluster.workers[-1])          # node lost mid-mining
        cluster.add_worker()                              # the autoscaler's replacement

        def first_checkpoint() -> bool:
            key = f"{run}/train/checkpoint_manager_snapshot.json"
            try:
                with fs.open_input_stream(key) as stream:
                    return f"checkpoint_{every:06d}" in stream.read().decode()
            except (FileNotFoundError, OSError):
                return False

        _wait_for("a registered checkpoint", first_checkpoint, proc, log)
        assert "run/train/model/config.json" not in s3_server.keys(bucket, "run/train"), "training was already over"
        cluster.kill_worker(cluster.workers[-1])          # node lost mid-training
        cluster.add_worker()
        proc.wait(timeout=1500)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]

    def commits(prefix: str) -> list[str]:
        manifest = json.loads(location(f"s3://{bucket}/{prefix}/manifest.json").read_text())
        shas = [sha for name in manifest["files"]
                for sha in read_parquet(location(f"s3://{bucket}/{prefix}/{name}"), ["commit"])["commit"].to_pylist()]
        assert len(shas) == manifest["rows"]
        return sorted(shas)

    assert commits("run/commits") == commits("baseline/commits")  # no row lost or mined twice

    metrics = location(f"s3://{run}/train/metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines() if line]
    assert [row["step"] for row in rows] == list(range(1, max_steps + 1))  # no step lost or counted twice
    restarts = {row["start_step"] for row in rows} - {0}
    assert restarts, "training never restarted after the node loss"
    for step in restarts:  # each restart began at a checkpoint that is in the bucket
        assert step % every == 0
    manifest = json.loads(location(f"s3://{run}/train/manifest.json").read_text())
    assert manifest["complete"] and manifest["last_metrics"]["step"] == max_steps
