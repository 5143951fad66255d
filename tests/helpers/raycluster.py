"""A multi-node Ray cluster on one machine whose nodes share no scratch directory (for tests).

The head and each worker node are separate ``ray start --block`` processes, as on a real cluster.
Every worker node runs in its own mount namespace (``unshare --mount``) with a private tmpfs over
``scratch``: a file the head (or the driver) writes there does not exist for the worker, as a
node's local disk does not exist for the others. Each node also gets its own ``OCTORAY_CACHE``
(inside its private tmpfs for workers). ``kill_worker`` SIGKILLs every process of one worker
node (what a spot reclaim does); ``add_worker`` starts a fresh one (what an autoscaler does).

Every port is chosen free and the head has its own ``--temp-dir``: the cluster never touches
another Ray on the machine, and teardown signals only the processes it started — never a bare
``ray stop``. Needs root (or CAP_SYS_ADMIN) for ``unshare --mount`` and ``mount -t tmpfs``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.s3server import free_port

RAY = str(Path(sys.executable).parent / "ray")
_START_TRIES = 3
_PORT_FLAGS = ("node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
               "dashboard-agent-listen-port", "dashboard-agent-grpc-port")


def can_unshare() -> bool:
    """Whether this process may create a mount namespace and mount a tmpfs in it."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt && umount /mnt"], capture_output=True)
    return probe.returncode == 0


@dataclass
class Node:
    """One ``ray start`` process (its own session) and its log."""

    proc: subprocess.Popen
    log: Path
    label: str

    def processes(self) -> list[int]:
        """Pids of this node: the ``ray start`` process and everything it started."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL every process of the node at once (a lost machine does not shut down cleanly)."""
        pids = self.processes()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:  # anything that left the process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class LocalCluster:
    """A head node plus worker nodes in private mount namespaces; see the module docstring."""

    scratch: Path
    env: dict[str, str]
    temp_dir: str = ""
    address: str = ""
    dashboard: str = ""
    head: Node | None = None
    workers: list[Node] = field(default_factory=list)  # alive worker nodes
    lost: list[Node] = field(default_factory=list)     # killed ones
    _count: int = 0

    def start_head(self, num_cpus: int = 1) -> None:
        """``ray start --head`` (with the dashboard: the tests read node ids through the State API)."""
        self.temp_dir = tempfile.mkdtemp(prefix="ocn", dir="/tmp")  # short: socket paths < 108 bytes
        port, dash = free_port(), free_port()
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        cache = Path(self.temp_dir) / "cache-head"
        command = [RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--port={port}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                   f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}",
                   "--disable-usage-stats", "--include-log-monitor=false", "--object-store-memory=150000000",
                   *self._ports()]
        for attempt in range(_START_TRIES):  # see add_worker: a start can miss Ray's registration window
            self.head = self._spawn(f"head-{attempt}", command, {"OCTORAY_CACHE": str(cache)})
            try:
                self._wait_nodes(1)
                return
            except RuntimeError:
                self.head.kill()
                if attempt == _START_TRIES - 1:
                    raise

    def add_worker(self, num_cpus: int = 1) -> Node:
        """A fresh worker node in its own mount namespace with a private tmpfs over ``scratch``."""
        self._count += 1
        label = f"worker{self._count}"
        ray_cmd = [RAY, "start", f"--address={self.address}", "--block", f"--num-cpus={num_cpus}",
                   "--disable-usage-stats", "--include-log-monitor=false", "--object-store-memory=150000000",
                   *self._ports()]
        script = 'mount -t tmpfs -o size=256m tmpfs "$1" && mkdir -p "$1/cache" && shift && exec "$@"'
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                   str(self.scratch), *ray_cmd]
        alive_before = self.alive_nodes()
        # On a loaded machine a starting raylet can miss Ray's fixed 30 s registration window and
        # `ray start` gives up: start it again (a real autoscaler retries the same way).
        for attempt in range(_START_TRIES):
            node = self._spawn(f"{label}-{attempt}", command, {"OCTORAY_CACHE": str(self.scratch / "cache")})
            self.workers.append(node)
            try:
                self._wait_nodes(len(alive_before) + 1)
                return node
            except RuntimeError:
                self.workers.remove(node)
                node.kill()
                if attempt == _START_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def ensure_workers(self, count: int) -> None:
        """Start worker nodes until ``count`` of them are alive (replacing any the machine lost)."""
        while len(self.alive_nodes()) < count + 1:
            self.add_worker()

    def kill_worker(self, node: Node) -> None:
        """Lose a worker node: SIGKILL all its processes, then wait until the head marks it dead."""
        alive = len(self.alive_nodes())
        self.workers.remove(node)
        self.lost.append(node)
        node.kill()
        deadline = time.time() + 120
        while len(self.alive_nodes()) >= alive and time.time() < deadline:
            time.sleep(1)

    def alive_nodes(self) -> list[str]:
        """Node ids the head reports alive."""
        out = subprocess.run([sys.executable, "-c", _ALIVE], env={**self.env, "RAY_ADDRESS": self.address},
                             capture_output=True, text=True, timeout=120)
        return [line for line in out.stdout.split() if line]

    def stop(self) -> None:
        """Kill every node this cluster started and remove the head's temp dir."""
        for node in [*self.workers, *self.lost, *([self.head] if self.head else [])]:
            node.kill()
        subprocess.run(["umount", "-l", str(self.scratch)], capture_output=True)  # never mounted here; harmless
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    def _ports(self) -> list[str]:
        return [f"--{flag}={free_port()}" for flag in _PORT_FLAGS]

    def _spawn(self, label: str, command: list[str], extra_env: dict[str, str]) -> Node:
        log = Path(self.temp_dir) / f"{label}.log"
        env = {**self.env, **extra_env,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        with open(log, "w") as handle:
            proc = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return Node(proc, log, label)

    def _wait_nodes(self, count: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in [self.head, *self.workers]:
                if node is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"{node.label} exited ({node.proc.returncode}):\n{node.log.read_text()[-3000:]}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {count} alive nodes in {timeout:.0f} s")


_ALIVE = """
import logging, ray
ray.init(logging_level=logging.ERROR, log_to_driver=False)
print("\\n".join(n["NodeID"] for n in ray.nodes() if n["Alive"]))
"""


def start(scratch: Path, env: dict[str, str], workers: int = 1) -> LocalCluster:
    """A running head + ``workers`` worker nodes; token auth on (as Ray >= 2.59 does by default)."""
    token = secrets.token_hex(16)
    base = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    base.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                 # A loaded 2-core machine can starve a raylet for seconds: do not declare a live
                 # node dead after the default ~15 s of missed health checks (a killed one is
                 # still detected within a minute).
                 "RAY_health_check_failure_threshold": "12"})
    scratch.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(scratch=scratch, env=base)
    try:
        cluster.start_head()
        for _ in range(workers):
            cluster.add_worker()
    except BaseException:
        cluster.stop()
        raise
    return cluster
