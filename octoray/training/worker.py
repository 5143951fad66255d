"""What each Ray Train worker runs (:func:`train_loop_per_worker`): the DeepSpeed engine, resume,
the step loop, checkpoints and the export. ``octoray train`` and every ``octoray tune`` trial start
it through :func:`octoray.training.driver.fit`; it reads only its ``config`` dict.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from octoray.progress import progress_bar
from octoray.storage.locations import Location, ObjectPath, local_copy, location, scratch_dir, upload_dir
from octoray.training.metrics import METRICS_FILE, MetricsLog, PeakMemory, mfu, peak_flops
from octoray.training.resume import STATE_FILE, ResumeState, read_state, state_at
from octoray.training.train_config import TrainConfig

#: DeepSpeed checkpoint tag inside every Ray checkpoint directory.
CKPT_TAG = "ds"
#: Marker that makes the ``fail_at_step`` test hook fire only once per run directory.
FAIL_MARKER = ".fail_at_step_done"
#: Every preemption notice a run has had, one JSON line each (metrics.jsonl drops the rows of
#: steps that are redone, this file keeps the notices whose save fell back to an older checkpoint).
PREEMPTIONS_FILE = "preemptions.jsonl"


class PreemptedError(RuntimeError):
    """The worker group stops after a preemption notice (with or without a fresh checkpoint):
    Ray Train restarts it from the latest checkpoint on the nodes that remain or replace it."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the DeepSpeed engine, resume, train, checkpoint, export.

    ``config`` holds the resolved TrainConfig as a dict, the run directory and the model path.
    Inside ``octoray tune`` ``config`` also carries the trial's hyperparameters (already merged).
    """
    import ray.train  # imported here, as deepspeed and torch below: the driver never pays for them
    import torch

    from octoray.config import from_mapping
    from octoray.modeling import name_deepspeed_accelerator

    name_deepspeed_accelerator()  # a CPU worker says so, rather than DeepSpeed warning it found no GPU

    cfg = from_mapping(TrainConfig, config["cfg"])
    run_dir = location(config["run_dir"])
    model_path = local_copy(config["model_path"])  # a URI: downloaded once per node
    # Files rank 0 appends to (metrics.jsonl, tb/) live on a local disk; with a URI RUN_DIR they are
    # uploaded at every checkpoint, so a worker group restarted on another node starts from them.
    local_dir = _local_run_dir(run_dir)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    engine, hf_ds_config, memory = _engine(cfg, model_path, world)

    checkpoint = ray.train.get_checkpoint()  # this run's own latest, after a restart or rerun
    if checkpoint is None and config.get("init_checkpoint"):
        checkpoint = ray.train.Checkpoint.from_directory(config["init_checkpoint"])  # a tune trial's
    resumed = _maybe_resume(engine, checkpoint, cfg, rank, world)
    step, tokens_seen = (resumed.step, resumed.tokens) if resumed is not None else (0, 0)
    start_step = step  # logged with every row: shows where a (re)started worker group resumed
    if rank == 0:
        _sync_metrics(run_dir, local_dir, down=True)
    log = MetricsLog(local_dir, enabled=rank == 0, resume_step=step)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    val_shard = ray.train.get_dataset_shard("val") if cfg.val_fraction > 0 else None
    batches = _train_batches(ray.train.get_dataset_shard("train"), cfg, resumed, rank, world)
    progress = progress_bar(cfg.max_steps, desc="train", unit="step", enabled=rank == 0, initial=step,
                            mininterval=1.0)
    watcher = _start_watcher(cfg)
    # The last checkpoint: its step and how long saving it took (what a notice's deadline must allow).
    saved = {"step": step if checkpoint is not None else None, "seconds": None}

    while step < cfg.max_steps:
        _maybe_fail(cfg, run_dir, step + 1, rank, world)
        row = _train_step(engine, batches, cfg, world, watcher)
        noticed = row.pop("noticed_ranks")
        step += 1
        tokens_seen += row["tokens"]
        row.update(step=step, tokens=tokens_seen, start_step=start_step,
                   mfu=mfu(n_params, row["tokens_per_s"] / world, peak))
        if noticed:  # every rank sees the same sum: all of them stop at this step
            if val_shard is not None:
                row["val_loss"] = _evaluate(engine, val_shard, cfg.micro_batch)
            _on_preemption(engine, cfg, row, step, tokens_seen, rank, watcher, saved, run_dir, local_dir, log)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            row["peak_memory_bytes"] = _largest_over_ranks(memory.peak_bytes(), engine.device)
            if val_shard is not None:
                row["val_loss"] = _evaluate(engine, val_shard, cfg.micro_batch)
            log.log(row)
            if rank == 0:
                _sync_metrics(run_dir, local_dir)
            started = time.perf_counter()
            _save_and_report(engine, row, _state(cfg, step, tokens_seen, world), rank)
            saved.update(step=step, seconds=time.perf_counter() - started)
        else:
            log.log(row)
        progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        progress.update(1)
    progress.close()
    log.close()
    if watcher is not None:
        from octoray.training.preemption import unwatch

        unwatch(watcher)
    if rank == 0:
        _sync_metrics(run_dir, local_dir, tensorboard=True)
    del hf_ds_config  # training is over (see _export_model)
    _export_model(engine, cfg, model_path, run_dir, local_dir, rank, config.get("chat_template"))


def _engine(cfg: TrainConfig, model_path: str, world: int) -> tuple[Any, Any, PeakMemory]:
    """The DeepSpeed engine (model, AdamW, warmup-cosine schedule), transformers' handle on the
    DeepSpeed config, which must live as long as training does under ZeRO-3, and the tracker of
    the memory training holds (started once the libraries and the process group are up)."""
    import deepspeed
    import torch

    from octoray.training.deepspeed_config import build_deepspeed_config, warmup_cosine

    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    ds_config = build_deepspeed_config(
        zero_stage=cfg.zero_stage, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, world_size=world,
        lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, bf16=bf16,
        offload_optimizer=cfg.offload_optimizer, offload_params=cfg.offload_params, cuda=cuda)
    # Adopt the process group Ray Train set up, before anything reads the world size: under
    # ZeRO-3 from_pretrained already runs zero.Init, which checks the batch against it.
    deepspeed.init_distributed()
    memory = PeakMemory()  # from here: the model, DeepSpeed's states and buffers, the activations
    model, hf_ds_config = _load_model(cfg, model_path, ds_config, bf16)
    schedule = functools.partial(warmup_cosine, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                 min_lr_ratio=cfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
    return engine, hf_ds_config, memory


def _train_step(engine: Any, batches: Any, cfg: TrainConfig, world: int, watcher: Any = None) -> dict[str, Any]:
    """One optimizer step (``grad_accum`` micro-batches); its metrics row, loss averaged over ranks.

    ``noticed_ranks``: how many ranks hold a preemption notice. The flag rides in the all-reduce
    the step makes anyway (a third number beside loss and tokens), so agreeing costs no collective.
    """
    import torch
    import torch.distributed as dist

    engine.train()
    lr = engine.get_lr()[0]
    started = time.perf_counter()
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)  # loss sum, tokens, notices
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
    if watcher is not None and watcher.notice is not None:
        sums[2] = 1.0
    dist.all_reduce(sums)  # one small collective: the logged loss is the global mean
    seconds = time.perf_counter() - started
    step_tokens = int(sums[1].item())
    return {"loss": float(sums[0].item()) / (cfg.grad_accum * world), "lr": lr,
            "tokens_per_s": step_tokens / seconds, "step_seconds": seconds, "data_seconds": data_seconds,
            "tokens": step_tokens, "noticed_ranks": int(sums[2].item())}


def _start_watcher(cfg: TrainConfig) -> Any:
    """This worker's preemption watcher (None when ``preemption_watch`` is off): Ray's drain state of
    its node, SIGTERM to this process, and the cloud's notice URL, polled in a background thread."""
    if not cfg.preemption_watch:
        return None
    import ray

    from octoray.training.preemption import (PreemptionWatcher, drain_node, draining_deadline, notice_url,
                                             watch_sigterm)

    node_id = ray.get_runtime_context().get_node_id()
    # A cloud's notice reaches only this VM: drain the node in Ray too, so the restarted worker
    # group is not placed back on it (a Ray drain or SIGTERM to the pod's raylet drains already).
    drain_self = functools.partial(drain_node, node_id) if cfg.preemption_drain_node else None
    watcher = PreemptionWatcher(poll_s=cfg.preemption_poll_s, drain=functools.partial(draining_deadline, node_id),
                                url=notice_url(cfg.preemption_notice_url),
                                sigterm_grace_s=cfg.preemption_sigterm_grace_s, on_cloud_notice=drain_self)
    watch_sigterm(watcher)
    return watcher.start()


def _on_preemption(engine: Any, cfg: TrainConfig, row: dict[str, Any], step: int, tokens: int, rank: int,
                   watcher: Any, saved: dict[str, Any], run_dir: Location, local_dir: Path, log: MetricsLog) -> None:
    """A rank holds a preemption notice and every rank is at ``step``: save a checkpoint of this
    step and report it (or, when the deadline is shorter than the last save took, keep the last
    periodic one), record the notice, and stop the worker group (raises PreemptedError).

    Rank 0 decides for everyone (one clock, one measured save time), so no rank saves a different
    step or takes a different branch.
    """
    import torch.distributed as dist

    local = None
    if watcher is not None and watcher.notice is not None:
        local = {**watcher.notice.record(), "ray_drain": watcher.cloud_action}
    notices: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(notices, local)
    decision: list[Any] = [None]
    if rank == 0:
        decision[0] = _preemption_decision([n for n in notices if n], [r for r, n in enumerate(notices) if n],
                                           step, saved)
    dist.broadcast_object_list(decision, src=0)
    record = decision[0]
    if record["saved"]:
        started = time.perf_counter()
        _save_and_report(engine, {**row, "preemption_step": step}, _state(cfg, step, tokens, dist.get_world_size()),
                         rank)
        record["save_seconds"] = round(time.perf_counter() - started, 3)
        if record["deadline"] is not None:
            record["seconds_left_after_save"] = round(record["deadline"] - time.time(), 3)
    row["preemption"] = record
    log.log(row)
    if rank == 0:
        _sync_metrics(run_dir, local_dir)
        _append_preemption(run_dir, record)
        print(f"octoray train: {_preemption_line(record)}", flush=True)
    if record["saved"]:
        # Stop only once Ray Train has registered the checkpoint, or the restart could resume from
        # an older one (bounded by the deadline: past it the node is gone anyway).
        left = record["deadline"] - time.time() if record["deadline"] is not None else 60.0
        _wait_registered(run_dir, f"checkpoint_{step:06d}", timeout=max(1.0, min(60.0, left)))
    raise PreemptedError(_preemption_line(record))


def _preemption_decision(notices: list[dict[str, Any]], ranks: list[int], step: int,
                         saved: dict[str, Any]) -> dict[str, Any]:
    """What the worker group does about ``notices`` (rank 0's view): save this step, or fall back
    to the last checkpoint when the earliest deadline leaves less time than the last save took."""
    now = time.time()
    deadlines = [n["deadline"] for n in notices if n.get("deadline")]
    deadline = min(deadlines) if deadlines else None
    left = deadline - now if deadline is not None else None
    first = min(notices, key=lambda n: n["received"])
    last_save = saved["seconds"]
    fallback = left is not None and last_save is not None and left < last_save
    return {"step": step, "source": first["source"], "sources": sorted({n["source"] for n in notices}),
            "ranks": ranks, "detail": first.get("detail", ""), "received": first["received"],
            "noticed_seconds_ago": round(now - first["received"], 3), "deadline": deadline,
            "seconds_left": round(left, 3) if left is not None else None,
            "last_save_seconds": round(last_save, 3) if last_save is not None else None,
            "saved": not fallback, "resumes_from": saved["step"] if fallback else step,
            # Whether a cloud notice was passed on to Ray as a drain of the node ("drained", or why not).
            "ray_drain": next((n["ray_drain"] for n in notices if n.get("ray_drain")), None)}


def _preemption_line(record: dict[str, Any]) -> str:
    """The log line for a preemption record."""
    left = record["seconds_left"]
    head = (f"preemption notice ({record['source']}, ranks {record['ranks']}) at step {record['step']}, "
            + (f"{left:.1f} s before the deadline" if left is not None else "no deadline given"))
    if record["saved"]:
        tail = f"saved checkpoint_{record['step']:06d}"
        if record.get("save_seconds") is not None:
            tail += f" in {record['save_seconds']:.1f} s"
            if record.get("seconds_left_after_save") is not None:
                tail += f" ({record['seconds_left_after_save']:.1f} s to spare)"
        return f"{head}: {tail}; the run resumes from it"
    since = (f"checkpoint_{record['resumes_from']:06d}" if record["resumes_from"] else "the start")
    return (f"{head}: too short for a save (the last one took {record['last_save_seconds']:.1f} s); not saving, "
            f"the run resumes from {since} (lower checkpoint_every to lose less)")


def _append_preemption(run_dir: Location, record: dict[str, Any]) -> None:
    """Add ``record`` to RUN_DIR/preemptions.jsonl (read and rewritten: one small object in a bucket)."""
    path = run_dir / PREEMPTIONS_FILE
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    path.write_text(before + json.dumps(record) + "\n", encoding="utf-8")


def _wait_registered(run_dir: Location, name: str, timeout: float) -> bool:
    """Wait (at most ``timeout`` s) until Ray Train's checkpoint snapshot names checkpoint ``name``.

    Ray's controller registers a reported checkpoint when it next polls the workers (every 2 s);
    a worker that stops right after the report could beat that and lose the checkpoint.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if snapshot.is_file() and name in snapshot.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def _export_model(engine: Any, cfg: TrainConfig, model_path: str, run_dir: Location, local_dir: Path,
                  rank: int, chat_template: str | None = None) -> None:
    """RUN_DIR/model in Hugging Face format (uploaded when RUN_DIR is a URI), when ``cfg.export``."""
    # Stop transformers from building models under zero.Init, or rank 0's fresh export model would
    # start ZeRO-3 collectives the other ranks never join (a deadlock).
    if cfg.zero_stage == 3:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    if not cfg.export:
        return
    _export(engine, cfg, model_path, local_dir / "model", rank, chat_template)
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
    """The model to train (attention kernel and gradient checkpointing as ``cfg`` asks, LoRA-wrapped
    when asked) and transformers' handle on the DeepSpeed config (ZeRO-3: keep it alive)."""
    import torch

    hf_ds_config = None
    if cfg.zero_stage == 3:
        # With this object alive, from_pretrained builds the model under deepspeed.zero.Init, so
        # each rank materialises only its partition (a 15.5B model never sits whole on one GPU).
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    from octoray.modeling import load_model

    model = load_model(model_path, dtype=torch.bfloat16 if bf16 else torch.float32,
                       attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: works under ZeRO-3 (parameters gathered again in the
        # recompute) and with LoRA's frozen base weights without enable_input_require_grads().
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _with_lora(model, cfg), hf_ds_config


def _with_lora(model: Any, cfg: TrainConfig) -> Any:
    """``model`` wrapped in LoRA adapters as ``cfg`` asks (for training, and to rebuild the trained
    model's parameter names at export), or ``model`` itself when ``cfg.lora`` is off."""
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                            lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets)))


def _maybe_resume(engine: Any, checkpoint: Any, cfg: TrainConfig, rank: int, world: int) -> ResumeState | None:
    """Load the latest Ray checkpoint into the engine (weights, optimizer, LR schedule) and this
    rank's RNG states; return where its run stood (None: no checkpoint, start at step 0)."""
    if checkpoint is None:
        return None
    from octoray.training.resume import restore_rng

    with checkpoint.as_directory() as ckpt_dir:
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=CKPT_TAG)
        if load_path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint '{CKPT_TAG}' in {ckpt_dir}")
        state = read_state(Path(ckpt_dir), micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, world=world)
        if not restore_rng(Path(ckpt_dir), rank, engine.device) and rank == 0:
            print(f"octoray train: checkpoint_{state.step:06d} has no RNG state for rank {rank}; dropout from here "
                  f"differs from an unstopped run", flush=True)
    return state


def _state(cfg: TrainConfig, step: int, tokens: int, world: int) -> ResumeState:
    return state_at(step, tokens, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, world=world)


def _train_batches(shard: Any, cfg: TrainConfig, resumed: ResumeState | None, rank: int, world: int) -> Any:
    """This rank's micro-batches, epoch after epoch, continuing at the data position of the
    checkpoint resumed from (shards are equal-sized, so ranks stay in lockstep)."""
    from octoray.training.resume import endless_batches, micro_batches_to_skip, skip_to

    def epoch() -> Any:
        return shard.iter_torch_batches(batch_size=cfg.micro_batch, drop_last=True)

    if resumed is None:
        return endless_batches(epoch)
    skip, note = micro_batches_to_skip(resumed.data, micro_batch=cfg.micro_batch, world=world)

    def say(line: str) -> None:
        if rank == 0:
            print(f"octoray train: {line}", flush=True)

    if note:
        say(note)
    return skip_to(endless_batches(epoch, skip), skip, say)


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


def _largest_over_ranks(value: int, device: Any) -> int:
    """The largest ``value`` any rank holds (a collective: every rank calls it at the same step)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _save_and_report(engine: Any, metrics: dict[str, Any], state: ResumeState, rank: int) -> None:
    """Every rank writes its DeepSpeed shard and RNG states into one Ray checkpoint directory and
    reports it; rank 0 adds STATE_FILE (step, tokens, data position)."""
    import ray.train

    from octoray.training.resume import save_rng

    with tempfile.TemporaryDirectory(prefix="octoray-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG)
        save_rng(Path(tmp), rank, engine.device)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(state.to_json())
        reported = {k: v for k, v in metrics.items() if v is not None}
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{state.step:06d}")


def _maybe_fail(cfg: TrainConfig, run_dir: Location, next_step: int, rank: int, world: int) -> None:
    """Test hook: the last rank dies abruptly once, to exercise FailureConfig + resume."""
    if cfg.fail_at_step != next_step or rank != world - 1:
        return
    marker = run_dir / FAIL_MARKER
    if marker.exists():
        return
    marker.write_text(f"worker {rank} exited before step {next_step}\n")
    # A death right after the report could beat Ray's registration of the checkpoint, which a
    # real crash hours into a run would not: wait (bounded) until Ray's snapshot names it.
    last = (next_step - 1) // cfg.checkpoint_every * cfg.checkpoint_every
    if last:
        _wait_registered(run_dir, f"checkpoint_{last:06d}", timeout=120)
    os._exit(1)


def _export(engine: Any, cfg: TrainConfig, model_path: str, out_dir: Path, rank: int,
            chat_template: str | None = None) -> None:
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
        tokenizer = load_tokenizer(model_path)
        if chat_template:  # the format it was trained on (saved as chat_template.jinja)
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # a crash mid-export never leaves a half model/ behind
    torch.distributed.barrier()
