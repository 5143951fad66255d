"""`octoray plan --calibrate`'s arithmetic (no Ray): what a calibration run's metrics rows say, and
the run they predict, part by part (start-up, steps, epochs, checkpoints, tail)."""

from __future__ import annotations

import pytest

from octoray.training.calibration import epoch_starts, measure, micro_batches_per_epoch, predict


def approx(expected: float):
    # Rows carry Unix times (~1.7e9 s): differences of them hold ~1e-7 s of rounding.
    return pytest.approx(expected, abs=1e-5)


def _synthetic_run(steps: int, every: int, *, per_epoch: int, per_step: int, startup: float = 60.0,
                   first_wait: float = 2.5, step: float = 0.2, epoch: float = 2.5, between: float = 0.01,
                   row_work: float = 0.05, save: float = 0.3, tail: float = 8.0,
                   started: float = 1.7e9) -> tuple[list[dict], float]:
    """The rows and end time of a run whose parts are known, laid out as the worker loop logs them:
    a row is logged after its step, the logging and (on a checkpoint row) the row's own work; a save
    follows the row; each pass over the shard starts with a wait for data."""
    rows, clock, drawn = [], started + startup, 0
    for s in range(1, steps + 1):
        new_epoch = False
        for _ in range(per_step):  # the micro-batches this step draws from the worker's shard
            new_epoch |= drawn % per_epoch == 0
            drawn += 1
        wait = (first_wait if s == 1 else epoch) if new_epoch else 0.001
        seconds = step + wait
        checkpoint = s % every == 0 or s == steps
        clock += seconds + (between if s > 1 else 0.0) + (row_work if checkpoint else 0.0)
        rows.append({"step": s, "step_seconds": seconds, "data_seconds": wait, "time": clock})
        if checkpoint and s < steps:
            clock += save
    return rows, clock + tail


def _parts(rows: list[dict], started: float, ended: float) -> dict:
    return {"steps": sum(r["step_seconds"] for r in rows), "wall": ended - started}


@pytest.mark.parametrize("sequences", [243, 10])  # the demo data (243: no epoch in 10 steps); a tiny one (several)
def test_a_short_run_predicts_a_long_one_part_by_part(sequences: int) -> None:
    """A 10-step calibration (a checkpoint every 3rd step) predicts a 100-step run (every 8th) of the
    same machine exactly, when every step of a kind takes as long: each part extrapolated right."""
    workers, micro_batch, batch_size = 2, 1, 4
    per_epoch, per_step = sequences // workers // micro_batch, batch_size // (micro_batch * workers)
    cal_rows, cal_end = _synthetic_run(10, 3, per_epoch=per_epoch, per_step=per_step)
    real_rows, real_end = _synthetic_run(100, 8, per_epoch=per_epoch, per_step=per_step)
    cal = measure(list(reversed(cal_rows)), started=1.7e9, ended=cal_end, checkpoint_every=3, workers=workers,
                  micro_batch=micro_batch, batch_size=batch_size, seq_len=256, train_sequences=sequences)
    assert cal.startup_seconds == approx(60.0) and cal.tail_seconds == approx(8.0)
    assert cal.step_seconds == approx(0.201) and cal.between_steps_seconds == approx(0.01)
    assert cal.checkpoint_row_seconds == approx(0.05) and cal.checkpoint_save_seconds == approx(0.3)
    assert cal.epoch_start_seconds == approx(2.5 - 0.001)
    predicted = predict(cal, max_steps=100, checkpoint_every=8, gpus=workers)
    real = _parts(real_rows, 1.7e9, real_end)
    assert predicted["seconds"] == approx(real["steps"])
    assert predicted["wall_seconds"] == approx(real["wall"])
    assert predicted["epochs_started"] == sum(1 for r in real_rows if r["data_seconds"] > 0.001)
    # The calibration predicts itself too.
    assert predict(cal, max_steps=10, checkpoint_every=3, gpus=workers)["wall_seconds"] == approx(cal.wall_seconds)


def test_epochs_of_the_demo_data() -> None:
    """243 packed sequences on 2 workers, micro-batch 1, 2 micro-batches a step: each worker's shard
    is 121 micro-batches, so a 100-step run starts its second pass at step 61 (where the real run's
    input pipeline waited 4.1 s)."""
    assert micro_batches_per_epoch(243, 2, 1) == 121
    assert epoch_starts(100, 2, 121) == [1, 61]
    assert epoch_starts(10, 2, 121) == [1]
    assert epoch_starts(10, 2, None) == [1]
    assert epoch_starts(6, 1, 2) == [1, 3, 5]


def test_checkpoint_every_step_is_counted_whole_on_the_checkpoint_rows() -> None:
    """checkpoint_every 1: a row's own work and the previous save cannot be told apart; all of it
    is counted once per checkpoint row, which a run that also saves every step has."""
    rows, ended = _synthetic_run(6, 1, per_epoch=1000, per_step=1, between=0.0)
    cal = measure(rows, started=1.7e9, ended=ended, checkpoint_every=1, workers=1, micro_batch=1, batch_size=1,
                  seq_len=8, train_sequences=1000)
    assert cal.between_steps_seconds == 0.0 and cal.checkpoint_save_seconds == 0.0
    assert cal.checkpoint_row_seconds == approx(0.05 + 0.3)
    real_rows, real_end = _synthetic_run(40, 1, per_epoch=1000, per_step=1, between=0.0)
    predicted = predict(cal, max_steps=40, checkpoint_every=1, gpus=1)
    # 0.35 s too much: the last step's save (0.3 s) is in the tail as well, and step 1's row work
    # (0.05 s) in the start-up, as it is logged before step 1's row.
    assert predicted["wall_seconds"] == approx(real_end - 1.7e9 + 0.3 + 0.05)


# A real calibration, `octoray plan jobs/demo.yaml data=runs/demo/sft max_steps=100 --calibrate 10
# --calibrate-dir DIR --json` (2026-12-03, the 2-core CI machine under other sessions' tests, load
# average 16-31): its metrics.jsonl rows, the moments its process started and ended, and its
# manifest's 243 packed training sequences.
CALIBRATION_STARTED, CALIBRATION_ENDED = 1796322936.464, 1796323224.517
CALIBRATION_ROWS = [
    {"step": 1, "step_seconds": 8.2308, "data_seconds": 7.8808, "time": 1796323204.463},
    {"step": 2, "step_seconds": 0.3691, "data_seconds": 0.0013, "time": 1796323204.836},
    {"step": 3, "step_seconds": 0.2454, "data_seconds": 0.0033, "time": 1796323205.088},
    {"step": 4, "step_seconds": 0.3343, "data_seconds": 0.0018, "time": 1796323205.5},
    {"step": 5, "step_seconds": 0.4075, "data_seconds": 0.0048, "time": 1796323205.91},
    {"step": 6, "step_seconds": 0.2611, "data_seconds": 0.0031, "time": 1796323206.176},
    {"step": 7, "step_seconds": 0.2709, "data_seconds": 0.0024, "time": 1796323206.52},
    {"step": 8, "step_seconds": 0.2212, "data_seconds": 0.0033, "time": 1796323206.743},
    {"step": 9, "step_seconds": 0.2877, "data_seconds": 0.0009, "time": 1796323207.035},
    {"step": 10, "step_seconds": 0.2396, "data_seconds": 0.0008, "time": 1796323207.584},
]
# The real 100-step run next to it (`octoray train jobs/demo.yaml --data runs/demo/sft max_steps=100`,
# checkpoint_every 8): each step's step_seconds. Step 1 and step 61 (its second pass over the
# data) waited 3.42 s and 2.83 s for data; every other step 0.002 s (median).
REAL_STEP_SECONDS = [
    3.708, 0.265, 0.186, 0.157, 0.2, 0.169, 0.207, 0.23, 0.171, 0.148, 0.231, 0.294, 0.268, 0.275, 0.135, 0.158,
    0.184, 0.194, 0.249, 0.225, 0.186, 0.263, 0.349, 0.256, 0.299, 0.281, 0.199, 0.233, 0.23, 0.249, 0.23, 0.229,
    0.206, 0.219, 0.29, 0.247, 0.276, 0.248, 0.239, 0.228, 0.407, 0.218, 0.234, 0.245, 0.226, 0.179, 0.281, 0.204,
    0.326, 0.335, 0.211, 0.199, 0.38, 0.249, 0.245, 0.326, 0.409, 0.362, 0.311, 0.353, 3.147, 0.442, 0.409, 0.502,
    0.574, 0.259, 0.337, 0.311, 0.266, 0.251, 0.246, 0.21, 0.309, 0.19, 0.26, 0.242, 0.258, 0.187, 0.251, 0.218,
    0.281, 0.176, 0.132, 0.154, 0.167, 0.146, 0.21, 0.279, 0.32, 0.462, 0.425, 0.395, 0.288, 0.191, 0.233, 0.318,
    0.333, 0.219, 0.274, 0.294,
]
DEMO = {"workers": 2, "micro_batch": 1, "batch_size": 4, "seq_len": 256, "train_sequences": 243}


def test_a_real_calibrations_rows_give_each_part() -> None:
    """The real calibration's rows, part by part, and the 100-step run they predict (by hand)."""
    cal = measure(CALIBRATION_ROWS, started=CALIBRATION_STARTED, ended=CALIBRATION_ENDED, checkpoint_every=3, **DEMO)
    assert cal.first_step_seconds == 8.2308
    assert cal.step_seconds == 0.2709  # median of steps 2-10 (no epoch began there: 121 micro-batches a pass)
    assert cal.epoch_start_seconds == pytest.approx(7.8808 - 0.0024)  # step 1's wait less a plain step's
    assert cal.epoch_start_source == "step 1's wait for data"
    # Gaps less steps: plain (steps 2, 5, 8 after a plain row) median; checkpoint rows 3, 6, 9; saves after 3, 6.
    plain = sorted([0.373 - 0.3691, 0.41 - 0.4075, 0.223 - 0.2212])
    assert cal.between_steps_seconds == approx(plain[1])
    assert cal.checkpoint_row_seconds == approx(sorted([0.252 - 0.2454, 0.266 - 0.2611, 0.292 - 0.2877])[1] - plain[1])
    assert cal.checkpoint_save_seconds == approx(((0.412 - 0.3343) + (0.344 - 0.2709)) / 2 - plain[1])
    assert cal.startup_seconds == approx(1796323204.463 - 8.2308 - CALIBRATION_STARTED)  # 259.8 s under that load
    assert cal.tail_seconds == approx(CALIBRATION_ENDED - 1796323207.584)
    predicted = predict(cal, max_steps=100, checkpoint_every=8, gpus=2)
    assert predicted["epochs_started"] == 2
    assert predicted["seconds"] == approx(8.2308 + 99 * 0.2709 + (7.8808 - 0.0024))
    parts = predicted["wall_parts"]
    assert parts["checkpoints"] == approx(13 * cal.checkpoint_row_seconds + 12 * cal.checkpoint_save_seconds)
    assert predicted["wall_seconds"] == approx(sum(parts.values()))


def test_a_real_100_step_runs_steps_are_step_1_the_median_and_one_epoch_restart() -> None:
    """What the extrapolation assumes, on the real run's own rows: its steps sum to its step 1, 99
    steps at its median and the restart of the input pipeline at step 61 (where the model puts the
    second epoch) - within 5 % (the median of a right-skewed busy machine's steps is below their
    mean). The old model, 100 steps at the median, gives 0.76 of the sum: the 0.70-0.79 "plan steps /
    real steps" BENCHMARKS.md measured before step 1 and the epoch restart were counted."""
    rows = [{"step": i + 1, "step_seconds": s} for i, s in enumerate(REAL_STEP_SECONDS)]
    own = measure(rows, started=0.0, ended=0.0, checkpoint_every=8, **DEMO)
    assert own.epoch_start_source == "measured at step(s) [61]"
    assert own.epoch_start_seconds == pytest.approx(3.147 - own.step_seconds)
    predicted = predict(own, max_steps=100, checkpoint_every=8, gpus=2)["seconds"]
    assert predicted == pytest.approx(sum(REAL_STEP_SECONDS), rel=0.05)
    assert 100 * own.step_seconds / sum(REAL_STEP_SECONDS) == pytest.approx(0.76, abs=0.01)
