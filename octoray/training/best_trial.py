"""The tune -> train hand-off: the ``train:`` section overridden by the best trial of ``tune/best.json``.

``octoray tune`` writes ``best.json`` (the trial with the lowest validation loss, its
hyperparameters and its best checkpoint). A train run with ``hparams: TUNE_DIR`` (the pipeline
sets it when 'tune' is among the stages; ``octoray train --hparams TUNE_DIR`` on the command line)
starts from those hyperparameters instead of the section's own, and says so in its log, in
``config.yaml`` and in its manifest.

With ``from_best_checkpoint`` it continues from the best trial's checkpoint rather than training
from scratch. A DeepSpeed checkpoint carries the optimizer state, the learning-rate schedule
position and the ZeRO partitioning of its run, so it is only a valid start for a run with the
same model, schedule and worker count: :func:`checkpoint_mismatches` lists what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from octoray.config import from_mapping, to_dict
from octoray.errors import UserError
from octoray.storage.layout import BEST_FILE, MANIFEST
from octoray.storage.locations import Location, location
from octoray.storage.stage_dirs import read_json, require_stage_output
from octoray.training.train_config import TrainConfig

#: What a DeepSpeed checkpoint fixes: continuing from one needs these equal in trial and run.
#: (The data split, checkpoint cadence and validation fraction may differ.)
CHECKPOINT_KEYS = ("model", "demo_layers", "demo_embd", "demo_vocab", "seq_len", "num_workers", "zero_stage",
                   "offload_optimizer", "offload_params", "precision", "batch_size", "micro_batch", "lr",
                   "warmup_steps", "min_lr_ratio", "weight_decay", "max_steps", "lora", "lora_r", "lora_alpha",
                   "lora_dropout", "lora_targets")


@dataclass(frozen=True)
class Handoff:
    """Where a train run's hyperparameters came from."""

    tune_dir: Location
    trial_id: str
    val_loss: float
    params: dict[str, Any]      # the searched keys and the best trial's values
    replaced: dict[str, Any]    # the train: section's values they replaced
    checkpoint: Path | None     # the best trial's checkpoint, when continuing from it
    trial_config: dict[str, Any]  # the best trial's full TrainConfig (base + params)

    def summary(self) -> str:
        """One line for the log and the config.yaml header."""
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        was = ", ".join(f"{k}={_fmt(v)}" for k, v in self.replaced.items())
        start = (f"continuing from its checkpoint {self.checkpoint}" if self.checkpoint
                 else "training from scratch")
        return (f"hyperparameters of the best trial {self.trial_id} of {self.tune_dir / BEST_FILE} "
                f"(val_loss {self.val_loss:.4f}): {values} (the train: section had {was}); {start}")

    def record(self) -> dict[str, Any]:
        """What the train manifest keeps about the hand-off."""
        return {"tune_dir": str(self.tune_dir), "trial_id": self.trial_id, "val_loss": self.val_loss,
                "params": self.params, "replaced": self.replaced,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}


def read_best(tune_dir: Location) -> dict[str, Any]:
    """``best.json`` of a complete tune directory, or a one-line UserError."""
    tune_dir = location(tune_dir)
    require_stage_output(tune_dir, "tune", "tuning (hparams)")
    best = read_json(tune_dir / BEST_FILE)
    if not isinstance(best, dict) or not isinstance(best.get("best"), dict) or "config" not in best["best"]:
        raise UserError(f"{tune_dir / BEST_FILE} names no best trial: rerun 'octoray tune'")
    return best


def apply_best(cfg: TrainConfig) -> tuple[TrainConfig, Handoff]:
    """``cfg`` (with ``hparams`` set) with the best trial's hyperparameters applied."""
    tune_dir = location(cfg.hparams).resolve()
    best = read_best(tune_dir)
    trial = best["best"]
    params = dict(trial["config"])
    unknown = sorted(set(params) - set(to_dict(cfg)))
    if unknown:
        raise UserError(f"{tune_dir / BEST_FILE} holds keys a train config does not have: {', '.join(unknown)}")
    current = to_dict(cfg)
    # Checked again: e.g. the best warmup_steps may not fit a shorter train: budget.
    applied = from_mapping(TrainConfig, {**current, **params},
                           source=f"train: section with the hyperparameters of {tune_dir / BEST_FILE}")
    manifest = read_json(tune_dir / MANIFEST)
    trial_config = {**manifest.get("train_config", {}), **params}
    checkpoint = None
    if cfg.from_best_checkpoint:
        mismatches = checkpoint_mismatches(trial_config, to_dict(applied))
        if mismatches:
            raise UserError("from_best_checkpoint needs the best trial to have trained exactly like this run, "
                            f"but {'; '.join(mismatches)}: make them equal (tune.max_steps, tune.num_workers, "
                            "the train: section) or train from scratch (from_best_checkpoint: false)")
        checkpoint = Path(trial.get("checkpoint") or "")
        if not trial.get("checkpoint") or not checkpoint.is_dir():
            raise UserError(f"the best trial's checkpoint {trial.get('checkpoint')} is gone: rerun 'octoray tune' "
                            "or train from scratch (from_best_checkpoint: false)")
    return applied, Handoff(tune_dir=tune_dir, trial_id=str(trial.get("trial_id")), val_loss=float(trial["val_loss"]),
                            params=params, replaced={k: current[k] for k in params}, checkpoint=checkpoint,
                            trial_config=trial_config)


def checkpoint_mismatches(trial: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """``"max_steps 12 (trial) vs 24 (train)"`` for every checkpoint-relevant key that differs."""
    return [f"{key} {_fmt(trial.get(key))} (trial) vs {_fmt(run.get(key))} (train)"
            for key in CHECKPOINT_KEYS if key in trial and trial.get(key) != run.get(key)]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
