"""What the tests share: paths, the octoray command line, and (in the submodules) git repositories
built commit by commit (``gitrepo``), ``sft/`` directories (``sft``), a moto S3 server
(``s3server``), an instance-metadata server (``metadata``), multi-node Ray clusters on this machine (``raycluster``) and toolchain doubles
(``toolchains``). Fixtures are in ``tests/conftest.py``; test modules import helpers only from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("OCTORAY_SHARED", REPO_ROOT.parent / "shared"))
OCTORAY = [sys.executable, "-m", "octoray.cli"]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    """Run ``octoray ARGS`` in a subprocess, as a user would; returns CompletedProcess."""
    return subprocess.run([*OCTORAY, *map(str, args)], cwd=cwd or REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
