"""Random search vs Optuna's TPE, both with ASHA, on the same budget: the best validation loss each
reaches and the trial-steps (optimizer steps summed over trials) each spends.

    .venv/bin/python benchmarks/bench_tune.py --trials 8 --steps 8 --seeds 0 1

Both sides are the real ``octoray tune`` code path (``tuning.run``: Ray Data packing, Ray Tune with
ASHA, one TorchTrainer + DeepSpeed per trial) on the demo-size GPTBigCode (2 layers, hidden 64,
vocabulary 1024) and the learnable rows the tests use, with the same search space, trial budget,
data and model; only ``search`` differs. On 2 CPUs one trial runs at a time, so the order in which
results reach the searcher and ASHA is fixed and the figures below do not depend on the machine's
load (wall time does). Each seed seeds the searcher (random sampling / TPE); the two searchers
alternate in each seed's round. Prints a markdown table per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.sft import write_sft  # noqa: E402 - the same learnable rows the tests use

DEMO_MODEL = {"model": "demo", "demo_layers": 2, "demo_embd": 64, "demo_vocab": 1024, "seq_len": 128,
              "device": "cpu", "precision": "fp32", "micro_batch": 1, "batch_size": 2, "zero_stage": 2}


def one_search(search: str, seed: int, sft: Path, work: Path, trials: int, steps: int) -> dict:
    """One ``octoray tune`` run; returns its best val_loss, trial-steps and trial outcomes."""
    from octoray.training import tuning
    from octoray.config import from_mapping
    from octoray.training.train_config import TrainConfig

    train = from_mapping(TrainConfig, {**DEMO_MODEL, "checkpoint_every": max(1, steps // 4)})
    tcfg = from_mapping(tuning.TuneConfig, {
        "data": str(sft), "out": str(work / f"{search}-{seed}"), "search": search, "seed": seed,
        "lr": [1e-4, 3e-2], "warmup_steps": [0, 1, 2], "weight_decay": [0.0, 0.1],
        "num_samples": trials, "max_steps": steps, "num_workers": 1, "val_fraction": 0.1,
        "grace_period": 1, "reduction_factor": 2})
    started = time.perf_counter()
    out = tuning.run(tcfg, train)
    best = json.loads((out / "best.json").read_text())
    return {"search": search, "seed": seed, "best_val_loss": best["best"]["val_loss"],
            "trial_steps": best["trial_steps"], "wall_s": time.perf_counter() - started,
            "stopped": sum(t["status"] == "stopped by ASHA" for t in best["trials"]),
            "errors": sum(t["status"] == "error" for t in best["trials"]),
            "best_config": best["best"]["config"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per search")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per trial (max)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from octoray.cluster.connection import ensure_ray

    ensure_ray(dashboard=True, log_to_driver=False)  # octoray tune needs the State API
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        work = Path(tmp)
        sft = write_sft(work / "sft", n=300)
        for i, seed in enumerate(args.seeds):
            order = ("random", "optuna") if i % 2 == 0 else ("optuna", "random")
            for search in order:
                row = one_search(search, seed, sft, work, args.trials, args.steps)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(f"\n{args.trials} trials x up to {args.steps} steps, ASHA (grace 1 report, reduction 2, "
          f"{max(1, args.steps // 4)} steps per report), seeds {args.seeds}\n")
    print("| search | seed | best val_loss | trial-steps | stopped by ASHA | wall s | best config |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["best_config"].items())
        print(f"| {r['search']} | {r['seed']} | {r['best_val_loss']:.4f} | {r['trial_steps']} | {r['stopped']} | "
              f"{r['wall_s']:.0f} | {config} |")
    print("\n| search | mean best val_loss | mean trial-steps |\n|---|---:|---:|")
    for search in ("random", "optuna"):
        mine = [r for r in rows if r["search"] == search]
        print(f"| {search} | {statistics.fmean(r['best_val_loss'] for r in mine):.4f} | "
              f"{statistics.fmean(r['trial_steps'] for r in mine):.1f} |")


if __name__ == "__main__":
    main()
