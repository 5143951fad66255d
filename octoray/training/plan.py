"""``octoray plan CONFIG``: will a training run fit, how long will it take, what will it cost.

The command line: the config's ``train:`` section (keys as ``octoray train`` takes them), the
hardware (flags or a cluster launcher YAML's node type) and, with ``--calibrate``, a short real run
of ``octoray train`` whose measured step time replaces the MFU estimate. The numbers themselves
are :mod:`octoray.training.planning`'s.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any, Optional

from octoray.config import load_config, read_yaml, split_overrides
from octoray.errors import UserError
from octoray.training.calibration import Calibration, measure
from octoray.training.memory import parse_size
from octoray.training.planning import DEFAULT_MFU, LABEL_GPU_MEMORY, LABEL_GPU_TYPE, LABEL_PRICE, describe, host_memory, plan
from octoray.training.train_config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``octoray plan``."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="a train, tune or pipeline config: its train: section is planned")
    parser.add_argument("settings", nargs="*", metavar="key=value", help="train: keys to change first (as octoray train takes them)")
    parser.add_argument("--cluster", metavar="CLUSTER.yaml", help="cluster launcher YAML: GPUs per node, GPU memory, "
                        "type and hourly price from its GPU node type's labels (octoray-gpu-memory, ...)")
    parser.add_argument("--node-type", help="which node type of --cluster (default: the one with the most GPUs)")
    parser.add_argument("--gpus", type=int, help="data-parallel GPUs (default: the config's num_workers)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: --cluster's, else min(gpus, 8))")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 80GB (read as GiB, as GPU vendors mean it)")
    parser.add_argument("--gpu-type", help="GPU name for its peak bf16 FLOP/s, e.g. A100, H100 (default: --cluster's, else A100)")
    parser.add_argument("--mfu", type=float, help=f"model FLOPs utilisation the time assumes (default {DEFAULT_MFU})")
    parser.add_argument("--usd-per-hour", type=float, help="price of one node per hour (default: --cluster's label)")
    parser.add_argument("--calibrate", type=int, nargs="?", const=10, metavar="STEPS",
                        help="run octoray train itself for STEPS (10) steps on the cluster (or this machine) and "
                             "time the run at the measured step time; needs data=SFT_DIR")
    parser.add_argument("--calibrate-dir", metavar="DIR", help="RUN_DIR of the calibration run, kept afterwards "
                        "(default: a temporary directory, removed; on a multi-node cluster give one every node "
                        "sees: a shared path or a URI)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run ``octoray plan``: print the plan (text or ``--json``); exit 0 whether it fits or not."""
    positional, overrides = split_overrides(args.settings)
    if positional:
        raise UserError(f"unexpected argument(s): {' '.join(positional)} (give CONFIG.yaml and key=value)")
    cfg = load_train_section(args.config, overrides)
    hardware = hardware_from(args, cfg)
    measured = calibrate(cfg, args.calibrate, args.calibrate_dir) if args.calibrate is not None else None
    result = plan(cfg, **hardware, mfu=args.mfu, measured=measured)
    if cfg.data:
        from octoray.training.data_volume import data_volume

        result["data"] = data_volume(cfg)
        result["epochs"] = result["tokens"] / max(1, result["data"]["tokens"])
    print(json.dumps(result, indent=1) if args.json else describe(result))
    return 0


def load_train_section(path: str, overrides: list[str]) -> TrainConfig:
    """The config file's ``train:`` section (a flat file is a train: section) as a TrainConfig."""
    read_yaml(path)  # a missing or malformed file: one line
    return load_config(TrainConfig, path, overrides, section="train")


def hardware_from(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any]:
    """GPUs, memory, type and price from the flags, then the cluster YAML's node type."""
    node: dict[str, Any] = cluster_node_type(args.cluster, args.node_type) if args.cluster else {}
    gpus = args.gpus or cfg.num_workers
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    memory_text = args.gpu_memory or node.get("gpu_memory")
    if memory_text is None and cfg.device != "cpu":
        raise UserError("give the GPU memory: --gpu-memory 80GB, or --cluster CLUSTER.yaml whose GPU node type "
                        f"has the label {LABEL_GPU_MEMORY}")
    try:
        memory = parse_size(memory_text) if memory_text is not None else host_memory() // gpus
    except ValueError as exc:
        raise UserError(f"--gpu-memory: {exc}") from None
    per_node = args.gpus_per_node or node.get("gpus") or min(gpus, 8)
    return {"gpus": gpus, "gpus_per_node": int(per_node), "gpu_memory": memory,
            "gpu_type": args.gpu_type or node.get("gpu_type") or ("A100" if cfg.device != "cpu" else None),
            "usd_per_hour": args.usd_per_hour if args.usd_per_hour is not None else node.get("usd_per_hour")}


def cluster_node_type(path: str, name: Optional[str]) -> dict[str, Any]:
    """The GPU node type of a cluster launcher YAML: its GPUs and its octoray-* labels."""
    data = read_yaml(path)
    types = data.get("available_node_types") or {}
    gpu_types = {k: v for k, v in types.items() if (v.get("resources") or {}).get("GPU")}
    if name is not None:
        if name not in types:
            raise UserError(f"{path}: no node type '{name}' (node types: {', '.join(types)})")
        chosen = name
    elif gpu_types:
        chosen = max(gpu_types, key=lambda k: gpu_types[k]["resources"]["GPU"])
    else:
        raise UserError(f"{path}: no node type with GPUs in available_node_types")
    labels = types[chosen].get("labels") or {}
    price = labels.get(LABEL_PRICE)
    try:
        usd = float(price) if price is not None else None
    except ValueError:
        raise UserError(f"{path}: node type {chosen}: label {LABEL_PRICE} must be a number, got {price!r}") from None
    return {"node_type": chosen, "gpus": (types[chosen].get("resources") or {}).get("GPU"),
            "gpu_memory": labels.get(LABEL_GPU_MEMORY), "gpu_type": labels.get(LABEL_GPU_TYPE), "usd_per_hour": usd}

def calibrate(cfg: TrainConfig, steps: int, run_dir: Optional[str] = None) -> Calibration:
    """Run ``octoray train`` itself for ``steps`` steps (the real worker loop: Ray Train, DeepSpeed,
    the packed data, gloo/NCCL) into ``run_dir`` (default: a temporary directory, removed after),
    and read what it measured (:func:`octoray.training.calibration.measure`). Never the config's own
    ``out``: a complete calibration run there would be taken for the finished training run.

    The run is a child process started as ``octoray train`` is, so its start-up and tail hold what
    every run pays besides its steps (the interpreter and imports, joining or starting Ray, leaving
    it) measured the way a run's own is (run inside this process, the calibration's start-up differed
    from a real run's, and the wall time predicted for the demo's 100 steps came out 1.3-1.6x).
    """
    import shutil
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from octoray.config import dump_yaml
    from octoray.storage.layout import METRICS_FILE
    from octoray.storage.locations import location
    from octoray.storage.stage_dirs import read_manifest
    from octoray.training.metrics import read_metrics

    if cfg.data is None:
        raise UserError("--calibrate runs real training steps: give the SFT data as data=SFT_DIR "
                        "(e.g. data=runs/demo/sft)")
    if steps < 2:
        raise UserError(f"--calibrate needs at least 2 steps (the first one is warm-up), got {steps}")
    scratch = run_dir or tempfile.mkdtemp(prefix="octoray-calibrate-")
    # A checkpoint every third step (or the config's, if more often; at least every second, so the
    # gaps around a checkpoint row are told apart from plain ones): a few saves to time.
    trial = replace(cfg, out=scratch, max_steps=steps, warmup_steps=min(cfg.warmup_steps, steps - 1),
                    checkpoint_every=min(cfg.checkpoint_every, max(2, steps // 3)), check_fit=False, hparams=None,
                    from_best_checkpoint=False, fail_at_step=0)
    try:
        with tempfile.TemporaryDirectory(prefix="octoray-calibrate-config-") as config_dir:
            config = Path(config_dir) / "train.yaml"
            config.write_text(dump_yaml(trial))
            started = time.time()  # Unix time, as the rows' own "time"
            # Its output goes to stderr: with --json, stdout holds the plan's one object.
            done = subprocess.run([sys.executable, "-m", "octoray.cli", "train", str(config)], stdout=sys.stderr,
                                  check=False)
            ended = time.time()
        if done.returncode != 0:
            raise UserError(f"--calibrate: the calibration run (octoray train, {steps} steps) failed with exit "
                            f"code {done.returncode}; its log is above")
        rows = [row for row in read_metrics(location(scratch) / METRICS_FILE) if "step_seconds" in row]
        manifest = read_manifest(scratch) or {}
        if not rows:
            raise UserError(f"--calibrate: the calibration run (octoray train, {steps} steps) logged no steps")
    finally:
        if run_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return measure(rows, started=started, ended=ended, checkpoint_every=trial.checkpoint_every,
                   workers=cfg.num_workers, micro_batch=cfg.micro_batch, batch_size=cfg.batch_size,
                   seq_len=cfg.seq_len, train_sequences=manifest.get("rows"), run_dir=run_dir)
