"""`octoray plan`'s memory per worker against the peak real `octoray train` runs measure.

    .venv/bin/python benchmarks/bench_memory.py                 # CPU: 4 setups, 2 workers each
    .venv/bin/python benchmarks/bench_memory.py --steps 6 --layers 4 --embd 512

Each setup (ZeRO-2, ZeRO-3, each with and without LoRA and gradient checkpointing) is planned
(`octoray.training.planning.plan`, the numbers `octoray plan` prints) and then trained for real
(`octoray train` in a subprocess: Ray Train, DeepSpeed, the packed data), whose `metrics.jsonl`
holds `peak_memory_bytes`, the largest any worker measured (CPU: peak resident set growth since
the process group came up; GPU: `torch.cuda.max_memory_allocated`). The issue's target: the
prediction within 20 % of the measurement. Prints a markdown table.

The model is the demo GPTBigCode at `--layers` x `--embd`, built from the SFT data (the demo's
`runs/demo/sft` unless `--data` names another), so its states outweigh what every worker process
holds whatever the model (measured by the `--layers 1 --embd 32` row: `octoray plan`'s CPU
runtime).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETUPS = {
    "ZeRO-2": {"zero_stage": 2},
    "ZeRO-2 + checkpointing": {"zero_stage": 2, "gradient_checkpointing": True},
    "ZeRO-2 + LoRA": {"zero_stage": 2, "lora": True},
    "ZeRO-3": {"zero_stage": 3},
    "ZeRO-3 + checkpointing": {"zero_stage": 3, "gradient_checkpointing": True},
    "ZeRO-3 + LoRA": {"zero_stage": 3, "lora": True},
}


def settings(changes: dict) -> list[str]:
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in changes.items()]


def measure(config: str, data: str, words: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as run_dir:
        subprocess.run([sys.executable, "-m", "octoray.cli", "train", config, "--data", data, "--out", run_dir,
                        "export=false", "check_fit=false", *words], capture_output=True, text=True, cwd=REPO, check=True)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(row.get("peak_memory_bytes", 0) for row in rows)


def main() -> None:
    from octoray.config import load_config
    from octoray.training.planning import host_memory, plan
    from octoray.training.train_config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/demo.yaml")
    parser.add_argument("--data", default="runs/demo/sft")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--only", nargs="*", help="setup names to run (default: all)")
    args = parser.parse_args()
    if not (REPO / args.data / "manifest.json").exists():
        sys.exit(f"bench_memory: no SFT data in {args.data} (run `make demo` first, or give --data)")
    base = {"demo_layers": args.layers, "demo_embd": args.embd, "seq_len": args.seq_len, "max_steps": args.steps,
            "warmup_steps": 1, "checkpoint_every": args.steps, "lora_targets": "[c_attn,c_proj]"}
    print(f"model: demo GPTBigCode {args.layers} x {args.embd}, seq_len {args.seq_len}, {args.steps} steps\n")
    print("| setup | predicted MiB | measured MiB | predicted / measured |")
    print("|---|---|---|---|")
    for name, changes in SETUPS.items():
        if args.only and name not in args.only:
            continue
        words = settings({**base, **changes})
        cfg = load_config(TrainConfig, args.config, words, section="train")
        cfg = replace(cfg, device="cpu")
        predicted = plan(cfg, gpus=cfg.num_workers, gpu_memory=host_memory(), gpus_per_node=cfg.num_workers)
        measured = measure(args.config, args.data, words)
        total = predicted["per_gpu_bytes"]
        print(f"| {name} | {total / 2**20:.0f} | {measured / 2**20:.0f} | {total / measured:.2f} |", flush=True)


if __name__ == "__main__":
    main()
