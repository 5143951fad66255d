"""``octoray tune``: Ray Tune over the training hyperparameters, with ASHA early stopping.

Each trial is a small function that builds one ``TorchTrainer`` through
:func:`octoray.training.fit`, so trials run the very same ``train_loop_per_worker`` as
``octoray train`` (Ray 2.60: ``Tuner(trainer)`` is deprecated; a function per trial is the way).
Workers report ``val_loss`` with every checkpoint; ``TuneReportCallback`` forwards those reports
to Tune (it is Ray's bridge from ``ray.train.report`` on the workers to ``ray.tune.report``),
where ASHA stops the trials that fall behind.

The config file's ``train:`` section is the base of every trial; its ``tune:`` section is the
search space and the scheduler. ``DIR/best.json`` names the best trial, its hyperparameters, its
validation loss and its best checkpoint; ``DIR/trials/<trial_id>/`` holds each trial's run.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from octoray.config import from_mapping, help_lines, load_config, option, split_overrides, to_dict
from octoray.errors import UserError
from octoray.outputs import atomic_write_json, is_complete, require_stage_output, write_manifest, write_resolved_config

STAGE = "tune"
METRIC = "val_loss"
BEST_FILE = "best.json"


@dataclass(frozen=True)
class TuneConfig:
    """The ``tune:`` section: search space, trial budget and ASHA settings."""

    data: Optional[str] = option(None, "sft/ directory written by 'octoray filter' (or --data); a path or a URI")
    out: Optional[str] = option(None, "tuning directory: trials/, tune/ (Ray Tune state), best.json (or --out); "
                                      "a path or a URI (s3://bucket/prefix)")
    lr: tuple[float, ...] = option((1e-4, 1e-3), "learning-rate range [low, high], sampled log-uniformly")
    warmup_steps: tuple[int, ...] = option((1, 3), "warmup steps to choose from")
    batch_size: tuple[int, ...] = option((), "global batch sizes to choose from (empty: the train: value)")
    lora_r: tuple[int, ...] = option((), "LoRA ranks to choose from (needs lora: true under train:)")
    num_samples: int = option(8, "number of trials")
    max_steps: int = option(0, "optimizer steps per trial (0: the train: value)")
    num_workers: int = option(0, "Ray Train workers per trial (0: the train: value)")
    val_fraction: float = option(0.1, "packed sequences held out for the validation loss ASHA ranks by")
    grace_period: int = option(1, "ASHA: validation reports (one per checkpoint) before a trial may be stopped")
    reduction_factor: int = option(2, "ASHA: keep the best 1/reduction_factor at each rung")
    max_concurrent_trials: int = option(0, "trials at once (0: as many as the cluster's CPUs/GPUs hold)")
    seed: int = option(0, "seed of the random search")

    def problems(self) -> list[str]:
        """Every inconsistency in the search space, for one ConfigError."""
        out = []
        if len(self.lr) != 2 or not 0 < self.lr[0] <= self.lr[1]:
            out.append(f"lr must be a range [low, high] with 0 < low <= high, got {list(self.lr)}")
        for name in ("warmup_steps", "batch_size", "lora_r"):
            if any(v < (0 if name == "warmup_steps" else 1) for v in getattr(self, name)):
                out.append(f"{name} choices must be positive, got {list(getattr(self, name))}")
        for name in ("num_samples", "grace_period", "reduction_factor"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reduction_factor == 1:
            out.append("reduction_factor must be >= 2")
        if not 0 < self.val_fraction < 1:
            out.append(f"val_fraction must be in (0, 1): ASHA needs a validation loss, got {self.val_fraction}")
        return out


def trial_base(train_cfg: Any, tcfg: TuneConfig) -> Any:
    """The TrainConfig every trial starts from: the train: section with the tune: budget applied."""
    from octoray.training import TrainConfig

    changes: dict[str, Any] = {"val_fraction": tcfg.val_fraction, "export": False, "fail_at_step": 0,
                               "data": None, "out": None}
    if tcfg.max_steps:
        changes["max_steps"] = tcfg.max_steps
    if tcfg.num_workers:
        changes["num_workers"] = tcfg.num_workers
    base = from_mapping(TrainConfig, {**to_dict(train_cfg), **changes}, source="train: section under tune")
    problems = []
    for batch in tcfg.batch_size:
        if batch % (base.micro_batch * base.num_workers):
            problems.append(f"batch_size choice {batch} is not divisible by micro_batch x num_workers = "
                            f"{base.micro_batch} x {base.num_workers}")
    if tcfg.lora_r and not base.lora:
        problems.append("lora_r choices need lora: true in the train: section")
    if problems:
        raise UserError("invalid tune config: " + "; ".join(problems))
    return base


def run(tcfg: TuneConfig, train_cfg: Any) -> Path:
    """Run the search and write ``DIR/best.json``; returns DIR."""
    from octoray.training import _init_ray, prepare_datasets, resolve_model

    started = time.time()
    if tcfg.data is None or tcfg.out is None:
        raise UserError("pass --data SFT_DIR (the output of 'octoray filter') and --out DIR")
    from octoray.storage import location

    data_dir, out_dir = location(tcfg.data).resolve(), location(tcfg.out).resolve()
    sft_manifest = require_stage_output(data_dir, "filter", "SFT data")
    if is_complete(out_dir, STAGE):
        print(f"octoray tune: {out_dir} is already complete (manifest.json); nothing to do")
        return out_dir
    base = trial_base(train_cfg, tcfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out_dir, tcfg)
    model_path = resolve_model(base, data_dir, out_dir)
    _init_ray(dashboard=True)
    _require_state_api()
    datasets, counts = prepare_datasets(base, data_dir, model_path)
    results = _run_tuner(tcfg, base, model_path, datasets, out_dir)
    best = summarize(results, base)
    atomic_write_json(out_dir / BEST_FILE, best)
    print(f"octoray tune: best trial {best['best']['trial_id']} {METRIC}={best['best'][METRIC]:.4f} "
          f"config={best['best']['config']}")
    write_manifest(out_dir, STAGE, tcfg, rows=len(best["trials"]), files=[BEST_FILE, "config.yaml"],
                   started=started, inputs={"sft": {"path": str(data_dir), "rows": sft_manifest.get("rows")}},
                   extra={"model_path": model_path, "counts": counts, "train_config": to_dict(base)})
    return out_dir


def _require_state_api() -> None:
    """Refuse to tune on a Ray without its State API rather than hang mid-search.

    When ASHA stops a trial, Tune kills the trial's actor and with it the Ray Train controller;
    the controller's worker placement group outlives it (placement groups belong to the job, not
    to the actor) and Ray Train's PlacementGroupCleaner, which removes it, asks the State API
    whether the controller died. Without the dashboard that question fails, the CPUs stay
    reserved, and every later trial waits for a worker group that never starts.
    """
    from octoray.raylocal import has_state_api

    if not has_state_api():
        raise UserError("octoray tune needs Ray's State API (the dashboard): start the cluster with "
                        "its dashboard (ray start --head, the default), or let octoray tune start a local Ray")


def search_space(tcfg: TuneConfig) -> dict[str, Any]:
    """Tune's param_space from the tune: section (single choices become constants)."""
    from ray import tune

    space: dict[str, Any] = {"lr": tune.loguniform(tcfg.lr[0], tcfg.lr[1]) if tcfg.lr[0] < tcfg.lr[1] else tcfg.lr[0]}
    for name in ("warmup_steps", "batch_size", "lora_r"):
        choices = list(getattr(tcfg, name))
        if choices:
            space[name] = tune.choice(choices) if len(choices) > 1 else choices[0]
    return space


def max_concurrent(tcfg: TuneConfig, base: Any) -> int:
    """How many trials fit the cluster at once (each needs num_workers x its worker resources)."""
    if tcfg.max_concurrent_trials:
        return tcfg.max_concurrent_trials
    import ray

    from octoray.training import _use_gpu

    resources = ray.cluster_resources()
    # One CPU stays free for each trial's Ray Data ingest tasks: trials whose workers take every
    # CPU starve their own data pipelines and hang.
    fits = int((resources.get("CPU", 1) - 1) // (base.num_workers * base.cpus_per_worker))
    if _use_gpu(base):
        fits = min(fits, int(resources.get("GPU", 0) // base.num_workers))
    return max(1, fits)


def _run_tuner(tcfg: TuneConfig, base: Any, model_path: str, datasets: dict[str, Any], out_dir: Path) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from octoray.training import _ray_storage

    reports = math.ceil(base.max_steps / base.checkpoint_every)  # one val_loss per checkpoint
    trainable = tune.with_parameters(_trial, base=to_dict(base), model_path=model_path,
                                     trials_dir=str(out_dir / "trials"), datasets=datasets)
    # The trial function only waits on its TorchTrainer; the workers hold the CPUs/GPUs. Tune
    # refuses an all-zero bundle, so the driver reserves 1 MiB of memory instead of a CPU.
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 2**20})
    concurrent = max_concurrent(tcfg, base)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(tcfg),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=tcfg.num_samples,
            # The limit goes to the generator itself: Tune ignores TuneConfig.max_concurrent_trials
            # when search_alg is a SearchGenerator, and trials past what the CPUs hold would wait
            # on their worker groups until Ray Train's startup timeout.
            search_alg=BasicVariantGenerator(random_state=tcfg.seed, max_concurrent=concurrent),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max(1, reports),
                                    grace_period=min(tcfg.grace_period, max(1, reports)),
                                    reduction_factor=tcfg.reduction_factor)),
        run_config=tune.RunConfig(name="tune", **_ray_storage(out_dir)),  # a path, or bucket + file system
    )
    return tuner.fit()


def _trial(params: dict[str, Any], *, base: dict[str, Any], model_path: str, trials_dir: str,
           datasets: dict[str, Any]) -> None:
    """One trial: the base TrainConfig with this trial's hyperparameters, trained by ``fit``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from octoray.storage import location
    from octoray.training import TrainConfig, fit

    cfg = from_mapping(TrainConfig, {**base, **params})
    run_dir = location(trials_dir) / ray.tune.get_context().get_trial_id()
    fit(cfg, model_path=model_path, datasets=datasets, run_dir=run_dir, callbacks=[TuneReportCallback()])


def summarize(results: Any, base: Any) -> dict[str, Any]:
    """best.json: the best trial (lowest val_loss ever reported), its checkpoint, and every trial."""
    trials = []
    for result in results:
        frame = result.metrics_dataframe
        row: dict[str, Any] = {"trial_id": result.metrics.get("trial_id") if result.metrics else None,
                               "config": _plain(result.config), "error": str(result.error) if result.error else None,
                               "reports": 0, METRIC: None, "checkpoint": None, "stopped_early": False}
        if frame is not None and METRIC in frame:
            frame = frame.dropna(subset=[METRIC])
            if len(frame):
                best_row = frame.loc[frame[METRIC].idxmin()]
                row.update(reports=int(len(frame)), **{METRIC: float(best_row[METRIC])},
                           checkpoint=best_row.get("checkpoint_path"),
                           last_step=int(frame["step"].max()) if "step" in frame else None)
                row["stopped_early"] = row["last_step"] is not None and row["last_step"] < base.max_steps
        trials.append(row)
    ranked = [t for t in trials if t[METRIC] is not None]
    if not ranked:
        errors = "; ".join(t["error"] for t in trials if t["error"]) or "no trial reported a validation loss"
        raise RuntimeError(f"every trial failed: {errors[:2000]}")
    best = min(ranked, key=lambda t: t[METRIC])
    return {"metric": METRIC, "mode": "min", "best": best, "trials": trials}


def _plain(config: dict[str, Any] | None) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in (config or {}).items()}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``octoray tune CONFIG.yaml --data SFT_DIR --out DIR [key=value | train.key=value ...]``."""
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="a YAML config (its train: and tune: sections); key=value sets a tune: key, "
                             "train.key=value a train: key")
    parser.add_argument("--data", help="sft/ directory written by 'octoray filter'")
    parser.add_argument("--out", help="tuning directory (trials/, best.json)")
    parser.epilog = "tune: keys:\n" + "\n".join(help_lines(TuneConfig))


def load_tune_configs(args: argparse.Namespace) -> tuple[TuneConfig, Any]:
    """(TuneConfig, base TrainConfig) from CONFIG.yaml, --data/--out and the overrides."""
    from octoray.training import TrainConfig

    positional, overrides = split_overrides(args.args)
    if len(positional) > 1:
        raise UserError(f"expected one config file, got {len(positional)}: {' '.join(positional)}")
    path = positional[0] if positional else None
    train_overrides = [o[len("train."):] for o in overrides if o.startswith("train.")]
    tune_overrides = [o for o in overrides if not o.startswith("train.")]
    tcfg = load_config(TuneConfig, path, tune_overrides, section="tune", values={"data": args.data, "out": args.out})
    train_cfg = load_config(TrainConfig, path, train_overrides, section="train")
    return tcfg, train_cfg


def main(args: argparse.Namespace) -> int:
    """Entry point of ``octoray tune``."""
    out_dir = run(*load_tune_configs(args))
    print(f"octoray tune: best trial in {out_dir / BEST_FILE}")
    return 0

