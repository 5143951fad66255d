"""``octoray train``: fine-tune a causal LM on CommitPackFT with Ray Train + DeepSpeed.

The driver: :func:`run` checks the inputs, picks the model, builds the packed Ray datasets
(:mod:`octoray.training.sft_data`), runs :func:`fit`, plots and writes the manifest. What each Ray
Train worker runs is :func:`octoray.training.worker.train_loop_per_worker`; the config is
:class:`octoray.training.train_config.TrainConfig`.

``octoray tune`` drives the very same :func:`fit` / ``train_loop_per_worker`` per trial.

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

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from octoray.cluster.resources import require_feasible
from octoray.config import to_dict
from octoray.errors import UserError
from octoray.resumable import StageRun
from octoray.storage.layout import MODEL_DIR, RESOLVED_CONFIG
from octoray.storage.locations import Location, ObjectPath, location, scratch_dir, upload_dir
from octoray.storage.stage_dirs import input_record, require_stage_output, write_resolved_config
from octoray.training import model_card
from octoray.training.metrics import LOSS_PNG, METRICS_FILE, plot_loss
from octoray.training.resume import STATE_FILE
from octoray.training.sft_data import prepare_datasets, sft_texts
from octoray.training.train_config import DEMO, STAGE, TrainConfig
from octoray.training.worker import train_loop_per_worker

if TYPE_CHECKING:
    from octoray.training.best_trial import Handoff

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
    data_dir, run_dir = _require_paths(cfg)
    sft_manifest = require_stage_output(data_dir, "filter", "SFT data")
    handoff = None
    if cfg.hparams is not None:
        from octoray.training.best_trial import apply_best

        cfg, handoff = apply_best(cfg)
    stage = StageRun(STAGE, run_dir, cfg, inputs={"sft": input_record(data_dir, sft_manifest)})
    # A finished run is reused only when trained on the same data (its fingerprint) with the same
    # settings; otherwise it is trained again from the start, never resumed from the old checkpoints.
    if stage.reusable(same=lambda previous: _same_training(previous, cfg)):
        _warn_if_stale(stage, handoff)
        if cfg.export and not (run_dir / MODEL_DIR / model_card.CARD).is_file():
            model_card.write(run_dir)  # a run finished before its card was written
        return run_dir
    if stage.stale:
        stage.say("training again from step 0 (the old run's checkpoints and model are removed)")
        clear_run_dir(run_dir)
    if handoff is not None:
        stage.say(handoff.summary())
    # Workers' logs (per-step progress) reach the driver. The dashboard carries the State API, which
    # Ray Train's PlacementGroupCleaner polls all run long (without it: a warning every few seconds).
    stage.start(write_config=False, log_to_driver=True, dashboard=True)
    _write_config(run_dir, cfg, handoff)
    if handoff is not None and handoff.checkpoint is not None:
        _seed_from_trial(handoff, run_dir)
    model_path = resolve_model(cfg, data_dir, run_dir)
    _plan_before_training(cfg, model_path, stage.say)
    datasets, counts = prepare_datasets(cfg, data_dir, model_path)
    wait_for_workers(cfg, "octoray train")
    fit(cfg, model_path=model_path, datasets=datasets, run_dir=run_dir,
        init_checkpoint=handoff.checkpoint if handoff is not None else None)
    plot_loss(run_dir / METRICS_FILE, run_dir / LOSS_PNG)
    files = [METRICS_FILE, LOSS_PNG, RESOLVED_CONFIG] + ([MODEL_DIR] if cfg.export else [])
    last = _last_metrics(run_dir)
    # The run's content is its model (README.md, the card, left out: eval rewrites it).
    stage.finish(rows=counts["train_sequences"], files=files, content=[MODEL_DIR] if cfg.export else [METRICS_FILE],
                 extra={"model_path": model_path, "counts": counts, "last_metrics": last,
                        "hparams_from": handoff.record() if handoff is not None else None,
                        **training_record(cfg, sft_manifest, model_path, last)})
    if cfg.export:
        model_card.write(run_dir)
    return run_dir


#: Train config keys that do not change the trained model: where things are, resources, retries,
#: preemption handling (a resume trains exactly as an unstopped run).
_NOT_RESULT_KEYS = frozenset({"data", "out", "hparams", "cpus_per_worker", "worker_resources", "check_fit",
                              "max_failures", "fail_at_step", "keep_checkpoints", "resource_wait_s",
                              "preemption_watch", "preemption_notice_url", "preemption_poll_s",
                              "preemption_sigterm_grace_s", "preemption_drain_node"})


def _result_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _NOT_RESULT_KEYS}


def _same_training(previous: dict[str, Any], cfg: TrainConfig) -> "bool | str":
    """True when a finished run was trained with the same settings, else which ones changed."""
    before, now = _result_config(previous.get("config") or {}), _result_config(to_dict(cfg))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return f"training settings changed: {', '.join(changed)}" if changed else True


def training_record(cfg: TrainConfig, sft_manifest: dict[str, Any], model_path: str,
                    last: dict[str, Any]) -> dict[str, Any]:
    """What the model was made from, for the manifest and the model card: the data (fingerprint,
    rows, the filter's config), the base model, the hyperparameters actually used, the seed and the
    step exported."""
    return {
        "data": {"fingerprint": sft_manifest.get("fingerprint"), "rows": sft_manifest.get("rows"),
                 "sft_config": sft_manifest.get("config")},
        "base_model": cfg.model,
        "hyperparameters": _result_config(to_dict(cfg)),
        "seed": cfg.seed,
        "checkpoint_step": last.get("step"),
        "hardware": {"device": "gpu" if use_gpu(cfg) else "cpu", "num_workers": cfg.num_workers,
                     "precision": cfg.precision, "zero_stage": cfg.zero_stage},
    }


def clear_run_dir(run_dir: Location) -> None:
    """Remove a finished run's outputs (manifest first: an interrupted clear is just incomplete),
    so the next training starts from step 0 with a fresh base model."""
    from octoray.storage.layout import MANIFEST
    from octoray.storage.locations import rmtree

    (run_dir / MANIFEST).unlink(missing_ok=True)
    for child in list(run_dir.iterdir()) if run_dir.is_dir() else []:
        if child.is_dir():
            rmtree(child)
        else:
            child.unlink(missing_ok=True)


def _plan_before_training(cfg: TrainConfig, model_path: str, say: Any) -> None:
    """Log ``octoray plan``'s numbers for this run; refuse (one line) when they say it cannot fit."""
    from dataclasses import replace

    from octoray.storage.locations import local_copy
    from octoray.training.planning import preflight

    cuda = use_gpu(cfg)
    # A URI is fetched once per node anyway (the workers load from the same cache); config.json is all it reads.
    preflight(replace(cfg, model=local_copy(model_path)), say, cuda=cuda, gpu_memory=cluster_gpu_memory() if cuda else None)


def cluster_gpu_memory() -> Optional[int]:
    """The smallest memory per GPU the cluster's GPU nodes state (their ``octoray-gpu-memory``
    label, as cluster/*.yaml set it), or None when no node says."""
    import ray

    from octoray.training.memory import parse_size
    from octoray.training.planning import LABEL_GPU_MEMORY

    sizes = []
    for node in ray.nodes():
        label = (node.get("Labels") or {}).get(LABEL_GPU_MEMORY)
        if node.get("Alive") and node.get("Resources", {}).get("GPU") and label:
            try:
                sizes.append(parse_size(label))
            except ValueError:
                continue
    return min(sizes) if sizes else None


def _write_config(run_dir: Location, cfg: TrainConfig, handoff: Optional[Handoff]) -> None:
    """config.yaml, headed by where its hyperparameters came from when a tune chose them."""
    if handoff is None:
        write_resolved_config(run_dir, cfg)
        return
    from octoray.config import dump_yaml
    from octoray.storage.stage_dirs import atomic_write_text

    atomic_write_text(run_dir / RESOLVED_CONFIG, f"# {handoff.summary()}\n{dump_yaml(cfg)}")


def _warn_if_stale(stage: StageRun, handoff: Optional[Handoff]) -> None:
    """A finished run is kept; say so when the tune it took its hyperparameters from has a new winner."""
    if handoff is None:
        return
    before = (stage.previous or {}).get("hparams_from") or {}
    if before.get("params") != handoff.params:
        stage.say(f"note: {stage.out} was trained with {before.get('params')}, the tune's best trial is now "
                  f"{handoff.trial_id} with {handoff.params}; delete {stage.out} to train with them")


def _seed_from_trial(handoff: Handoff, run_dir: Location) -> None:
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


def wait_for_workers(cfg: TrainConfig, what: str) -> None:
    """Reserve the worker group's bundles once, with a deadline, before Ray Train tries.

    Ray Train itself would retry a worker group that cannot be placed for ever; this fails
    within ``resource_wait_s`` with a line naming what holds the cluster.
    """
    from octoray.cluster.resources import wait_for_resources

    bundles = [worker_resources(cfg)] * cfg.num_workers
    # A request no node type can ever hold fails now, naming the node types; one that fits waits
    # (an autoscaling cluster starts a node for it) for at most resource_wait_s.
    require_feasible("train", bundles)
    wait_for_resources(bundles, what=f"{what} ({cfg.num_workers} workers)", timeout_s=cfg.resource_wait_s)


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one Ray Train worker asks for: its CPUs, a GPU when training on GPUs, and any custom
    resources the config adds (a node type's accelerator resource)."""
    return {"CPU": float(cfg.cpus_per_worker), **({"GPU": 1.0} if use_gpu(cfg) else {}),
            **{k: float(v) for k, v in (cfg.worker_resources or {}).items()}}


def _require_paths(cfg: TrainConfig) -> tuple[Location, Location]:
    if cfg.data is None:
        raise UserError("no SFT data given: pass --data SFT_DIR (the output of 'octoray filter')")
    if cfg.out is None:
        raise UserError("no run directory given: pass --out RUN_DIR")
    return location(cfg.data).resolve(), location(cfg.out).resolve()


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


def trained_template(cfg: TrainConfig) -> str:
    """The Jinja ``chat_template`` the exported model gets: the format its SFT prompts were written
    in (octoray.modeling's templates), so ``apply_chat_template``, vLLM and Hub tools prompt it as trained."""
    from octoray.modeling import DEFAULT_TEMPLATE, chat_template, detect_template

    name = DEFAULT_TEMPLATE
    if cfg.data is not None:
        name = detect_template(sft_texts(location(cfg.data).resolve(), limit=1000))
    return chat_template(name)


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
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    resources = worker_resources(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": str(run_dir), "model_path": model_path,
                           "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
                           "chat_template": trained_template(cfg)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu(cfg),
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_dir.name, **ray_storage(run_dir.parent),
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
        # Every worker group gets the same shards in the same order (Ray's split otherwise deals
        # blocks by where they are stored and where the workers run, which changes when a group
        # restarts on other nodes), so a resumed run reads what an unstopped one would have.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    return trainer.fit()


def ray_storage(parent: Location) -> dict[str, Any]:
    """``RunConfig`` storage arguments for a directory: a local path, or bucket path + file system."""
    if isinstance(parent, ObjectPath):
        return {"storage_path": parent.path, "storage_filesystem": parent.fs}
    return {"storage_path": str(parent)}


def use_gpu(cfg: TrainConfig) -> bool:
    """Train on GPUs: ``device: gpu``, or ``auto`` on a cluster that has GPUs."""
    if cfg.device != "auto":
        return cfg.device == "gpu"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def _last_metrics(run_dir: Location) -> dict[str, Any]:
    from octoray.training.metrics import read_metrics

    rows = read_metrics(run_dir / METRICS_FILE)
    return rows[-1] if rows else {}
