"""What the sandbox builds once per cache dir and shares: a key per toolchain, a lock per kind.

Everything built here is made by trusted code from our own inputs (never a sample's), under an
exclusive file lock so concurrent Sandboxes (Ray actors of one node) build it once, and is only
read by samples afterwards.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def key_of(*parts: str) -> str:
    """A short hash of what the build depends on (toolchain versions, flags, sources)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@contextmanager
def build_lock(cache_dir: Path, kind: str) -> Iterator[Path]:
    """Hold ``<cache_dir>/<kind>.lock`` and yield ``<cache_dir>/<kind>/`` (created, mode 755:
    samples may read, not write, what is built there)."""
    folder = cache_dir / kind
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o755)
    with open(cache_dir / f"{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder
