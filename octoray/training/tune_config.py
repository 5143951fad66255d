"""The config of ``octoray tune`` (a leaf: imports nothing from octoray.training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from octoray.config import option
from octoray.storage.stage_dirs import input_dir_problems

STAGE = "tune"
#: What ASHA ranks trials by, and the best trial is chosen by.
METRIC = "val_loss"


@dataclass(frozen=True)
class TuneConfig:
    """The ``tune:`` section: search space, trial budget and ASHA settings."""

    data: Optional[str] = option(None, "sft/ directory written by 'octoray filter'; a path or a URI", metavar="SFT_DIR")
    out: Optional[str] = option(None, "tuning directory: trials/, tune/ (Ray Tune state), best.json; "
                                      "a path or a URI (s3://bucket/prefix)", metavar="DIR")
    search: Literal["random", "optuna"] = option("random", "searcher: random sampling, or optuna (Optuna's TPE "
                                                           "through ray.tune.search.optuna; pip install 'octoray[tune]')")
    lr: tuple[float, ...] = option((1e-4, 1e-3), "learning-rate range [low, high], sampled log-uniformly")
    warmup_steps: tuple[int, ...] = option((1, 3), "warmup steps to choose from (each < the trial's max_steps)")
    batch_size: tuple[int, ...] = option((), "global batch sizes to choose from (empty: the train: value)")
    weight_decay: tuple[float, ...] = option((), "AdamW weight decays to choose from (empty: the train: value)")
    lora_r: tuple[int, ...] = option((), "LoRA ranks to choose from (needs lora: true under train:)")
    lora_alpha: tuple[int, ...] = option((), "LoRA alphas to choose from (needs lora: true under train:)")
    lora_dropout: tuple[float, ...] = option((), "LoRA dropouts to choose from (needs lora: true under train:)")
    num_samples: int = option(8, "number of trials")
    max_steps: int = option(0, "optimizer steps per trial (0: the train: value)")
    num_workers: int = option(0, "Ray Train workers per trial (0: the train: value)")
    val_fraction: float = option(0.1, "packed sequences held out for the validation loss ASHA ranks by")
    grace_period: int = option(1, "ASHA: validation reports (one per checkpoint) before a trial may be stopped")
    reduction_factor: int = option(2, "ASHA: keep the best 1/reduction_factor at each rung")
    max_concurrent_trials: int = option(0, "trials at once (0: as many as the cluster's CPUs/GPUs hold)")
    startup_trials: int = option(0, "optuna: random trials before TPE models the results (0: a quarter of "
                                    "num_samples, at least 2; Optuna's own default, 10, would leave TPE idle in a small search)")
    seed: int = option(0, "seed of the search (random sampling and Optuna's TPE)")
    fail_trial: int = option(0, "testing hook: the N-th trial (1-based) crashes (its Ray Train controller exits "
                                "abruptly) at its first report (0 = never)")

    def problems(self) -> list[str]:
        """Every inconsistency in the search space itself, for one ConfigError (the trial budget is
        checked against the train: section by :func:`check_search_space`)."""
        out = []
        if len(self.lr) != 2 or not 0 < self.lr[0] <= self.lr[1]:
            out.append(f"lr must be a range [low, high] with 0 < low <= high, got {list(self.lr)}")
        for name, low in (("warmup_steps", 0), ("batch_size", 1), ("weight_decay", 0), ("lora_r", 1),
                          ("lora_alpha", 1), ("lora_dropout", 0)):
            if any(v < low for v in getattr(self, name)):
                out.append(f"{name} choices must be >= {low}, got {list(getattr(self, name))}")
        if any(v >= 1 for v in self.lora_dropout):
            out.append(f"lora_dropout choices must be < 1, got {list(self.lora_dropout)}")
        if self.startup_trials < 0 or self.fail_trial < 0:
            out.append("startup_trials and fail_trial must be >= 0")
        for name in ("num_samples", "grace_period", "reduction_factor"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reduction_factor == 1:
            out.append("reduction_factor must be >= 2")
        if not 0 < self.val_fraction < 1:
            out.append(f"val_fraction must be in (0, 1): ASHA needs a validation loss, got {self.val_fraction}")
        return out

    def input_problems(self) -> list[str]:
        """What ``octoray tune`` by itself needs: SFT data that exists and an output directory (the
        pipeline writes the data as it goes, so this is not part of :meth:`problems`)."""
        return input_dir_problems(data=self.data, out=self.out)
