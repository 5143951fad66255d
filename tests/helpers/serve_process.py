"""``octoray serve`` as a child process for the serving tests: started on the tests' Ray, waited
for until it answers, stopped with Ctrl-C (SIGINT) as a user stops it."""

from __future__ import annotations

import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from tests.helpers import OCTORAY, REPO_ROOT


@contextmanager
def serve_process(model_dir: Path, port: int, ray_address: str, log: Path, is_up: Callable[[], bool],
                  args: tuple[str, ...] = (), env: Optional[dict[str, str]] = None) -> Iterator[subprocess.Popen]:
    """``octoray serve MODEL --port PORT ray_address=... ARGS``, once ``is_up()`` (an OSError counts
    as not yet); fails the test with the log's tail when it exits or takes over 240 s."""
    with log.open("w") as out:
        proc = subprocess.Popen([*OCTORAY, "serve", str(model_dir), "--port", str(port), f"ray_address={ray_address}",
                                 *args], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 240
    while True:
        try:
            if is_up():
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"octoray serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
