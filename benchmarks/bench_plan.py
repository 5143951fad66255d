"""`octoray plan --calibrate` against the run it predicts, side by side in one script.

    .venv/bin/python benchmarks/bench_plan.py                      # the demo config, 100 steps
    .venv/bin/python benchmarks/bench_plan.py --steps 100 --calibrate 10 --rounds 2

Each round runs (alternately first) `octoray plan CONFIG data=SFT --calibrate K --json` (a K-step `octoray train` in a
scratch directory) and the real `octoray train CONFIG --data SFT max_steps=N` it plans, both
as subprocesses started the same way, and compares the plan's `wall_seconds` (and `seconds`, the
steps alone) with the measured wall time of the real run (and the sum of its `step_seconds`). The
issue's target: within 25 %. Prints a markdown table.

The SFT data is the demo's (`runs/demo/sft`, from `make demo`) unless `--data` names another.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OCTORAY = [sys.executable, "-m", "octoray.cli"]


def plan(config: str, data: str, steps: int, calibrate: int, extra: list[str]) -> dict:
    out = subprocess.run([*OCTORAY, "plan", config, f"data={data}", f"max_steps={steps}", *extra,
                          "--calibrate", str(calibrate), "--json"], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)


def train(config: str, data: str, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as run_dir:
        started = time.perf_counter()
        subprocess.run([*OCTORAY, "train", config, "--data", data, "--out", run_dir, f"max_steps={steps}", *extra],
                       capture_output=True, text=True, cwd=REPO, check=True)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_seconds": wall, "step_seconds": sum(r["step_seconds"] for r in rows if "step_seconds" in r)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/demo.yaml")
    parser.add_argument("--data", default="runs/demo/sft")
    parser.add_argument("--steps", type=int, default=100, help="steps of the real run the plan predicts")
    parser.add_argument("--calibrate", type=int, default=10, help="steps of the calibration run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("settings", nargs="*", help="train: key=value for both sides (e.g. checkpoint_every=100)")
    args = parser.parse_args()
    if not (REPO / args.data / "manifest.json").exists():
        sys.exit(f"bench_plan: no SFT data in {args.data} (run `make demo` first, or give --data)")
    print("| round | plan wall s | real wall s | wall ratio | plan steps s | real steps s | steps ratio |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for round_ in range(1, args.rounds + 1):
        # Alternate which side goes first: this machine's load drifts, so either order alone is biased.
        if round_ % 2:
            predicted = plan(args.config, args.data, args.steps, args.calibrate, args.settings)
            measured = train(args.config, args.data, args.steps, args.settings)
        else:
            measured = train(args.config, args.data, args.steps, args.settings)
            predicted = plan(args.config, args.data, args.steps, args.calibrate, args.settings)
        wall_ratio = predicted["wall_seconds"] / measured["wall_seconds"]
        ratios.append(wall_ratio)
        print(f"| {round_} | {predicted['wall_seconds']:.1f} | {measured['wall_seconds']:.1f} | {wall_ratio:.2f} | "
              f"{predicted['seconds']:.1f} | {measured['step_seconds']:.1f} | "
              f"{predicted['seconds'] / measured['step_seconds']:.2f} |", flush=True)
    print(f"\nmedian wall-time ratio (plan / real): {statistics.median(ratios):.2f} (target 0.75-1.25)")


if __name__ == "__main__":
    main()
