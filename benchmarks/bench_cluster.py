"""Benchmark: ``octoray submit`` against the plain ``ray job submit`` CLI (the baseline).

1. Upload: the working_dir package each would send for this checkout (bytes, files), built with
   Ray's own packaging code -- octoray's excludes vs Ray's defaults (``.gitignore`` honoured by both).
2. Latency: wall time from the command starting to it returning after a trivial job
   (``python -m octoray.cli --version``) finished, on a private local head with token auth;
   median of ``--repeats`` runs each, alternating.

    .venv/bin/python benchmarks/bench_cluster.py [--repeats 3]

Prints a markdown table. The machine's load average is printed too: on a shared machine it moves
the latency numbers more than either tool does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from octoray.cluster import jobs_client as jobs  # noqa: E402

JOB = "python -m octoray.cli --version"


def package_size(root: Path, excludes: list[str]) -> tuple[int, int]:
    """(bytes, files) of the zip Ray's client uploads for ``root``: Ray's default excludes
    (.git, .venv, ...) + ``excludes``, as ``upload_working_dir_if_needed`` combines them."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "pkg.zip"
        create_package(str(root), target, include_gitignore=True,
                       excludes=ray_constants.get_runtime_env_default_excludes() + excludes)
        with zipfile.ZipFile(target) as zf:
            files = sum(1 for info in zf.infolist() if not info.is_dir())
        return target.stat().st_size, files


def checkout_with_outputs(tmp: Path) -> Path:
    """A copy of the checkout after a local demo run: 20 MiB of stage output in sft/."""
    copy = tmp / "checkout"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", ".toolchains"))
    (copy / "sft").mkdir(exist_ok=True)
    (copy / "sft" / "part-00000.parquet").write_bytes(os.urandom(20 * 2**20))
    return copy


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-latency", action="store_true", help="only the upload sizes (no Ray head)")
    args = parser.parse_args()

    import logging

    logging.getLogger("ray").setLevel(logging.ERROR)
    sizes = {"this checkout": (package_size(REPO, list(jobs.DEFAULT_EXCLUDES)), package_size(REPO, []))}
    with tempfile.TemporaryDirectory() as tmp:
        dirty = checkout_with_outputs(Path(tmp))
        sizes["checkout + 20 MiB sft/ output"] = (package_size(dirty, list(jobs.DEFAULT_EXCLUDES)),
                                                   package_size(dirty, []))
    if args.no_latency:
        return _table(sizes, None, None, args.repeats)

    # The head helpers of the tests: private ports, temp dir and process group, token auth on.
    from tests.cluster.test_jobs_client import _kill_head, _start_head, _wait_for_head

    token = os.urandom(16).hex()
    for attempt in range(3):
        head, temp_dir, url = _start_head(token)
        if _wait_for_head(url, head, Path(temp_dir) / "head.log", timeout_s=150, last_try=attempt == 2):
            break
        _kill_head(head, temp_dir)
    try:
        bin_dir = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        ours = [sys.executable, "-m", "octoray.cli", "submit", "--pip", "none", "--address", url,
                "--token", token, "--entrypoint", JOB]
        # The baseline needs RAY_AUTH_MODE=token on the client too, or it sends no token.
        base_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_API_SERVER_ADDRESS": url}
        baseline = [str(bin_dir / "ray"), "job", "submit", "--working-dir", str(REPO), "--", *JOB.split()]
        timed(ours, env)  # warm-up: the first job also starts the cluster's first worker processes
        ours_s, base_s = [], []
        for _ in range(args.repeats):
            ours_s.append(timed(ours, env))
            base_s.append(timed(baseline, base_env))
    finally:
        _kill_head(head, temp_dir)

    _table(sizes, ours_s, base_s, args.repeats)


def _table(sizes: dict, ours_s: list[float] | None, base_s: list[float] | None, repeats: int) -> None:
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| measure | octoray submit | ray job submit (baseline) |")
    print("|---|---|---|")
    for name, ((ob, of), (bb, bf)) in sizes.items():
        print(f"| upload package, {name} | {ob / 1024:.0f} KiB, {of} files | {bb / 1024:.0f} KiB, {bf} files |")
    if ours_s and base_s:
        print(f"| trivial job, submit to exit, median of {repeats} (s) | {statistics.median(ours_s):.1f} "
              f"(min {min(ours_s):.1f}) | {statistics.median(base_s):.1f} (min {min(base_s):.1f}) |")


if __name__ == "__main__":
    main()
