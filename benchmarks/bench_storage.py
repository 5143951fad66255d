"""Stage hand-off cost: the demo pipeline with ``out=`` a local directory vs ``out=s3://`` on a
loopback S3-compatible server (moto_server on 127.0.0.1), same settings, alternating rounds.

    .venv/bin/python benchmarks/bench_storage.py --rounds 1 [key=value ...]

Each round runs ``octoray pipeline jobs/demo.yaml`` twice in fresh subprocesses (each with its
own embedded Ray), once per side, in A-B / B-A order across rounds so drift on a shared machine
hits both sides alike. Reported: wall seconds per side (median over rounds), the per-stage split
from the pipeline's own banners, and the ratio s3 / local (target <= 1.25).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import s3server  # noqa: E402 - the same server the tests use

STAGE = re.compile(r"^== (.+?) -> ")


def run_once(out: str, extra: list[str], env: dict[str, str], log: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds of one pipeline run and seconds per stage (time between its banners)."""
    args = [sys.executable, "-m", "octoray.cli", "pipeline", "jobs/demo.yaml", f"out={out}", *extra]
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    with log.open("w") as handle:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # type: ignore[union-attr]
            handle.write(line)
            match = STAGE.match(line)
            if match:
                marks.append((match.group(1), time.perf_counter()))
        proc.wait()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed ({proc.returncode}); see {log}")
    ends = [t for _, t in marks[1:]] + [started + wall]
    return wall, {name: round(end - t, 1) for (name, t), end in zip(marks, ends)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--first", choices=("local", "s3"), default="local", help="side that runs first in round 1")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "humanevalpack"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both sides")
    args = parser.parse_args()
    extra = [*args.overrides, "--humanevalpack-dir", args.data_dir] if Path(args.data_dir).is_dir() else list(args.overrides)

    server = s3server.start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    env = {**os.environ, **server.env, "OCTORAY_CACHE": str(tmp / "cache")}
    results: dict[str, list[float]] = {"local": [], "s3": []}
    stages: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
    try:
        for i in range(args.rounds):
            order = ("local", "s3") if (i % 2 == 0) == (args.first == "local") else ("s3", "local")
            for side in order:
                out = str(tmp / f"local-{i}") if side == "local" else f"s3://{server.bucket()}/run"
                wall, split = run_once(out, extra, env, tmp / f"{side}-{i}.log")
                results[side].append(wall)
                stages[side].append(split)
                print(f"round {i + 1} {side:>5}: {wall:7.1f} s  {json.dumps(split)}", flush=True)
    finally:
        server.stop()
    local, s3 = statistics.median(results["local"]), statistics.median(results["s3"])
    print(f"\nmedian wall: local {local:.1f} s, s3 {s3:.1f} s, s3/local {s3 / local:.2f}x "
          f"(target <= 1.25x); logs in {tmp}")


if __name__ == "__main__":
    main()
