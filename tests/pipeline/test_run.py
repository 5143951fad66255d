"""``octoray pipeline`` end to end: killed during training, rerun, it finishes without redoing
mining or filtering and without losing a step.

The real command in a subprocess (its own embedded Ray), killed with SIGKILL as a crash or an
evicted node would kill it, then rerun as a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from octoray.training.metrics import read_metrics
from tests.helpers import OCTORAY, REPO_ROOT, run_cli

MAX_STEPS = 160
CHECKPOINT_EVERY = 8


def _snapshot(stage_dir: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file of a finished stage: (mtime_ns, manifest bytes), to prove a rerun left it alone."""
    return {str(p.relative_to(stage_dir)): (p.stat().st_mtime_ns, p.read_bytes() if p.suffix == ".json" else None)
            for p in sorted(stage_dir.rglob("*")) if p.is_file()}


def _wait_for_registered_checkpoint(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until Ray Train has registered the first checkpoint (its snapshot file names it)."""
    first = f"checkpoint_{CHECKPOINT_EVERY:06d}"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if snapshot.is_file() and first in snapshot.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"the pipeline exited ({proc.returncode}) before its first checkpoint:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no registered checkpoint after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.toolchain
@pytest.mark.slow
def test_pipeline_killed_during_training_reruns_to_completion(tmp_path: Path, shared_dir: Path) -> None:
    out = tmp_path / "run"
    args = ["pipeline", "jobs/demo.yaml", "--out", str(out), "--data-dir", str(shared_dir / "humanevalpack"),
            f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "eval.limit=2", "latency_requests=4"]
    log = tmp_path / "first.log"
    with log.open("w") as handle:
        # A session of its own, so the kill reaches the driver and every process it started.
        first = subprocess.Popen([*OCTORAY, *args], cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        _wait_for_registered_checkpoint(out / "train", first, log, timeout=600)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (out / "train" / "model").exists(), "the kill came too late: training had finished"
    commits, sft = _snapshot(out / "commits"), _snapshot(out / "sft")
    steps_before = [row["step"] for row in read_metrics(out / "train" / "metrics.jsonl")]
    assert steps_before and max(steps_before) < MAX_STEPS

    rerun = run_cli(*args, timeout=1200)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "octoray mine: " in rerun.stdout and "is already complete" in rerun.stdout
    assert f"octoray filter: {out / 'sft'} is already complete" in rerun.stdout
    assert _snapshot(out / "commits") == commits and _snapshot(out / "sft") == sft  # not redone, not touched

    rows = read_metrics(out / "train" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1))  # every step once, none lost
    resumed_from = {row["start_step"] for row in rows} - {0}
    assert len(resumed_from) == 1, "exactly one restart"
    resume_step = resumed_from.pop()
    assert resume_step >= CHECKPOINT_EVERY and resume_step % CHECKPOINT_EVERY == 0
    assert all(row["start_step"] == (0 if row["step"] <= resume_step else resume_step) for row in rows)
    assert (out / "train" / "model" / "config.json").is_file()
    assert (out / "eval" / "metrics.json").is_file() and (out / "report" / "report.md").is_file()
    _assert_model_card_holds_the_results(out)


def _assert_model_card_holds_the_results(out: Path) -> None:
    """The demo's model/README.md: a Hub model card whose model-index holds its eval results."""
    import json

    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard.load(out / "train" / "model" / "README.md")
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    expected = {(lang, key): round(value, 4) for per_lang in metrics.values() for lang, cell in per_lang.items()
                for key, value in cell.items() if key.startswith("pass@") and value is not None}
    got = {(r.dataset_config, r.metric_type): r.metric_value for r in results}
    assert len(results) == sum(1 for per_lang in metrics.values() for cell in per_lang.values()
                               for k, v in cell.items() if k.startswith("pass@") and v is not None)
    assert set(got) <= set(expected) and all(r.dataset_type == "bigcode/humanevalpack" for r in results)


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_tune_then_train_with_best_trial_after_a_crashed_trial(tmp_path: Path, ray_local,
                                                                        shared_dir: Path) -> None:
    """Issue 17 on the demo preset, in one pipeline and one Ray: a tune whose second trial crashes
    (its Train controller dies with its worker placement group up), then the train stage, which
    needs every CPU. It used to hang on a placement group the tune left behind; now it completes,
    trains with the best trial's learning rate and warmup, and no placement group remains."""
    import json

    import yaml

    from octoray import stage_cli
    from octoray.cluster.resources import live_placement_groups, placement_groups
    from octoray.pipeline import run as pipeline

    before = set(placement_groups())
    out = tmp_path / "run"
    parsed = stage_cli.parse("pipeline", [
        str(REPO_ROOT / "jobs" / "demo.yaml"), f"sources=[{REPO_ROOT}]", "stages=[mine,filter,tune,train,report]",
        "tune.num_samples=3", "tune.max_steps=4", "tune.warmup_steps=[1, 3]", "tune.fail_trial=2",
        "train.max_steps=4", "train.resource_wait_s=240", "--out", str(out),
        "--humanevalpack-dir", str(shared_dir / "humanevalpack")], pipeline)  # the filter's decontamination reads it
    pipeline.run(*parsed.configs)
    best = json.loads((out / "tune" / "best.json").read_text())
    assert [t["status"] for t in best["trials"]].count("error") == 1
    crashed = next(t for t in best["trials"] if t["status"] == "error")
    assert crashed["trial_id"].endswith("_00001") and "\n" not in crashed["error"]
    config_text = (out / "train" / "config.yaml").read_text()
    resolved = yaml.safe_load(config_text)
    demo_train = yaml.safe_load((REPO_ROOT / "jobs" / "demo.yaml").read_text())["train"]
    assert resolved["lr"] == best["best"]["config"]["lr"] != demo_train["lr"]
    assert resolved["warmup_steps"] == best["best"]["config"]["warmup_steps"] != demo_train["warmup_steps"]
    assert config_text.startswith(f"# hyperparameters of the best trial {best['best']['trial_id']} of ")
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["hparams_from"]["trial_id"] == best["best"]["trial_id"]
    assert [r["step"] for r in read_metrics(out / "train" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not live_placement_groups(exclude=before), "a placement group outlived the pipeline"
    report = (out / "report" / "report.md").read_text()
    assert "## Hyperparameter search" in report and f"**{best['best']['trial_id']}**" in report
