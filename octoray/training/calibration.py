"""What a short calibration run of ``octoray train`` measured, and the run it predicts.

``octoray plan --calibrate`` (:mod:`octoray.training.plan`) runs ``octoray train`` for a few steps
and hands its ``metrics.jsonl`` rows, the moments the child process started and ended, and the
packed training sequences its manifest counts to :func:`measure`. :func:`predict` then builds the
planned run from the parts, each extrapolated by what it scales with:

- **start-up** (interpreter, imports, Ray, the data's packing, the model, DeepSpeed) up to the
  start of step 1, and the **tail** after the last row (the final checkpoint, the export, leaving
  Ray): once per run, taken as measured;
- **steps**: step 1 as measured (allocator growth and the input pipeline's start), the rest at the
  median step time, plus the input pipeline's restart at every later epoch (``_endless_batches``
  starts a new pass over the shard when one ends: seconds on a small model, as long as step 1's
  wait for data; a 10-step calibration never reaches one, a 100-step demo run does at step 61);
- **between steps** (logging, the progress bar): the median gap between rows less the step;
- **checkpoints**: what a checkpoint row adds before it is logged (the peak memory all-reduce,
  validation) at every checkpoint, and what the save adds after it at every periodic one (the final
  save is in the tail).

Medians, so one slow step on a busy machine does not move the plan. Arithmetic only: no Ray, no
torch (``tests/training/test_calibration.py`` feeds it a real calibration run's rows).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Calibration:
    """One calibration run, in seconds (``run_dir``: where it was kept, or None)."""

    steps: int
    checkpoint_every: int
    workers: int
    micro_batch: int
    batch_size: int
    train_sequences: Optional[int]  # packed training sequences (the run's manifest rows); None: unknown
    first_step_seconds: float
    step_seconds: float  # median of the steps that started no epoch
    epoch_start_seconds: float  # what a later epoch's first step adds to a step
    epoch_start_source: str
    between_steps_seconds: float
    checkpoint_row_seconds: float
    checkpoint_save_seconds: float
    startup_seconds: float
    tail_seconds: float
    wall_seconds: float
    tokens_per_s_per_worker: float
    run_dir: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        """As the plan's JSON shows it (``calibration``)."""
        return asdict(self)


def micro_batches_per_epoch(train_sequences: Optional[int], workers: int, micro_batch: int) -> Optional[int]:
    """Micro-batches each worker draws per pass over its shard: Ray Train splits the data into equal
    shards (``streaming_split(equal=True)``) and the loop drops a last partial micro-batch."""
    if not train_sequences:
        return None
    return max(1, train_sequences // workers // micro_batch)


def grad_accum(batch_size: int, micro_batch: int, workers: int) -> int:
    """Micro-batches per optimizer step on each worker (as ``TrainConfig.grad_accum``)."""
    return max(1, batch_size // max(1, micro_batch * workers))


def epoch_starts(steps: int, per_step: int, per_epoch: Optional[int]) -> list[int]:
    """The steps (1-based) whose micro-batches include the first of a pass over the shard."""
    if per_epoch is None:
        return [1] if steps else []
    return sorted({index // per_step + 1 for index in range(0, steps * per_step, per_epoch)})


def measure(rows: list[dict[str, Any]], *, started: float, ended: float, checkpoint_every: int, workers: int,
            micro_batch: int, batch_size: int, seq_len: int, train_sequences: Optional[int],
            run_dir: Optional[str] = None) -> Calibration:
    """What a calibration run's rows say. ``started``/``ended``: Unix times around the child
    process (the rows' ``time`` is the Unix time each row was logged at)."""
    rows = sorted((row for row in rows if "step_seconds" in row), key=lambda row: row["step"])
    if not rows:
        raise ValueError("the calibration run logged no steps")
    last = rows[-1]["step"]
    per_step = grad_accum(batch_size, micro_batch, workers)
    starts = set(epoch_starts(last, per_step, micro_batches_per_epoch(train_sequences, workers, micro_batch)))
    steady = [row for row in rows if row["step"] not in starts] or rows
    step = statistics.median(row["step_seconds"] for row in steady)
    later = [row["step_seconds"] - step for row in rows if row["step"] in starts and row["step"] > 1]
    first = rows[0]
    if later:
        epoch_start, source = max(0.0, statistics.median(later)), f"measured at step(s) {sorted(starts - {1})}"
    else:
        # A new pass restarts the input pipeline: as long as step 1 waited for its data, less the
        # wait of an ordinary step.
        wait = statistics.median(row.get("data_seconds", 0.0) for row in steady)
        epoch_start, source = max(0.0, first.get("data_seconds", 0.0) - wait), "step 1's wait for data"

    def checkpoint(s: int) -> bool:
        return s % checkpoint_every == 0 or s == last

    # The gap between two rows less the later row's step: logging, plus a checkpoint row's own
    # work (before it is logged) and the previous row's save (after it was).
    kinds: dict[tuple[bool, bool], list[float]] = {}
    for before, row in zip(rows, rows[1:]):
        if "time" in before and "time" in row and row["step"] == before["step"] + 1:
            extra = row["time"] - before["time"] - row["step_seconds"]
            kinds.setdefault((checkpoint(before["step"]), checkpoint(row["step"])), []).append(extra)
    median = lambda key: statistics.median(kinds[key]) if kinds.get(key) else None  # noqa: E731
    between = median((False, False))
    between = max(0.0, between) if between is not None else 0.0
    row_work, save = median((False, True)), median((True, False))
    both = median((True, True))
    if row_work is None and save is None and both is not None:  # checkpoint_every 1: not separable
        row_work = both
    row_work = max(0.0, row_work - between) if row_work is not None else 0.0
    save = max(0.0, save - between) if save is not None else 0.0
    begun = first["time"] - first["step_seconds"] if "time" in first else started
    return Calibration(
        steps=len(rows), checkpoint_every=checkpoint_every, workers=workers, micro_batch=micro_batch,
        batch_size=batch_size, train_sequences=train_sequences, first_step_seconds=first["step_seconds"],
        step_seconds=step, epoch_start_seconds=epoch_start, epoch_start_source=source,
        between_steps_seconds=between, checkpoint_row_seconds=row_work, checkpoint_save_seconds=save,
        startup_seconds=max(0.0, begun - started), tail_seconds=max(0.0, ended - rows[-1].get("time", ended)),
        wall_seconds=ended - started, tokens_per_s_per_worker=batch_size * seq_len / step / workers, run_dir=run_dir)


def predict(cal: Calibration, *, max_steps: int, checkpoint_every: int, gpus: int) -> dict[str, Any]:
    """The planned run's ``seconds`` (its steps: what ``step_seconds`` in its metrics.jsonl sums to),
    ``wall_seconds`` and the wall time's parts, from the calibration ``cal`` (same data, model and
    batch; ``gpus`` data-parallel workers, each step's compute shared among them)."""
    per_step = grad_accum(cal.batch_size, cal.micro_batch, gpus)
    per_epoch = micro_batches_per_epoch(cal.train_sequences, gpus, cal.micro_batch)
    epochs = len(epoch_starts(max_steps, per_step, per_epoch))
    scale = cal.workers / gpus  # the same global batch on more workers: shorter steps
    steps = (cal.first_step_seconds + (max_steps - 1) * cal.step_seconds * scale
             + (epochs - 1) * cal.epoch_start_seconds)
    periodic = (max_steps - 1) // checkpoint_every  # saves before the last step's (in the tail)
    checkpoints = math.ceil(max_steps / checkpoint_every)  # rows with a checkpoint: every Nth and the last
    parts = {"startup": cal.startup_seconds, "steps": steps,
             "between_steps": (max_steps - 1) * cal.between_steps_seconds,
             "checkpoints": checkpoints * cal.checkpoint_row_seconds + periodic * cal.checkpoint_save_seconds,
             "tail": cal.tail_seconds}
    return {"seconds": steps, "wall_seconds": sum(parts.values()), "wall_parts": parts, "epochs_started": epochs,
            "checkpoints": checkpoints}
