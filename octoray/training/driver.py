"""``octoray train``: fine-tune a causal LM on CommitPackFT with Ray Train + DeepSpeed.

Reads top to bottom: the config, :func:`run` (the driver: check inputs, pick the model, build the
packed Ray datasets, :func:`fit`, plot, manifest), then :func:`train_loop_per_worker` (what each
Ray Train worker runs: DeepSpeed engine, resume, the step loop, checkpoints, export) and its helpers.

``octoray tune`` drives the very same :func:`fit` / :func:`train_loop_per_worker` per trial.

RUN_DIR layout: Ray Train's run (``checkpoint_<step>/`` with every rank's DeepSpeed shard,
Ray's own state files), ``metrics.jsonl``, ``tb/``, ``loss.png``, ``config.yaml``, ``model/``
(Hugging Face format, tokenizer included), ``base_model/`` (demo only) and ``manifest.json`` last.
RUN_DIR may be a local path, a shared mount or an object-store URI (``s3://bucket/runs/x``); on a
cluster it must be one every node sees. With a URI, Ray Train writes checkpoints straight to the
bucket (``RunConfig(storage_path=..., storage_filesystem=...)``); rank 0 keeps ``metrics.jsonl`` and
``tb/`` in a node-local scratch directory and uploads them at every checkpoint and at the end, and
``model/`` is uploaded once exported. Workers load a model given as a URI from a per-node cache.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from octoray.config import option, to_dict
from octoray.errors import UserError
from octoray.cluster.node_types import require_feasible, resource_problems
from octoray.storage.stage_dirs import is_complete, require_stage_output, write_manifest, write_resolved_config
from octoray.progress import progress_bar
from octoray.storage.locations import Location, ObjectPath, display, local_copy, location, scratch_dir, upload_dir
from octoray.training.metrics import LOSS_PNG, METRICS_FILE, MetricsLog, mfu, peak_flops, plot_loss

STAGE = "train"
#: DeepSpeed checkpoint tag inside every Ray checkpoint directory.
CKPT_TAG = "ds"
#: octoray's own resume state (step, tokens) next to the DeepSpeed shards.
STATE_FILE = "octoray_state.json"
#: Marker that makes the ``fail_at_step`` test hook fire only once per run directory.
FAIL_MARKER = ".fail_at_step_done"
DEMO = "demo"


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``octoray train`` reads; the ``train:`` section of a jobs/ YAML file."""

    data: Optional[str] = option(None, "sft/ directory written by 'octoray filter'; a path or a URI", metavar="SFT_DIR")
    out: Optional[str] = option(None, "run directory RUN_DIR: checkpoints, metrics, model/; "
                                      "a path or a URI (s3://bucket/prefix)", metavar="RUN_DIR")
    model: str = option(DEMO, "hub id or local path of a causal LM (e.g. bigcode/starcoder), or 'demo' for a tiny GPTBigCode built from the SFT text")
    demo_layers: int = option(2, "demo model: transformer layers")
    demo_embd: int = option(128, "demo model: hidden size")
    demo_vocab: int = option(2048, "demo model: BPE vocabulary trained on the SFT text")
    seq_len: int = option(512, "tokens per packed training sequence (OctoCoder: 2048)")
    target_only: bool = option(False, "loss on completions only (OctoCoder trains on the whole sequence)")
    oasst_ratio: Optional[float] = option(None, "fraction of training rows drawn from OASST (source=oasst), e.g. 0.63 for ~8.6k OASST per 5k commits; null keeps the rows as filtered")
    val_fraction: float = option(0.0, "fraction of packed sequences held out for validation loss (0 = none)")
    num_workers: int = option(2, "Ray Train workers (one per GPU on a GPU cluster)")
    cpus_per_worker: int = option(1, "CPUs reserved per worker")
    worker_resources: Optional[dict[str, float]] = option(
        None, "extra Ray resources per worker, e.g. {fake_gpu: 1} for a node type that advertises its "
              "accelerators as a custom resource (the GPU itself comes from device)")
    device: Literal["auto", "cpu", "gpu"] = option("auto", "gpu when the cluster has GPUs (auto), else cpu")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "bf16 on GPUs that have it (auto), fp32 on CPU")
    zero_stage: Literal[0, 1, 2, 3] = option(2, "DeepSpeed ZeRO stage")
    offload_optimizer: bool = option(False, "ZeRO optimizer state offload to CPU memory")
    offload_params: bool = option(False, "ZeRO-3 parameter offload to CPU memory")
    batch_size: int = option(4, "global batch in sequences = micro_batch x grad_accum x num_workers (OctoCoder: 32)")
    micro_batch: int = option(1, "sequences per worker per forward pass")
    lr: float = option(5e-4, "peak learning rate (AdamW)")
    warmup_steps: int = option(2, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient norm clipping (0 = off)")
    max_steps: int = option(35, "optimizer steps (OctoCoder: 35)")
    lora: bool = option(False, "train LoRA adapters (peft) instead of all weights; merged into model/ on export")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_targets: tuple[str, ...] = option(("c_attn", "c_proj"), "module names LoRA wraps (GPTBigCode attention projections)")
    checkpoint_every: int = option(10, "save a checkpoint (and compute validation loss) every N steps and at the end")
    keep_checkpoints: int = option(2, "checkpoints kept on disk (CheckpointConfig.num_to_keep)")
    max_failures: int = option(3, "worker-group restarts from the last checkpoint before giving up (-1 = forever)")
    export: bool = option(True, "write the final model in Hugging Face format to RUN_DIR/model")
    seed: int = option(0, "seed for shuffling, OASST sampling and init")
    fail_at_step: int = option(0, "testing hook: the last worker exits abruptly once before this step (0 = never)")
    hparams: Optional[str] = option(None, "tune directory written by 'octoray tune': its best trial's hyperparameters "
                                           "override this section's (the pipeline sets it when 'tune' runs)", metavar="TUNE_DIR")
    from_best_checkpoint: bool = option(False, "with hparams: continue from the best trial's checkpoint instead of "
                                               "training from scratch; needs the trial to have trained like this run "
                                               "(same max_steps, num_workers, model, schedule)")
    resource_wait_s: float = option(600.0, "seconds to wait for the workers' CPUs/GPUs (an autoscaling cluster adds "
                                           "nodes meanwhile) before failing with what holds the cluster")

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        return max(1, self.batch_size // max(1, self.micro_batch * self.num_workers))

    def problems(self) -> list[str]:
        """Every inconsistency in the config, for one ConfigError."""
        out = []
        for name in ("seq_len", "num_workers", "cpus_per_worker", "batch_size", "micro_batch", "max_steps",
                     "checkpoint_every", "keep_checkpoints", "lora_r", "lora_alpha", "demo_layers", "demo_embd"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        per_step = self.micro_batch * self.num_workers
        if per_step >= 1 and self.batch_size % per_step:
            out.append(f"batch_size {self.batch_size} is not divisible by micro_batch x num_workers = "
                       f"{self.micro_batch} x {self.num_workers} (global batch = micro_batch x grad_accum x num_workers)")
        if not 0.0 <= self.val_fraction < 1.0:
            out.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.oasst_ratio is not None and not 0.0 <= self.oasst_ratio < 1.0:
            out.append(f"oasst_ratio must be in [0, 1) or null, got {self.oasst_ratio}")
        if self.lr <= 0:
            out.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps < max(1, self.max_steps):
            out.append(f"warmup_steps must be in [0, max_steps), got {self.warmup_steps}")
        if self.offload_params and self.zero_stage != 3:
            out.append("offload_params needs zero_stage 3")
        if self.precision == "bf16" and self.device == "cpu":
            out.append("precision bf16 needs device gpu (CPU training runs in fp32)")
        if self.lora and not self.lora_targets:
            out.append("lora_targets must name at least one module")
        if self.from_best_checkpoint and self.hparams is None:
            out.append("from_best_checkpoint needs hparams (a tune directory)")
        if self.resource_wait_s <= 0:
            out.append(f"resource_wait_s must be > 0, got {self.resource_wait_s}")
        out += resource_problems("worker_resources", self.worker_resources)
        return out

    def input_problems(self) -> list[str]:
        """What ``octoray train`` by itself needs: SFT data that exists, a run directory, and the tune
        directory ``hparams`` names (the pipeline writes both as it goes, so they are not in
        :meth:`problems`). URIs are taken as given: checking them would need the network."""
        return input_dir_problems(data=self.data, out=self.out, hparams=self.hparams)


def input_dir_problems(*, data: Optional[str], out: Optional[str], hparams: Optional[str] = None) -> list[str]:
    """The input checks of train and tune: ``data`` and ``out`` given, ``data`` and ``hparams`` existing
    directories when local; object-store URIs are not checked (that would need the network)."""
    from octoray.storage.locations import is_uri

    found = []
    if not data:
        found.append("data: required (--data SFT_DIR, the output of 'octoray filter')")
    if not out:
        found.append("out: required (--out DIR)")
    for key, value, what in (("data", data, "SFT data"), ("hparams", hparams, "tune")):
        if value and not is_uri(value) and not location(value).is_dir():
            found.append(f"{key}: {what} directory not found: {value}")
    return found


#: The command line (octoray.stage_cli): ``octoray train CONFIG.yaml --data sft/ --out RUN_DIR``.
CONFIG = TrainConfig
INPUT = None


def run(cfg: TrainConfig) -> Location:
    """Train per ``cfg`` and return RUN_DIR; a complete RUN_DIR is left as is, a partial one resumes.

    When Ray Train gives up (``max_failures`` restarts used), the error says to rerun: the run
    resumes from its last checkpoint.
    """
    try:
        run_dir = _run(cfg)
    except Exception as exc:  # noqa: BLE001 - only Ray Train's final failure is turned into a hint
        if type(exc).__name__ != "TrainingFailedError":
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        error = UserError(f"training failed after {cfg.max_failures} restart(s): {first}; rerun the same command "
                          f"to resume from the last checkpoint in {cfg.out}")
        error.exit_code = 1  # the run failed, the command line was fine
        raise error from None
    print(f"octoray train: model in {run_dir / 'model'}")
    return run_dir


def _run(cfg: TrainConfig) -> Location:
    started = time.time()
    data_dir, run_dir = _require_paths(cfg)
    sft_manifest = require_stage_output(data_dir, "filter", "SFT data")
    handoff = None
    if cfg.hparams is not None:
        from octoray.training.best_trial import apply_best

        cfg, handoff = apply_best(cfg)
    if is_complete(run_dir, STAGE):
        print(f"octoray train: {run_dir} is already complete (manifest.json); nothing to do")
        _warn_if_stale(run_dir, handoff)
        return run_dir
    if handoff is not None:
        print(f"octoray train: {handoff.summary()}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    _init_ray()
    import ray

    from octoray.cluster.shared_storage import require_shared_storage

    require_shared_storage(ray, run_dir, "train --out")
    _write_config(run_dir, cfg, handoff)
    if handoff is not None and handoff.checkpoint is not None:
        _seed_from_trial(handoff, run_dir)
    model_path = resolve_model(cfg, data_dir, run_dir)
    datasets, counts = prepare_datasets(cfg, data_dir, model_path)
    _wait_for_workers(cfg, "octoray train")
    fit(cfg, model_path=model_path, datasets=datasets, run_dir=run_dir,
        init_checkpoint=handoff.checkpoint if handoff is not None else None)
    plot_loss(run_dir / METRICS_FILE, run_dir / LOSS_PNG)
    files = [METRICS_FILE, LOSS_PNG, "config.yaml"] + (["model"] if cfg.export else [])
    write_manifest(run_dir, STAGE, cfg, rows=counts["train_sequences"], files=files, started=started,
                   inputs={"sft": {"path": display(data_dir), "rows": sft_manifest.get("rows")}},
                   extra={"model_path": model_path, "counts": counts, "last_metrics": _last_metrics(run_dir),
                          "hparams_from": handoff.record() if handoff is not None else None})
    return run_dir


def _write_config(run_dir: Location, cfg: TrainConfig, handoff: Any) -> None:
    """config.yaml, headed by where its hyperparameters came from when a tune chose them."""
    if handoff is None:
        write_resolved_config(run_dir, cfg)
        return
    from octoray.config import dump_yaml
    from octoray.storage.stage_dirs import RESOLVED_CONFIG, atomic_write_text

    atomic_write_text(run_dir / RESOLVED_CONFIG, f"# {handoff.summary()}\n{dump_yaml(cfg)}")


def _warn_if_stale(run_dir: Location, handoff: Any) -> None:
    """A finished run is kept; say so when the tune it took its hyperparameters from has a new winner."""
    from octoray.storage.stage_dirs import read_manifest

    if handoff is None:
        return
    before = (read_manifest(run_dir) or {}).get("hparams_from") or {}
    if before.get("params") != handoff.params:
        print(f"octoray train: note: {run_dir} was trained with {before.get('params')}, the tune's best trial is now "
              f"{handoff.trial_id} with {handoff.params}; delete {run_dir} to train with them")


def _seed_from_trial(handoff: Any, run_dir: Path) -> None:
    """Continue a trial: its demo base model (tokenizer included) and its metrics up to the checkpoint."""
    import shutil

    trial_base = handoff.tune_dir / "base_model"
    if handoff.trial_config.get("model") == DEMO and trial_base.is_dir() and not (run_dir / "base_model").exists():
        shutil.copytree(trial_base, run_dir / "base_model")  # the checkpoint's weights fit this model only
    state = json.loads((handoff.checkpoint / STATE_FILE).read_text())
    metrics = handoff.checkpoint.parent / METRICS_FILE
    if metrics.is_file() and not (run_dir / METRICS_FILE).exists():
        # The loss curve of the continued run starts at step 1, not at the checkpoint.
        from octoray.training.metrics import read_metrics

        rows = [r for r in read_metrics(metrics) if r["step"] <= state["step"]]
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _wait_for_workers(cfg: TrainConfig, what: str) -> None:
    """Reserve the worker group's bundles once, with a deadline, before Ray Train tries.

    Ray Train itself would retry a worker group that cannot be placed for ever; this fails
    within ``resource_wait_s`` with a line naming what holds the cluster.
    """
    from octoray.cluster.resources import wait_for_resources

    bundles = [_worker_resources(cfg)] * cfg.num_workers
    # A request no node type can ever hold fails now, naming the node types; one that fits waits
    # (an autoscaling cluster starts a node for it) for at most resource_wait_s.
    require_feasible("train", bundles)
    wait_for_resources(bundles, what=f"{what} ({cfg.num_workers} workers)", timeout_s=cfg.resource_wait_s)


def _worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one Ray Train worker asks for: its CPUs, a GPU when training on GPUs, and any custom
    resources the config adds (a node type's accelerator resource)."""
    return {"CPU": float(cfg.cpus_per_worker), **({"GPU": 1.0} if _use_gpu(cfg) else {}),
            **{k: float(v) for k, v in (cfg.worker_resources or {}).items()}}


def _require_paths(cfg: TrainConfig) -> tuple[Location, Location]:
    if cfg.data is None:
        raise UserError("no SFT data given: pass --data SFT_DIR (the output of 'octoray filter')")
    if cfg.out is None:
        raise UserError("no run directory given: pass --out RUN_DIR")
    return location(cfg.data).resolve(), location(cfg.out).resolve()


def _init_ray(dashboard: bool = False) -> None:
    from octoray.cluster.connection import ensure_ray

    # RAY_ADDRESS (set by Ray Jobs) joins a cluster; otherwise a local one starts. Workers' logs
    # (per-step progress) reach the driver.
    ensure_ray(log_to_driver=True, dashboard=dashboard)


def resolve_model(cfg: TrainConfig, data_dir: Location, run_dir: Location) -> str:
    """The model to fine-tune: a hub id / local path checked up front, or the demo model built once."""
    if cfg.model == DEMO:
        base = run_dir / "base_model"
        if not (base / "config.json").is_file():  # reruns reuse it so a resume trains the same model
            from octoray.modeling import build_demo_model

            texts = sft_texts(data_dir, limit=20_000)
            # The context is StarCoder's 2048 whatever seq_len trains: the served model must take
            # HumanEvalPack prompts (hundreds of tokens with a small BPE vocabulary).
            local = base if not isinstance(base, ObjectPath) else scratch_dir(base, "build") / "base_model"
            build_demo_model(local, texts, vocab_size=cfg.demo_vocab, n_layer=cfg.demo_layers,
                             n_embd=cfg.demo_embd, n_positions=max(cfg.seq_len, 2048), seed=cfg.seed)
            if isinstance(base, ObjectPath):  # config.json last: its presence means "built"
                upload_dir(local, base, last="config.json")
        return str(base)
    if cfg.model.startswith(("/", "./", "../", "~")) and not Path(cfg.model).expanduser().is_dir():
        raise UserError(f"model directory not found: {cfg.model} (give a hub id, a local model directory, or 'demo')")
    from transformers import AutoConfig

    from octoray.modeling import load_error, load_tokenizer

    try:  # the config is a few KB: a cheap check that the model exists before Ray starts workers
        config = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as exc:
        raise load_error("model", cfg.model, exc) from None
    load_tokenizer(cfg.model)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions and cfg.seq_len > positions:
        raise UserError(f"seq_len {cfg.seq_len} exceeds the model's context of {positions} tokens")
    return cfg.model


def sft_files(data_dir: Location) -> list[str]:
    """The Parquet shards of an ``sft/`` directory (paths, or URIs when it is in object storage),
    in either layout (:func:`octoray.storage.layout.data_files`)."""
    from octoray.storage.layout import data_files
    from octoray.storage.stage_dirs import read_manifest, stage_listing

    data_dir = location(data_dir)
    files = [str(data_dir / name) for name in data_files(read_manifest(data_dir), stage_listing(data_dir))]
    if not files:
        raise UserError(f"no Parquet shards in {data_dir}")
    return files


def sft_texts(data_dir: Location, limit: int) -> list[str]:
    """Up to ``limit`` prompt+completion strings, to train the demo tokenizer on."""
    from octoray.storage.stage_dirs import read_parquet

    texts: list[str] = []
    for path in sft_files(data_dir):
        table = read_parquet(location(path), columns=["prompt", "completion"])
        texts.extend(p + c for p, c in zip(table["prompt"].to_pylist(), table["completion"].to_pylist()))
        if len(texts) >= limit:
            break
    return texts[:limit]


def prepare_datasets(cfg: TrainConfig, data_dir: Location, model_path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Ray Data: read ``sft/``, mix in OASST at ``oasst_ratio``, shuffle, pack, split off validation."""
    import ray.data

    from octoray.storage.stage_dirs import parquet_file
    from octoray.training.packing import pack_batch
    from octoray.storage.locations import fs_path

    files = sft_files(data_dir)
    schema = parquet_file(location(files[0])).schema_arrow
    missing = [c for c in ("prompt", "completion") if c not in schema.names]
    if missing:
        raise UserError(f"{data_dir} lacks column(s) {', '.join(missing)}: is it the output of 'octoray filter'?")
    has_source = "source" in schema.names
    columns = ["prompt", "completion"] + (["source"] if has_source else [])
    filesystem, _ = fs_path(location(files[0]))
    ds = ray.data.read_parquet([fs_path(location(f))[1] for f in files], filesystem=filesystem).select_columns(columns)
    counts: dict[str, int] = {}
    if cfg.oasst_ratio is not None and has_source:
        ds, counts = _mix_oasst(ds, files, cfg.oasst_ratio, cfg.seed)
    ds = ds.random_shuffle(seed=cfg.seed)
    packed = ds.map_batches(pack_batch, batch_format="numpy", batch_size=512,
                            fn_kwargs={"tokenizer_path": model_path, "seq_len": cfg.seq_len,
                                       "target_only": cfg.target_only}).materialize()
    total = packed.count()
    datasets = {"train": packed}
    n_val = 0
    if cfg.val_fraction > 0:
        train, val = packed.train_test_split(test_size=cfg.val_fraction)
        n_val = val.count()
        if n_val < cfg.num_workers:
            raise UserError(f"val_fraction {cfg.val_fraction} leaves {n_val} validation sequences for "
                            f"{cfg.num_workers} workers: raise it or add data")
        datasets = {"train": train.materialize(), "val": val.materialize()}
    n_train = total - n_val
    if n_train < cfg.micro_batch * cfg.num_workers:
        raise UserError(f"only {n_train} packed training sequences of {cfg.seq_len} tokens, fewer than "
                        f"micro_batch x num_workers = {cfg.micro_batch * cfg.num_workers}: add data or lower seq_len")
    counts.update({"train_sequences": n_train, "val_sequences": n_val})
    return datasets, counts


def _mix_oasst(ds: Any, files: list[str], ratio: float, seed: int) -> tuple[Any, dict[str, int]]:
    """Keep every commit row and a seeded sample of OASST rows so they make up ~``ratio`` of the mix.

    Each OASST row is kept when a hash of (seed, row) falls under ``take / n_oasst``: one fused
    filter in the read tasks instead of filter + shuffle + limit + union, and the same rows on
    every rerun (the driver counts them with the same rule for the manifest).
    """
    from octoray.storage.stage_dirs import read_parquet

    oasst_rows: list[tuple[str, str]] = []
    n_total = 0
    for f in files:
        table = read_parquet(location(f), columns=["source", "prompt", "completion"])
        n_total += table.num_rows
        oasst_rows.extend((p, c) for s, p, c in zip(table["source"].to_pylist(), table["prompt"].to_pylist(),
                                                   table["completion"].to_pylist()) if s == "oasst")
    n_oasst, n_commits = len(oasst_rows), n_total - len(oasst_rows)
    wanted = round(ratio / (1.0 - ratio) * n_commits)
    if wanted > n_oasst:
        print(f"octoray train: oasst_ratio {ratio} wants {wanted} OASST rows, only {n_oasst} exist; using all")
    keep = min(1.0, wanted / n_oasst) if n_oasst else 0.0
    rule = functools.partial(_keep_row, keep=keep, seed=seed)
    kept = sum(rule({"source": "oasst", "prompt": p, "completion": c}) for p, c in oasst_rows)
    return ds.filter(rule), {"commit_rows": n_commits, "oasst_rows": kept}


def _keep_row(row: dict[str, Any], *, keep: float, seed: int) -> bool:
    if row["source"] != "oasst":
        return True
    digest = zlib.crc32(f"{seed}\0{row['prompt']}\0{row['completion']}".encode("utf-8"))
    return digest / 2**32 < keep


def fit(cfg: TrainConfig, *, model_path: str, datasets: dict[str, Any], run_dir: Location,
        callbacks: Sequence[Any] = (), init_checkpoint: Optional[Path] = None) -> Any:
    """Run :func:`train_loop_per_worker` on ``cfg.num_workers`` Ray Train workers; return the Result.

    ``RunConfig(storage_path=RUN_DIR's parent, name=RUN_DIR's name)`` makes a rerun of the same
    command find Ray Train's checkpoint state in RUN_DIR and resume from its latest checkpoint;
    ``FailureConfig`` restarts the worker group from it after a worker dies. A URI RUN_DIR goes to
    Ray as ``storage_path`` (bucket/prefix) plus ``storage_filesystem``: checkpoints are uploaded by
    the workers straight to the bucket, and a run resumes from there on any node.
    ``init_checkpoint``
    (a tune trial's checkpoint) is where workers start when the run has no checkpoint of its own
    (Train V2 dropped ``resume_from_checkpoint``; its guide passes the path in the loop config).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = _use_gpu(cfg)
    resources = _worker_resources(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": str(run_dir), "model_path": model_path,
                           "init_checkpoint": str(init_checkpoint) if init_checkpoint else None},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_dir.name, **_ray_storage(run_dir.parent),
            # With a validation split keep the best checkpoints by val_loss (Ray keeps the latest
            # as well, for resuming); without one, the most recent.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_loss" if cfg.val_fraction > 0 else None,
                checkpoint_score_order="min"),
            # controller_failure_limit bounds Ray Train's retries of a worker group it cannot place
            # (WorkerGroupStartupTimeoutError, one per RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S = 60 s
            # by default): unbounded by default, which hung a pipeline whose CPUs another run held.
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.max_failures,
                controller_failure_limit=max(1, math.ceil(cfg.resource_wait_s / 60))),
            callbacks=list(callbacks)),
        datasets=datasets,
    )
    return trainer.fit()


def _ray_storage(parent: Location) -> dict[str, Any]:
    """``RunConfig`` storage arguments for a directory: a local path, or bucket path + file system."""
    if isinstance(parent, ObjectPath):
        return {"storage_path": parent.path, "storage_filesystem": parent.fs}
    return {"storage_path": str(parent)}


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.device != "auto":
        return cfg.device == "gpu"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def _last_metrics(run_dir: Location) -> dict[str, Any]:
    from octoray.training.metrics import read_metrics

    rows = read_metrics(run_dir / METRICS_FILE)
    return rows[-1] if rows else {}


# --------------------------------------------------------------------------------------------
# The Ray Train worker
# --------------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the DeepSpeed engine, resume, train, checkpoint, export.

    ``config`` holds the resolved TrainConfig as a dict, the run directory and the model path.
    Inside ``octoray tune`` ``config`` also carries the trial's hyperparameters (already merged).
    """
    import deepspeed  # imported here: the driver and `octoray --help` never pay for it
    import ray.train
    import torch
    import torch.distributed as dist

    from octoray.config import from_mapping
    from octoray.training.deepspeed_config import build_deepspeed_config, warmup_cosine

    cfg = from_mapping(TrainConfig, config["cfg"])
    run_dir = location(config["run_dir"])
    model_path = local_copy(config["model_path"])  # a URI: downloaded once per node
    # Files rank 0 appends to (metrics.jsonl, tb/) live on a local disk; with a URI RUN_DIR they are
    # uploaded at every checkpoint, so a worker group restarted on another node starts from them.
    local_dir = _local_run_dir(run_dir)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    torch.manual_seed(cfg.seed)

    ds_config = build_deepspeed_config(
        zero_stage=cfg.zero_stage, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, world_size=world,
        lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, bf16=bf16,
        offload_optimizer=cfg.offload_optimizer, offload_params=cfg.offload_params, cuda=cuda)
    # Adopt the process group Ray Train set up, before anything reads the world size: under
    # ZeRO-3 from_pretrained already runs zero.Init, which checks the batch against it.
    deepspeed.init_distributed()
    model, hf_ds_config = _load_model(cfg, model_path, ds_config, bf16)
    schedule = functools.partial(warmup_cosine, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                 min_lr_ratio=cfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))

    checkpoint = ray.train.get_checkpoint()  # this run's own latest, after a restart or rerun
    if checkpoint is None and config.get("init_checkpoint"):
        checkpoint = ray.train.Checkpoint.from_directory(config["init_checkpoint"])  # a tune trial's
    step, tokens_seen = _maybe_resume(engine, checkpoint)
    start_step = step  # logged with every row: shows where a (re)started worker group resumed
    if rank == 0:
        _sync_metrics(run_dir, local_dir, down=True)
    log = MetricsLog(local_dir, enabled=rank == 0, resume_step=step)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.val_fraction > 0 else None
    batches = _endless_batches(train_shard, cfg.micro_batch)
    progress = progress_bar(cfg.max_steps, desc="train", unit="step", enabled=rank == 0, initial=step,
                            mininterval=1.0)

    while step < cfg.max_steps:
        _maybe_fail(cfg, run_dir, step + 1, rank, world)
        engine.train()
        lr = engine.get_lr()[0]
        started = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, tokens
        data_seconds = 0.0  # time spent waiting on the input pipeline: a stall shows up here
        for _ in range(cfg.grad_accum):
            fetch_started = time.perf_counter()
            batch = next(batches)
            data_seconds += time.perf_counter() - fetch_started
            loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            engine.backward(loss)
            engine.step()
            sums[0] += loss.detach().double()
            sums[1] += batch["input_ids"].numel()
        dist.all_reduce(sums)  # one small collective: the logged loss is the global mean
        seconds = time.perf_counter() - started
        step += 1
        step_tokens = int(sums[1].item())
        tokens_seen += step_tokens
        row = {"step": step, "loss": float(sums[0].item()) / (cfg.grad_accum * world), "lr": lr,
               "tokens_per_s": step_tokens / seconds, "step_seconds": seconds,
               "data_seconds": data_seconds, "tokens": tokens_seen,
               "mfu": mfu(n_params, step_tokens / seconds / world, peak), "start_step": start_step}
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            if val_shard is not None:
                row["val_loss"] = _evaluate(engine, val_shard, cfg.micro_batch)
            log.log(row)
            if rank == 0:
                _sync_metrics(run_dir, local_dir)
            _save_and_report(engine, row, step, tokens_seen, rank)
        else:
            log.log(row)
        progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        progress.update(1)
    progress.close()
    log.close()
    if rank == 0:
        _sync_metrics(run_dir, local_dir, tensorboard=True)
    # Training is over: stop transformers from building models under zero.Init, or rank 0's fresh
    # export model would start ZeRO-3 collectives the other ranks never join (a deadlock).
    del hf_ds_config
    if cfg.zero_stage == 3:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    if cfg.export:
        _export(engine, cfg, model_path, local_dir / "model", rank)
        if rank == 0 and isinstance(run_dir, ObjectPath):
            from octoray.storage.locations import rmtree

            rmtree(run_dir / "model")  # a model/ left by an earlier, interrupted export
            upload_dir(local_dir / "model", run_dir / "model")


def _local_run_dir(run_dir: Location) -> Path:
    """RUN_DIR itself on a file system; a node-local scratch directory for a URI RUN_DIR."""
    return scratch_dir(run_dir, "runs") if isinstance(run_dir, ObjectPath) else Path(run_dir)


def _sync_metrics(run_dir: Location, local_dir: Path, *, down: bool = False, tensorboard: bool = False) -> None:
    """Copy rank 0's ``metrics.jsonl`` (and ``tb/``) between the scratch directory and a URI RUN_DIR.

    ``down``: before training, take the bucket's copy (the record up to the checkpoint resumed
    from; MetricsLog then drops later lines), so a fresh node continues the same file.
    """
    if not isinstance(run_dir, ObjectPath):
        return
    from octoray.storage.locations import download_file, upload_file

    remote, local = run_dir / METRICS_FILE, local_dir / METRICS_FILE
    if down:
        local.unlink(missing_ok=True)
        if remote.is_file():
            download_file(remote, local)
        return
    if local.is_file():
        upload_file(local, remote)
    if tensorboard and (local_dir / "tb").is_dir():
        upload_dir(local_dir / "tb", run_dir / "tb")


def _load_model(cfg: TrainConfig, model_path: str, ds_config: dict[str, Any], bf16: bool) -> tuple[Any, Any]:
    import torch

    hf_ds_config = None
    if cfg.zero_stage == 3:
        # With this object alive, from_pretrained builds the model under deepspeed.zero.Init, so
        # each rank materialises only its partition (a 15.5B model never sits whole on one GPU).
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    from octoray.modeling import load_model

    model = load_model(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return _with_lora(model, cfg), hf_ds_config


def _with_lora(model: Any, cfg: TrainConfig) -> Any:
    """``model`` wrapped in LoRA adapters as ``cfg`` asks (for training, and to rebuild the trained
    model's parameter names at export), or ``model`` itself when ``cfg.lora`` is off."""
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                            lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets)))


def _maybe_resume(engine: Any, checkpoint: Any) -> tuple[int, int]:
    """Load the latest Ray checkpoint into the engine; return (step, tokens) reached."""
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as ckpt_dir:
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=CKPT_TAG)
        if load_path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint '{CKPT_TAG}' in {ckpt_dir}")
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
    return int(state["step"]), int(state["tokens"])


def _endless_batches(shard: Any, micro_batch: int):
    """Micro-batches forever, epoch after epoch (shards are equal-sized, so ranks stay in lockstep)."""
    while True:
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=micro_batch, drop_last=True):
            seen += 1
            yield batch
        if not seen:
            raise RuntimeError("this worker's data shard holds fewer sequences than micro_batch")


def _evaluate(engine: Any, shard: Any, micro_batch: int) -> float:
    """Mean per-token validation loss over every worker's validation shard."""
    import torch
    import torch.distributed as dist

    from octoray.training.packing import IGNORE_INDEX

    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=micro_batch, drop_last=False):
            loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels by one
            sums[0] += loss.double() * n
            sums[1] += n
    dist.all_reduce(sums)
    engine.train()
    return float(sums[0] / sums[1].clamp(min=1))


def _save_and_report(engine: Any, metrics: dict[str, Any], step: int, tokens: int, rank: int) -> None:
    """Every rank writes its DeepSpeed shard into one Ray checkpoint directory and reports it."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="octoray-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps({"step": step, "tokens": tokens}))
        reported = {k: v for k, v in metrics.items() if v is not None}
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")


def _maybe_fail(cfg: TrainConfig, run_dir: Location, next_step: int, rank: int, world: int) -> None:
    """Test hook: the last rank dies abruptly once, to exercise FailureConfig + resume."""
    if cfg.fail_at_step != next_step or rank != world - 1:
        return
    marker = run_dir / FAIL_MARKER
    if marker.exists():
        return
    marker.write_text(f"worker {rank} exited before step {next_step}\n")
    # Ray's controller registers a reported checkpoint when it next polls the workers (every 2 s);
    # a death right after the report could beat that and lose the checkpoint, which a real crash
    # hours into a run would not. Wait (bounded) until Ray's snapshot names the last checkpoint.
    last = (next_step - 1) // cfg.checkpoint_every * cfg.checkpoint_every
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 120
    while last and time.time() < deadline:
        if snapshot.is_file() and f"checkpoint_{last:06d}" in snapshot.read_text(errors="replace"):
            break
        time.sleep(0.5)
    os._exit(1)


def _export(engine: Any, cfg: TrainConfig, model_path: str, out_dir: Path, rank: int) -> None:
    """Write the trained model (LoRA merged) + tokenizer in Hugging Face format on rank 0.

    Parameters are gathered one at a time (whole under ZeRO-3, a no-op otherwise), so no rank
    ever holds a second full copy on the GPU; rank 0 assembles them on the CPU.
    """
    import deepspeed
    import torch

    state: dict[str, Any] = {}
    module = engine.module
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=cfg.zero_stage == 3):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    if rank == 0:
        from transformers import AutoConfig, AutoModelForCausalLM

        from octoray.modeling import load_tokenizer

        hf_config = AutoConfig.from_pretrained(model_path)  # already a local copy
        dtype = next(iter(state.values())).dtype
        model = _with_lora(AutoModelForCausalLM.from_config(hf_config, dtype=dtype), cfg)
        missing = set(dict(model.named_parameters())) - set(state)
        if missing:
            raise RuntimeError(f"export: trained state lacks {sorted(missing)[:3]}")
        model.load_state_dict(state, strict=False)  # buffers (attention masks) come from the config
        if cfg.lora:
            model = model.merge_and_unload()
        model.config.use_cache = True
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        model.save_pretrained(tmp)
        load_tokenizer(model_path).save_pretrained(tmp)
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # a crash mid-export never leaves a half model/ behind
    torch.distributed.barrier()
