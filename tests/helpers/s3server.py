"""A real S3-compatible server on 127.0.0.1 for tests: ``moto_server`` (moto's server mode, the
one Ray's own test-suite uses for S3), reached through ``AWS_ENDPOINT_URL`` with dummy keys.

Used as a pytest fixture (``s3_server`` in conftest.py); :func:`start` also works from a script
(benchmarks/bench_storage.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    """A running moto_server: its endpoint and the environment that points clients at it."""

    proc: subprocess.Popen
    endpoint: str
    env: dict[str, str] = field(default_factory=dict)

    def bucket(self, prefix: str = "octoray") -> str:
        """Create a fresh bucket and return its name (S3 wants >= 3 lower-case characters)."""
        import pyarrow.fs as pafs

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.filesystem().create_dir(name)
        assert self.filesystem().get_file_info(name).type == pafs.FileType.Directory
        return name

    def filesystem(self):
        """A pyarrow S3 file system on this server (independent of octoray's own code)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region="us-east-1",
                                 access_key="testing", secret_key="testing", allow_bucket_creation=True)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``bucket/prefix``, relative to the bucket."""
        import pyarrow.fs as pafs

        base = f"{bucket}/{prefix}".rstrip("/")
        infos = self.filesystem().get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path[len(bucket) + 1:] for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        """Stop the server (its own process only)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(port: int | None = None) -> S3Server:
    """Start ``moto_server`` on 127.0.0.1 and wait until it answers."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: pip install 'moto[server]' (the dev extra installs it)")
    port = port or free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start within 60 s")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           # Ray's own S3 paths go through boto/pyarrow too: same endpoint.
           "AWS_EC2_METADATA_DISABLED": "true"}
    return S3Server(proc, endpoint, env)


if __name__ == "__main__":  # manual use: python tests/helpers/s3server.py -> prints the env to export
    server = start()
    for key, value in server.env.items():
        print(f"export {key}={value}")
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()
    os._exit(0)
