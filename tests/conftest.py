"""Shared fixtures. Tiers: unmarked tests are fast (no Ray, no compilers); ``ray`` tests start a
local Ray; ``toolchain`` tests compile and run code; ``slow`` tests train or run long slices.
Run the fast tier with ``make test-fast`` (or ``pytest -m "not ray and not toolchain and not slow"``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, SHARED


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared: HumanEvalPack copy, CommitPack reference lists, KubeRay CRDs."""
    if not SHARED.is_dir():
        pytest.skip(f"reference data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds on 2 cores).

    With its dashboard, as ``octoray tune`` requires (Ray Train cleans up stopped trials' placement
    groups through the State API).
    """
    import ray

    from octoray.cluster.connection import ensure_ray

    if not ray.is_initialized():
        ensure_ray(dashboard=True, num_cpus=2, log_to_driver=False,
                   runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield ray


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto_server) on 127.0.0.1 for the whole session.

    The process environment points at it (``AWS_ENDPOINT_URL`` + dummy keys), so octoray in this
    process, in subprocesses and in Ray workers started afterwards all reach it.
    """
    from tests.helpers import s3server

    server = s3server.start()
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
