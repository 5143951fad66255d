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
