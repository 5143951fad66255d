"""octoray on an autoscaling cluster, on one machine: Ray's fake multi-node provider runs the real
autoscaler with ``cluster/local/autoscaling.yaml`` (a head with no CPUs, a CPU worker type, a
"GPU" worker type whose accelerators are the custom resource ``fake_gpu``) and launches local
nodes as the demand asks. ``octoray submit jobs/demo.yaml`` must make it grow -- CPU workers for
mining and filtering, the GPU type for training -- succeed, and let it shrink back to the head.

The autoscaler's node history (parsed from its monitor log) is printed and written beside the
test's temp files: run with ``-s`` to see it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT, run_cli
from tests.helpers.s3server import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cluster]

CONFIG = REPO_ROOT / "cluster" / "local" / "autoscaling.yaml"
WORKER_TYPES = ("cpu_worker", "gpu_worker")


class FakeCluster:
    """``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` in its own session, ports
    and temp dir; teardown kills exactly its processes (the fake nodes are the monitor's children)."""

    def __init__(self, work: Path) -> None:
        self.token = secrets.token_hex(16)
        self.temp_dir = tempfile.mkdtemp(prefix="oca", dir="/tmp")  # short: socket paths < 108 bytes
        port, dash = free_port(), free_port()
        import ray._private.services

        # The fake provider starts nodes against provider.gcs_address: the head's own address.
        self.gcs = f"{ray._private.services.get_node_ip_address()}:{port}"
        self.url = f"http://127.0.0.1:{dash}"
        config = yaml.safe_load(CONFIG.read_text())
        config["provider"]["gcs_address"] = self.gcs
        config_path = work / "autoscaling.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    # A raylet gets 30 s to register by default; a loaded 2-core machine can need more.
                    "RAY_raylet_start_wait_time_s": "120",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=0",
                   f"--port={port}", f"--dashboard-port={dash}", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
                   f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                   f"--autoscaling-config={config_path}",
                   # Ray's default ports may be taken by another Ray on the machine.
                   *(f"--{flag}={free_port()}" for flag in (
                       "node-manager-port", "object-manager-port", "metrics-export-port",
                       "runtime-env-agent-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port"))]
        self.log = work / "head.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_up(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # 401: up, and enforcing the token
            except OSError:
                time.sleep(1)
        pytest.fail(f"the fake cluster's dashboard did not come up:\n{self.log.read_text()[-3000:]}")

    def monitor_log(self) -> str:
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("monitor.log*")))

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
        # Fake nodes' processes that left the group: anything still naming this temp dir.
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], capture_output=True)


def node_history(monitor_log: str) -> list[tuple[str, dict[str, int], dict[str, int]]]:
    """``(time, active node counts by type, pending by type)`` for every status the autoscaler
    logged, collapsed to the moments something changed."""
    history: list[tuple[str, dict[str, int], dict[str, int]]] = []
    for block in re.split(r"=+ Autoscaler status: ", monitor_log)[1:]:
        when = block.split(" =", 1)[0].strip()
        active = _section(block, "Active:", "Pending:")
        pending = _section(block, "Pending:", "Recent failures:")
        if not history or (active, pending) != history[-1][1:]:
            history.append((when, active, pending))
    return history


def _section(block: str, start: str, end: str) -> dict[str, int]:
    """Node counts by type in one section of a status block. Active lines read ``" 1 cpu_worker"``;
    pending ones ``" cpu_worker, 1 launching"`` or ``" 10.0.0.2: cpu_worker, setting-up"``."""
    if start not in block or end not in block:
        return {}
    counts: dict[str, int] = {}
    for line in block.split(start, 1)[1].split(end, 1)[0].splitlines():
        active = re.match(r"\s*(\d+)\s+(\S+)\s*$", line)
        launching = re.match(r"\s*(\S+), (\d+) launching", line)
        pending = re.match(r"\s*\S+: (\S+), ", line)
        if active:
            name, count = active.group(2), int(active.group(1))
        elif launching:
            name, count = launching.group(1), int(launching.group(2))
        elif pending:
            name, count = pending.group(1), 1
        else:
            continue
        counts[name] = counts.get(name, 0) + count
    return counts


@pytest.fixture
def fake_cluster(tmp_path: Path):
    cluster = FakeCluster(tmp_path)
    try:
        cluster.wait_up()
        yield cluster
    finally:
        cluster.stop()


def _train_nodes(cluster: FakeCluster) -> list[dict]:
    """Resources of the nodes the Ray Train workers ran on (State API of the fake cluster's
    dashboard, in a subprocess that carries its token)."""
    probe = ("import json\n"
             "from ray.util.state import list_actors, list_nodes\n"
             f"url = '{cluster.url}'\n"
             "nodes = {n.node_id: n.resources_total for n in list_nodes(address=url, limit=100, detail=True)}\n"
             "workers = list_actors(address=url, filters=[('class_name', '=', 'RayTrainWorker')], limit=100,\n"
             "                      detail=True)\n"
             "print(json.dumps([nodes.get(a.node_id, {}) for a in workers]))\n")
    out = subprocess.run([sys.executable, "-c", probe], env=cluster.env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_demo_job_grows_the_cluster_and_lets_it_shrink(fake_cluster: FakeCluster, tmp_path: Path,
                                                       shared_dir: Path) -> None:
    out = tmp_path / "runs"  # every fake node is a process on this machine: one disk they all see
    started = time.monotonic()
    # --working-dir none: every fake node unpacks a job's working_dir into the one session dir they
    # share, and a node that goes away deletes it -- under the driver's feet (its cwd vanishes).
    # Real nodes have disks of their own; here the job runs this checkout's installed octoray.
    result = run_cli(
        "submit", str(REPO_ROOT / "jobs" / "demo.yaml"), "--address", fake_cluster.url, "--pip", "none",
        "--working-dir", "none",
        f"out={out}", f"sources=[{REPO_ROOT}]", "stages=[mine, filter, train]",
        f"humanevalpack_dir={shared_dir / 'humanevalpack'}",
        "train.max_steps=6", "train.checkpoint_every=3", "train.worker_resources={fake_gpu: 1}",
        env={"RAY_AUTH_TOKEN": fake_cluster.token}, timeout=1200)
    job_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert (out / "train" / "model" / "config.json").is_file()

    # Training ran on the "GPU" node type, and only there.
    train_nodes = _train_nodes(fake_cluster)
    assert train_nodes and all(node.get("fake_gpu") == 2 for node in train_nodes), train_nodes

    # Idle workers go after idle_timeout_minutes (15 s here); the autoscaler checks every second.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        history = node_history(fake_cluster.monitor_log())
        if history and not any(history[-1][1].get(t) for t in WORKER_TYPES) and not history[-1][2]:
            break
        time.sleep(3)
    history = node_history(fake_cluster.monitor_log())
    timeline = "\n".join(f"{when}  active {active}  pending {pending}" for when, active, pending in history)
    (tmp_path / "node-history.txt").write_text(timeline + "\n")
    print(f"\njob: {job_seconds:.0f} s\nautoscaler node history:\n{timeline}")

    launched = {t for _, active, _ in history for t in active}
    assert {"cpu_worker", "gpu_worker"} <= launched, timeline
    final_active = history[-1][1]
    assert not any(final_active.get(t) for t in WORKER_TYPES), f"workers not removed:\n{timeline}"
    assert final_active.get("ray.head.default") == 1
