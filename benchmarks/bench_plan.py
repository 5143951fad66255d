"""`octoray plan --calibrate` against the run it predicts, side by side in one script.

    .venv/bin/python benchmarks/bench_plan.py                      # the demo config, 100 steps, 3 rounds
    .venv/bin/python benchmarks/bench_plan.py --steps 100 --calibrate 10 --rounds 2

First one untimed warm-up (`octoray train` for 2 steps): whichever side runs first otherwise pays
the cold start (the OS page cache of torch/deepspeed/ray, Ray's first start: ~45 s here). Then
each round runs `octoray plan CONFIG data=SFT max_steps=N --calibrate K --json` (a K-step
`octoray train` in a scratch directory) and the real `octoray train CONFIG --data SFT
max_steps=N` it plans, both as subprocesses started the same way, the order alternating from
round to round (this machine's load drifts). It compares the plan's `wall_seconds` with the real
run's measured wall time, the plan's `seconds` (the steps alone) with the sum of the real run's
`step_seconds`, and the plan's start-up + tail with the real run's (its rows' times against the
moments its process started and ended). The issue's target: wall within 25 %. Prints the markdown
table BENCHMARKS.md shows, with the 1-minute load average around each side (the larger of its
start and end), and the medians over rounds.

The SFT data is the demo's (`runs/demo/sft`, from `make demo`) unless `--data` names another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OCTORAY = [sys.executable, "-m", "octoray.cli"]
LOADS: list[tuple[str, float, float]] = []


def plan(config: str, data: str, steps: int, calibrate: int, extra: list[str]) -> dict:
    """The plan of the real run, calibrated by a ``calibrate``-step run."""
    out = _run([*OCTORAY, "plan", config, f"data={data}", f"max_steps={steps}", *extra,
                "--calibrate", str(calibrate), "--json"])
    result = json.loads(out.stdout)
    parts = result["wall_parts"]
    return {"wall": result["wall_seconds"], "steps": result["seconds"], "fixed": parts["startup"] + parts["tail"],
            "detail": {"wall_parts": parts, "calibration": result["calibration"]}}


def train(config: str, data: str, steps: int, extra: list[str]) -> dict:
    """The real run: its wall time, the sum of its step times, and its start-up + tail."""
    from octoray.training.calibration import measure

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as run_dir:
        started = time.time()
        _run([*OCTORAY, "train", config, "--data", data, "--out", run_dir, f"max_steps={steps}", *extra])
        ended = time.time()
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "step_seconds" in row]
    # Start-up and tail as the plan splits them (every=1: only the ends matter here).
    parts = measure(rows, started=started, ended=ended, checkpoint_every=1, workers=1, micro_batch=1, batch_size=1,
                    seq_len=1, train_sequences=None)
    return {"wall": ended - started, "steps": sum(row["step_seconds"] for row in rows),
            "fixed": parts.startup_seconds + parts.tail_seconds,
            "detail": {"startup_seconds": parts.startup_seconds, "tail_seconds": parts.tail_seconds,
                       "step_seconds": [row["step_seconds"] for row in rows],
                       "data_seconds": [row.get("data_seconds") for row in rows]}}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    load_before = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    LOADS.append((command[3], load_before, os.getloadavg()[0]))  # plan/train: 1-minute load before and after
    if done.returncode != 0:
        sys.exit(f"bench_plan: {' '.join(command[2:])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/demo.yaml")
    parser.add_argument("--data", default="runs/demo/sft")
    parser.add_argument("--steps", type=int, default=100, help="steps of the real run the plan predicts")
    parser.add_argument("--calibrate", type=int, default=10, help="steps of the calibration run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--details", metavar="FILE.jsonl", help="also write each round's parts (the plan's calibration, "
                        "the real run's step times) as one JSON line")
    parser.add_argument("settings", nargs="*", help="train: key=value for both sides (e.g. checkpoint_every=100)")
    args = parser.parse_args()
    if not (REPO / args.data / "manifest.json").exists():
        sys.exit(f"bench_plan: no SFT data in {args.data} (run `make demo` first, or give --data)")
    # Untimed: the first run after a while reads torch/deepspeed/ray from disk and starts Ray cold.
    train(args.config, args.data, 2, [*args.settings, "warmup_steps=0"])
    print("| round | first | load plan / real | plan wall s | real wall s | wall ratio | plan steps s | real steps s | "
          "steps ratio | plan start-up+tail s | real start-up+tail s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    walls, steps = [], []
    for round_ in range(1, args.rounds + 1):
        if round_ % 2:
            predicted = plan(args.config, args.data, args.steps, args.calibrate, args.settings)
            measured = train(args.config, args.data, args.steps, args.settings)
        else:
            measured = train(args.config, args.data, args.steps, args.settings)
            predicted = plan(args.config, args.data, args.steps, args.calibrate, args.settings)
        walls.append(predicted["wall"] / measured["wall"])
        steps.append(predicted["steps"] / measured["steps"])
        load = {side: max(before, after) for side, before, after in LOADS[-2:]}  # 1-minute, at its start or end
        print(f"| {round_} | {'plan' if round_ % 2 else 'real'} | {load['plan']:.1f} / {load['train']:.1f} | "
              f"{predicted['wall']:.1f} | "
              f"{measured['wall']:.1f} | {walls[-1]:.2f} | {predicted['steps']:.1f} | {measured['steps']:.1f} | "
              f"{steps[-1]:.2f} | {predicted['fixed']:.1f} | {measured['fixed']:.1f} |", flush=True)
        if args.details:
            with open(args.details, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"round": round_, "plan": predicted, "real": measured,
                                         "load": LOADS[-2:]}) + "\n")
    print(f"\nmedian over {args.rounds} rounds, plan / real: wall {statistics.median(walls):.2f} (target 0.75-1.25), "
          f"steps {statistics.median(steps):.2f}")


if __name__ == "__main__":
    main()
