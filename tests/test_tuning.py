"""octoray tune: search space and config checks (fast); a real ASHA search over Ray Train trials."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest

from octoray.config import ConfigError, from_mapping
from octoray.errors import UserError
from octoray.training import TrainConfig
from octoray.tuning import TuneConfig, load_tune_configs, trial_base
from tests.conftest import REPO_ROOT, run_cli
from tests.train_helpers import write_sft


def test_tune_config_problems() -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(TuneConfig, {"lr": [1e-3, 1e-4], "val_fraction": 0.0, "reduction_factor": 1})
    for fragment in ("lr must be a range", "val_fraction", "reduction_factor"):
        assert fragment in str(err.value)


def test_trial_base_applies_budget_and_checks_batch_choices() -> None:
    train = from_mapping(TrainConfig, {"num_workers": 2, "micro_batch": 1, "batch_size": 4, "max_steps": 35})
    base = trial_base(train, from_mapping(TuneConfig, {"max_steps": 6, "num_workers": 1, "val_fraction": 0.2}))
    assert (base.max_steps, base.num_workers, base.val_fraction, base.export) == (6, 1, 0.2, False)
    with pytest.raises(UserError, match="batch_size choice 3 is not divisible"):
        trial_base(train, from_mapping(TuneConfig, {"batch_size": [4, 3]}))
    with pytest.raises(UserError, match="lora_r choices need lora: true"):
        trial_base(train, from_mapping(TuneConfig, {"lora_r": [8, 16]}))


def test_overrides_split_between_tune_and_train_sections() -> None:
    args = types.SimpleNamespace(args=[str(REPO_ROOT / "jobs" / "demo.yaml"), "num_samples=3", "train.lr=0.01"],
                                 data="sft", out="tune")
    tcfg, train = load_tune_configs(args)
    assert tcfg.num_samples == 3 and train.lr == 0.01 and str(tcfg.data) == "sft"


def test_cli_tune_bad_config_is_one_line(tmp_path: Path) -> None:
    result = run_cli("tune", "jobs/demo.yaml", "--data", tmp_path, "--out", tmp_path / "t", "lr=[1, 2, 3]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lr must be a range" in result.stderr.strip().splitlines()[-1]


@pytest.mark.ray
@pytest.mark.slow
def test_asha_search_names_best_trial(tmp_path: Path, ray_local) -> None:
    from octoray import tuning

    sft = write_sft(tmp_path / "sft", n=200)
    train = from_mapping(TrainConfig, {"model": "demo", "demo_layers": 1, "demo_embd": 32, "demo_vocab": 512,
                                       "seq_len": 64, "device": "cpu", "precision": "fp32", "micro_batch": 1,
                                       "batch_size": 2, "checkpoint_every": 2})
    tcfg = from_mapping(TuneConfig, {"data": str(sft), "out": str(tmp_path / "tune"), "lr": [1e-4, 1e-2],
                                     "warmup_steps": [1, 2], "batch_size": [1, 2], "num_samples": 3,
                                     "num_workers": 1, "max_steps": 6, "val_fraction": 0.1, "grace_period": 1,
                                     "reduction_factor": 2})
    out = tuning.run(tcfg, train)
    best = json.loads((out / "best.json").read_text())
    assert len(best["trials"]) == 3 and all(t["reports"] >= 1 for t in best["trials"])
    ids = {t["trial_id"] for t in best["trials"]}
    assert best["best"]["trial_id"] in ids and math.isfinite(best["best"]["val_loss"])
    assert best["best"]["val_loss"] == min(t["val_loss"] for t in best["trials"])
    assert set(best["best"]["config"]) == {"lr", "warmup_steps", "batch_size"}
    assert Path(best["best"]["checkpoint"]).is_dir()  # the best trial's DeepSpeed checkpoint
    assert (Path(best["best"]["checkpoint"]) / "octoray_state.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["complete"]
    # ASHA stopped a trial, and the trial after it still got its worker: a stopped trial's
    # placement group is released (it used to leak and hang every later trial).
    assert [t["stopped_early"] for t in best["trials"]] == [False, True, False]
    assert best["trials"][-1]["last_step"] == 6
