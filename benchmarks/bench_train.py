"""Training throughput: octoray's Ray Train + DeepSpeed loop vs a plain single-process PyTorch loop.

    .venv/bin/python benchmarks/bench_train.py            # CPU (or GPU when CUDA is present)
    .venv/bin/python benchmarks/bench_train.py --steps 100 --rounds 3 --zero-stages 2

Both sides train the same GPTBigCode on the same packed data with AdamW, same micro-batch, same
threads (CPU) or the same GPU, and report the median tokens/s over the steps after warmup. The
sides alternate for ``--rounds`` rounds (this machine's load drifts; alternating spreads it over
both sides) and the overhead is the median of the per-round ratios. The
octoray side is the real `octoray train` code path (``training.run``: Ray Data packing, TorchTrainer,
DeepSpeed engine, per-step metrics), 1 worker, at ZeRO-0 and ZeRO-2; its tokens/s is read from
RUN_DIR/metrics.jsonl (step time, so checkpoints and start-up are excluded on both sides).

On CPU the model is the tiny demo GPTBigCode; with CUDA it is a ~1B GPTBigCode from a random init
in bf16 (ZeRO-2), and MFU = 6 * N * tokens/s / peak bf16 FLOP/s is printed as well.
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

from tests.helpers.sft import sft_rows, write_sft  # noqa: E402 - the same learnable rows the tests use


def plain_pytorch_tokens_per_s(model_dir: str, packed: dict, micro_batch: int, steps: int, warmup: int,
                               cuda: bool, threads: int) -> tuple[float, int]:
    """The baseline: one process, AdamW, bf16 autocast-free (weights already bf16 on GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.as_tensor(packed["input_ids"])
    labels = torch.as_tensor(packed["labels"])
    rates = []
    n = ids.shape[0]
    for step in range(steps):
        lo = (step * micro_batch) % max(1, n - micro_batch)
        x, y = ids[lo:lo + micro_batch].to(device), labels[lo:lo + micro_batch].to(device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # sync, like the octoray loop's loss all-reduce
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            rates.append(x.numel() / (time.perf_counter() - start))
    n_params = sum(p.numel() for p in model.parameters())
    return statistics.median(rates), n_params


def octoray_tokens_per_s(cfg_values: dict, warmup: int) -> tuple[float, float | None]:
    """Run the real `octoray train` path and read its per-step tokens/s and MFU."""
    from octoray.config import from_mapping
    from octoray.training import driver
    from octoray.training.metrics import read_metrics
    from octoray.training.train_config import TrainConfig

    cfg = from_mapping(TrainConfig, cfg_values)
    run_dir = driver.run(cfg)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > warmup]
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    return statistics.median(r["tokens_per_s"] for r in rows), (statistics.median(mfus) if mfus else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/octoray rounds")
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[0, 2], help="ZeRO stages to run (CPU)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--cpus", type=int, default=2, help="CPU threads for both sides (CPU mode)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=2, help="CPU model depth (the demo model's is 2)")
    parser.add_argument("--n-embd", type=int, default=128, help="CPU model width")
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()

    import ray
    import torch

    from octoray.modeling import build_demo_model, load_tokenizer
    from octoray.training.packing import pack_examples
    from octoray.training.metrics import mfu, peak_flops

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="octoray-bench-"))
    sft = write_sft(work / "sft", n=3000 if cuda else 600)
    rows = sft_rows(3000 if cuda else 600)
    texts = [r["prompt"] + r["completion"] for r in rows]
    if cuda:  # ~1.1B GPTBigCode: 24 layers x 2048 hidden, multi-query attention
        shape = {"n_layer": 24, "n_head": 16, "n_embd": 2048, "n_positions": 2048, "vocab_size": 2048}
        seq_len, micro_batch = 2048, 4
    else:
        shape = {"n_layer": args.n_layer, "n_head": 4, "n_embd": args.n_embd,
                 "n_positions": max(512, args.seq_len), "vocab_size": 1024}
        seq_len, micro_batch = args.seq_len, args.micro_batch
    model_dir = build_demo_model(work / "model", texts, **shape)
    packed = pack_examples([r["prompt"] for r in rows], [r["completion"] for r in rows],
                           load_tokenizer(str(model_dir)), seq_len)

    ray.init(num_cpus=None if cuda else args.cpus, include_dashboard=False, log_to_driver=False)
    common = {"model": str(model_dir), "data": str(sft), "seq_len": seq_len, "num_workers": 1,
              "cpus_per_worker": 1 if cuda else args.cpus, "device": "gpu" if cuda else "cpu",
              "precision": "bf16" if cuda else "fp32", "micro_batch": micro_batch, "batch_size": micro_batch,
              "lr": 1e-4, "warmup_steps": 1, "max_steps": args.steps, "checkpoint_every": 10**6,
              "export": False, "keep_checkpoints": 1}
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    stages = (2,) if cuda else tuple(args.zero_stages)
    # Rounds alternate the sides so that load drifting on a shared machine hits both alike; each
    # side's figure is the median over rounds of its per-run median step rate.
    per_round: dict[str, list[float]] = {}
    mfus: dict[str, float | None] = {}
    baseline = "plain PyTorch loop, 1 process (baseline)"
    for round_no in range(args.rounds):
        tps, n_params = plain_pytorch_tokens_per_s(str(model_dir), packed, micro_batch, args.steps,
                                                   args.warmup, cuda, args.cpus)
        per_round.setdefault(baseline, []).append(tps)
        mfus[baseline] = mfu(n_params, tps, peak)
        for stage in stages:
            name = f"octoray train: Ray Train + DeepSpeed ZeRO-{stage}, 1 worker"
            run_dir = work / f"run-{round_no}-zero{stage}"
            tps, run_mfu = octoray_tokens_per_s({**common, "zero_stage": stage, "out": str(run_dir)}, args.warmup)
            per_round.setdefault(name, []).append(tps)
            mfus[name] = run_mfu
        print(f"round {round_no + 1}/{args.rounds}: " +
              ", ".join(f"{name.split(':')[-1].strip()} {rates[-1]:,.0f} tok/s" for name, rates in per_round.items()),
              flush=True)

    device = torch.cuda.get_device_name() if cuda else f"CPU, {args.cpus} threads"
    print(f"\nmodel: GPTBigCode {n_params / 1e6:.1f}M params, seq {seq_len}, micro-batch {micro_batch}, "
          f"{args.steps} steps per run (median after {args.warmup}), {args.rounds} alternating rounds, {device}\n")
    print("| setup | tokens/s (median of rounds) | time/token vs baseline (median of per-round ratios) | MFU |")
    print("|---|---:|---:|---:|")
    base_rates = per_round[baseline]
    for name, rates in per_round.items():
        ratios = [b / r for b, r in zip(base_rates, rates)]
        overhead = f"{(statistics.median(ratios) - 1) * 100:+.1f}%" if name != baseline else "—"
        print(f"| {name} | {statistics.median(rates):,.0f} | {overhead} | "
              f"{f'{mfus[name]:.1%}' if mfus[name] else 'n/a (CPU)'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
