"""What the preemption watcher costs: training steps/s with and without it, side by side.

    .venv/bin/python benchmarks/bench_preemption.py                  # CPU, 2 Ray Train workers
    .venv/bin/python benchmarks/bench_preemption.py --steps 120 --rounds 3

Both sides are the real `octoray train` path (Ray Train + DeepSpeed ZeRO-2, 2 workers, the demo
GPTBigCode) with ``preemption_watch`` true and false; they alternate for ``--rounds`` rounds (this
machine's load drifts) and each side's figure is the median over rounds of its per-run median step
rate after ``--warmup`` steps, read from RUN_DIR/metrics.jsonl. With the watcher on, each worker
also runs its poll thread (Ray's drain state every ``--poll-s`` s; no metadata URL off a cloud).

Also measured in this process, without training: the per-step check (one attribute read, what the
step loop pays) and one poll of Ray's drain state (what the background thread pays every poll).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.sft import write_sft  # noqa: E402 - the same learnable rows the tests use


def steps_per_s(cfg_values: dict, warmup: int) -> float:
    """Run `octoray train` and return its median steps/s after ``warmup`` steps."""
    from octoray.config import from_mapping
    from octoray.training import driver
    from octoray.training.metrics import read_metrics
    from octoray.training.train_config import TrainConfig

    run_dir = driver.run(from_mapping(TrainConfig, cfg_values))
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > warmup]
    return statistics.median(1.0 / r["step_seconds"] for r in rows)


def check_seconds(n: int = 1_000_000) -> float:
    """Seconds per step-loop check of the watcher's notice (the line in worker._train_step)."""
    from octoray.training.preemption import PreemptionWatcher

    watcher = PreemptionWatcher()
    started = time.perf_counter()
    for _ in range(n):
        if watcher is not None and watcher.notice is not None:
            break
    return (time.perf_counter() - started) / n


def poll_seconds(n: int = 50) -> float:
    """Median seconds of one read of this node's drain state from the GCS (Ray must be up)."""
    import ray

    from octoray.training.preemption import draining_deadline

    node = ray.get_runtime_context().get_node_id()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        draining_deadline(node)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating on/off rounds")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--poll-s", type=float, default=5.0, help="the watcher's poll interval")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="octoray-bench-preempt-"))
    sft = write_sft(work / "sft", n=600)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    common = {"model": "demo", "demo_embd": 64, "demo_vocab": 512, "data": str(sft), "seq_len": 128,
              "num_workers": 2, "device": "cpu", "precision": "fp32", "micro_batch": 1, "batch_size": 4,
              "warmup_steps": 1, "max_steps": args.steps, "checkpoint_every": 10**6, "export": False,
              "keep_checkpoints": 1, "preemption_poll_s": args.poll_s, "preemption_notice_url": None}
    rates: dict[bool, list[float]] = {True: [], False: []}
    for round_no in range(args.rounds):
        order = (True, False) if round_no % 2 == 0 else (False, True)
        for watch in order:
            out = work / f"run-{round_no}-{'on' if watch else 'off'}"
            rates[watch].append(steps_per_s({**common, "out": str(out), "preemption_watch": watch}, args.warmup))
        print(f"round {round_no + 1}/{args.rounds}: watcher on {rates[True][-1]:.2f} steps/s, "
              f"off {rates[False][-1]:.2f} steps/s", flush=True)
    check, poll = check_seconds(), poll_seconds()
    ratios = [on / off for on, off in zip(rates[True], rates[False])]

    print(f"\nGPTBigCode demo (2 layers x 64), seq 128, 2 Ray Train workers (ZeRO-2, CPU), {args.steps} steps "
          f"per run (median after {args.warmup}), {args.rounds} alternating rounds, poll every {args.poll_s:g} s\n")
    print("| setup | steps/s (median of rounds) | vs watcher off (median of per-round ratios) |")
    print("|---|---:|---:|")
    print(f"| preemption_watch: false | {statistics.median(rates[False]):.2f} | — |")
    print(f"| preemption_watch: true | {statistics.median(rates[True]):.2f} | "
          f"{(statistics.median(ratios) - 1) * 100:+.1f}% |")
    print(f"\nper-step check: {check * 1e9:.0f} ns; one drain-state poll (GCS): {poll * 1e3:.2f} ms "
          f"(every {args.poll_s:g} s per worker, in its own thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
