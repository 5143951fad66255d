"""``octoray tune``: Ray Tune over the training hyperparameters, with ASHA early stopping.

Each trial is a small function that builds one ``TorchTrainer`` through
:func:`octoray.training.driver.fit`, so trials run the very same ``train_loop_per_worker`` as
``octoray train`` (Ray 2.60: ``Tuner(trainer)`` is deprecated; a function per trial is the way).
Workers report ``val_loss`` with every checkpoint; ``TuneReportCallback`` forwards those reports
to Tune (it is Ray's bridge from ``ray.train.report`` on the workers to ``ray.tune.report``),
where ASHA stops the trials that fall behind.

The config file's ``train:`` section is the base of every trial; its ``tune:`` section is the
search space, the searcher (random sampling or Optuna's TPE) and the scheduler. The space is
checked against the trial budget before any trial starts. ``DIR/best.json`` names the best trial,
its hyperparameters, its validation loss and its best checkpoint, with a row per trial (its
validation curve, steps run, whether ASHA stopped it); ``DIR/trials/<trial_id>/`` holds each
trial's run. ``octoray train --hparams DIR`` (and the pipeline's train stage) train with the best
trial's hyperparameters (:mod:`octoray.training.best_trial`).

When the search ends, however it ends, every placement group it created is removed before the
function returns (:mod:`octoray.cluster.resources`), so the next stage finds the cluster free.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from octoray.config import ConfigError, from_mapping, load_config, to_dict
from octoray.errors import UserError
from octoray.resumable import StageRun
from octoray.storage.layout import BEST_FILE, MANIFEST, METRICS_FILE, RESOLVED_CONFIG
from octoray.storage.locations import Location, location
from octoray.storage.stage_dirs import atomic_write_json, input_record, require_stage_output
from octoray.training.train_config import TrainConfig
from octoray.training.tune_config import METRIC, STAGE, TuneConfig

#: The command line (octoray.stage_cli): ``octoray tune CONFIG.yaml --data sft/ --out tune/ [train.key=value]``.
CONFIG = TuneConfig
INPUT = None
NESTED = ("train",)


def load(path: str | None, overrides: list[str], nested: dict[str, list[str]], *, values: dict[str, Any],
         check_inputs: bool = True) -> tuple[TuneConfig, TrainConfig]:
    """(TuneConfig, base TrainConfig) from the config file's tune: and train: sections and the
    command line (``train.key=value`` sets a train: key); the search space is checked against the
    trial budget together with the tune: section's own checks."""
    from octoray.stage_cli import input_check

    train_cfg = load_config(TrainConfig, path, nested.get("train", []), section="train")
    own_inputs = input_check(check_inputs)

    def check(tcfg: TuneConfig) -> list[str]:
        return check_search_space(tcfg, train_cfg) + (own_inputs(tcfg) if own_inputs else [])

    tcfg = load_config(TuneConfig, path, overrides, section=STAGE, values=values, check=check)
    return tcfg, train_cfg


#: Search-space keys that are lists of choices (lr is a range).
CHOICE_KEYS = ("warmup_steps", "batch_size", "weight_decay", "lora_r", "lora_alpha", "lora_dropout")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout")


def trial_base(train_cfg: TrainConfig, tcfg: TuneConfig) -> TrainConfig:
    """The TrainConfig every trial starts from: the train: section with the tune: budget applied.

    Raises one ConfigError listing every way the search space breaks that budget.
    """
    base, problems = _trial_base(train_cfg, tcfg)
    if problems:
        raise ConfigError(problems, "tune config")
    return base


def check_search_space(tcfg: TuneConfig, train_cfg: TrainConfig) -> list[str]:
    """Every reason the search space cannot work with the trial budget, as sentences (empty: fine).

    Each choice is tried on the trial base as the trial would build it, so every rule of
    TrainConfig applies (warmup shorter than max_steps, a batch that divides into workers ...)
    without being restated here; a trial can then no longer die at start for its hyperparameters.
    """
    return _trial_base(train_cfg, tcfg)[1]


def _trial_base(train_cfg: TrainConfig, tcfg: TuneConfig) -> tuple[TrainConfig, list[str]]:
    changes: dict[str, Any] = {"val_fraction": tcfg.val_fraction, "export": False, "fail_at_step": 0,
                               "data": None, "out": None, "hparams": None, "from_best_checkpoint": False}
    if tcfg.max_steps:
        changes["max_steps"] = tcfg.max_steps
    if tcfg.num_workers:
        changes["num_workers"] = tcfg.num_workers
    try:
        base = from_mapping(TrainConfig, {**to_dict(train_cfg), **changes}, source="train: section under tune")
    except ConfigError as exc:
        return None, [f"the trial base (the train: section with tune's budget) is invalid: {p}" for p in exc.problems]
    budget = f"a trial runs max_steps={base.max_steps} on {base.num_workers} worker(s) x micro_batch {base.micro_batch}"
    problems: list[str] = []
    if not base.lora:
        problems += [f"{name} choices need lora: true in the train: section" for name in LORA_KEYS
                     if getattr(tcfg, name)]
    trial_keys = [name for name in CHOICE_KEYS if name not in LORA_KEYS or base.lora]
    candidates = [("lr", v) for v in dict.fromkeys(tcfg.lr[:2])] if len(tcfg.lr) == 2 else []
    candidates += [(name, v) for name in trial_keys for v in dict.fromkeys(getattr(tcfg, name))]
    for name, value in candidates:
        try:
            from_mapping(TrainConfig, {**to_dict(base), name: value})
        except ConfigError as exc:
            problems += [f"{name} choice {value} does not fit the trial budget ({budget}): {p}" for p in exc.problems]
    reports = math.ceil(base.max_steps / base.checkpoint_every)
    if tcfg.grace_period > reports:
        problems.append(f"grace_period {tcfg.grace_period} exceeds the {reports} validation report(s) a trial makes "
                        f"(max_steps {base.max_steps} / checkpoint_every {base.checkpoint_every}), so ASHA could "
                        "never stop a trial: lower it or report more often")
    return base, list(dict.fromkeys(problems))


def run(tcfg: TuneConfig, train_cfg: TrainConfig) -> Location:
    """Run the search and write ``DIR/best.json``; returns DIR."""
    from octoray.training.driver import resolve_model, wait_for_workers
    from octoray.training.sft_data import prepare_datasets

    if tcfg.data is None or tcfg.out is None:
        raise UserError("pass --data SFT_DIR (the output of 'octoray filter') and --out DIR")
    data_dir, out_dir = location(tcfg.data).resolve(), location(tcfg.out).resolve()
    sft_manifest = require_stage_output(data_dir, "filter", "SFT data")
    base = trial_base(train_cfg, tcfg)  # every problem of the space, before any work
    stage = StageRun(STAGE, out_dir, tcfg, inputs={"sft": input_record(data_dir, sft_manifest)})
    changed = _changed_keys(stage.previous or {}, tcfg, base) if stage.complete() else []
    if stage.reusable(same=lambda previous: f"the search changed: {', '.join(changed)}" if changed else True):
        return out_dir
    if stage.stale:  # other data or another search: the old trials must not be resumed
        _clear(out_dir)
    # The State API needs the dashboard (see _require_state_api).
    stage.start(log_to_driver=True, dashboard=True)
    model_path = resolve_model(base, data_dir, out_dir)
    _require_state_api()
    if tcfg.search == "optuna":
        _require_optuna()
    datasets, counts = prepare_datasets(base, data_dir, model_path)

    from octoray.cluster.resources import placement_groups, release_placement_groups

    before = set(placement_groups())
    try:
        wait_for_workers(base, "octoray tune (one trial)")
        results = _run_tuner(tcfg, base, model_path, datasets, out_dir)
    finally:
        # However the search ended, nothing it reserved may outlive it: a stopped or failed trial's
        # worker placement group would otherwise hold its CPUs until the driver exits.
        removed = release_placement_groups(before)
        if removed:
            stage.say(f"removed {len(removed)} placement group(s) left by trials: {', '.join(removed)}")
    best = summarize(results, base, out_dir / "trials")
    best["search"] = tcfg.search
    atomic_write_json(out_dir / BEST_FILE, best)
    stage.say(f"best trial {best['best']['trial_id']} {METRIC}={best['best'][METRIC]:.4f} "
              f"config={best['best']['config']} ({tcfg.search} search, {best['trial_steps']} trial-steps)")
    stage.finish(rows=len(best["trials"]), files=[BEST_FILE, RESOLVED_CONFIG],
                 extra={"model_path": model_path, "counts": counts, "train_config": to_dict(base)})
    stage.say(f"best trial in {out_dir / BEST_FILE}")
    return out_dir


def _changed_keys(manifest: dict[str, Any], tcfg: TuneConfig, base: TrainConfig) -> list[str]:
    """Keys of the tune: section or the trial base that differ from the finished search's."""
    paths = {"data", "out"}
    searched = set(CHOICE_KEYS) | {"lr"}
    old_tune, old_base = manifest.get("config", {}), manifest.get("train_config", {})
    changed = [k for k, v in to_dict(tcfg).items() if k not in paths and old_tune.get(k) != v]
    changed += [f"train.{k}" for k, v in to_dict(base).items()
                if k not in paths | searched and old_base.get(k) != v]
    return changed


def _clear(out_dir: Path) -> None:
    """Drop a finished search's outputs (manifest first: an interrupted clear is just incomplete)."""
    for name in (MANIFEST, BEST_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for name in ("trials", "tune"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def _require_optuna() -> None:
    import importlib.util

    if importlib.util.find_spec("optuna") is None:  # an optional extra: say how to get it
        raise UserError("search: optuna needs the optuna package: pip install 'octoray[tune]' "
                        "(or search: random)")


def _require_state_api() -> None:
    """Refuse to tune on a Ray without its State API rather than hang mid-search.

    When ASHA stops a trial, Tune kills the trial's actor and with it the Ray Train controller;
    the controller's worker placement group outlives it (placement groups belong to the job, not
    to the actor) and Ray Train's PlacementGroupCleaner, which removes it, asks the State API
    whether the controller died. Without the dashboard that question fails, the CPUs stay
    reserved, and every later trial waits for a worker group that never starts.
    """
    from octoray.cluster.connection import has_state_api

    if not has_state_api():
        raise UserError("octoray tune needs Ray's State API (the dashboard): start the cluster with "
                        "its dashboard (ray start --head, the default), or let octoray tune start a local Ray")


def search_space(tcfg: TuneConfig) -> dict[str, Any]:
    """Tune's param_space from the tune: section (single choices become constants)."""
    from ray import tune

    space: dict[str, Any] = {"lr": tune.loguniform(tcfg.lr[0], tcfg.lr[1]) if tcfg.lr[0] < tcfg.lr[1] else tcfg.lr[0]}
    for name in CHOICE_KEYS:
        choices = list(getattr(tcfg, name))
        if choices:
            space[name] = tune.choice(choices) if len(choices) > 1 else choices[0]
    return space


def max_concurrent(tcfg: TuneConfig, base: TrainConfig) -> int:
    """How many trials fit the cluster at once (each needs num_workers x its worker resources)."""
    if tcfg.max_concurrent_trials:
        return tcfg.max_concurrent_trials
    import ray

    from octoray.training.driver import use_gpu

    resources = ray.cluster_resources()
    # One CPU stays free for each trial's Ray Data ingest tasks: trials whose workers take every
    # CPU starve their own data pipelines and hang.
    fits = int((resources.get("CPU", 1) - 1) // (base.num_workers * base.cpus_per_worker))
    if use_gpu(base):
        fits = min(fits, int(resources.get("GPU", 0) // base.num_workers))
    return max(1, fits)


def searcher(tcfg: TuneConfig, concurrent: int) -> Any:
    """The search algorithm, limited to ``concurrent`` trials at once and seeded.

    The limit goes to the searcher itself: Tune ignores TuneConfig.max_concurrent_trials when
    search_alg is given, and trials past what the CPUs hold would wait on their worker groups.
    Optuna's TPE models the results of finished trials, so it is wrapped in a ConcurrencyLimiter
    (and, on a small cluster, sees each result before it suggests the next trial).
    """
    if tcfg.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=tcfg.seed, max_concurrent=concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    startup = tcfg.startup_trials or max(2, tcfg.num_samples // 4)
    sampler = optuna.samplers.TPESampler(seed=tcfg.seed, n_startup_trials=startup)
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=concurrent)


def _run_tuner(tcfg: TuneConfig, base: TrainConfig, model_path: str, datasets: dict[str, Any], out_dir: Path) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from octoray.training.driver import ray_storage

    reports = math.ceil(base.max_steps / base.checkpoint_every)  # one val_loss per checkpoint
    trainable = tune.with_parameters(_trial, base=to_dict(base), model_path=model_path,
                                     trials_dir=str(out_dir / "trials"), datasets=datasets,
                                     fail_trial=tcfg.fail_trial)
    # The trial function only waits on its TorchTrainer; the workers hold the CPUs/GPUs. Tune
    # refuses an all-zero bundle, so the driver reserves 1 MiB of memory instead of a CPU.
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 2**20})
    concurrent = max_concurrent(tcfg, base)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(tcfg),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=tcfg.num_samples,
            search_alg=searcher(tcfg, concurrent),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max(1, reports),
                                    grace_period=tcfg.grace_period, reduction_factor=tcfg.reduction_factor)),
        run_config=tune.RunConfig(name="tune", **ray_storage(out_dir)),  # a path, or bucket + file system
    )
    return tuner.fit()


def _trial(params: dict[str, Any], *, base: dict[str, Any], model_path: str, trials_dir: str,
           datasets: dict[str, Any], fail_trial: int = 0) -> None:
    """One trial: the base TrainConfig with this trial's hyperparameters, trained by ``fit``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from octoray.storage.locations import location
    from octoray.training.driver import fit

    cfg = from_mapping(TrainConfig, {**base, **params}, source="trial config")
    trial_id = ray.tune.get_context().get_trial_id()
    callbacks = [TuneReportCallback()]
    if fail_trial and _trial_number(trial_id) == fail_trial:
        callbacks.insert(0, _DieAtFirstReport())  # first: Tune never sees the report, the trial errors
    fit(cfg, model_path=model_path, datasets=datasets, run_dir=location(trials_dir) / trial_id, callbacks=callbacks)


def _trial_number(trial_id: str) -> int:
    """1-based start order of a trial from its id (``<experiment>_<00000-based index>``)."""
    return int(trial_id.rsplit("_", 1)[-1]) + 1


def _DieAtFirstReport() -> Any:
    """Test hook (``fail_trial``): a Ray Train callback that kills the trial's Train controller
    abruptly at its first report (callbacks run in the controller; this one runs before
    TuneReportCallback forwards the report), with its worker group and placement group still up:
    the trial errors, and the placement group is left behind, as after a real crash."""
    import os

    from ray.train.v2.api.callback import UserCallback

    class DieAtFirstReport(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            os._exit(1)

    return DieAtFirstReport()


def summarize(results: Any, base: TrainConfig, trials_dir: Path) -> dict[str, Any]:
    """best.json: the best trial (lowest val_loss ever reported), its checkpoint, and a row per trial.

    Each row: trial_id, config, val_loss (its best), checkpoint, reports, steps (optimizer steps
    it ran, from its metrics.jsonl: the compute it cost), val_curve ([step, val_loss] per report),
    status (completed / stopped by ASHA / error) and error (one line).
    """
    from octoray.training.metrics import read_metrics

    trials = []
    for result in results:
        trial_id = _trial_id(result)
        rows = read_metrics(trials_dir / trial_id / METRICS_FILE) if trial_id else []
        row: dict[str, Any] = {"trial_id": trial_id, "config": _plain(result.config), METRIC: None,
                               "checkpoint": None, "reports": 0, "steps": max((r["step"] for r in rows), default=0),
                               "val_curve": [], "status": "completed", "error": None}
        frame = result.metrics_dataframe
        if frame is not None and METRIC in frame:
            frame = frame.dropna(subset=[METRIC])
            if len(frame):
                best_row = frame.loc[frame[METRIC].idxmin()]
                row.update(reports=int(len(frame)), **{METRIC: float(best_row[METRIC])},
                           checkpoint=best_row.get("checkpoint_path"),
                           val_curve=[[int(s), float(v)] for s, v in zip(frame["step"], frame[METRIC])]
                           if "step" in frame else [])
        if result.error is not None:
            row.update(status="error", error=error_line(result.error))
        elif row["steps"] < base.max_steps:
            row["status"] = "stopped by ASHA"
        row["stopped_early"] = row["status"] == "stopped by ASHA"
        trials.append(row)
    ranked = [t for t in trials if t[METRIC] is not None]
    if not ranked:
        errors = "; ".join(dict.fromkeys(t["error"] for t in trials if t["error"])) or "no trial reported a validation loss"
        raise UserError(f"every trial failed: {errors[:500]}")
    best = min(ranked, key=lambda t: t[METRIC])
    return {"metric": METRIC, "mode": "min", "max_steps": base.max_steps,
            "trial_steps": sum(t["steps"] for t in trials), "best": best, "trials": trials}


def _trial_id(result: Any) -> str | None:
    """The trial's id: reported with its metrics, else in its Tune directory's name."""
    import re

    if result.metrics and result.metrics.get("trial_id"):
        return str(result.metrics["trial_id"])
    match = re.search(r"_([0-9a-f]{5}_\d{5})(?:_|$)", Path(str(result.path or "")).name)
    return match.group(1) if match else None


def error_line(error: BaseException) -> str:
    """A trial's error as one readable line: the octoray UserError inside, else the last line."""
    from octoray.errors import user_error_in

    user = user_error_in(error)
    if user is not None:
        return str(user).strip().splitlines()[0]
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _plain(config: dict[str, Any] | None) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in (config or {}).items()}
