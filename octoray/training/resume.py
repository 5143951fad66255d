"""What a checkpoint holds beside DeepSpeed's shards, and how a restarted worker group gets back to
exactly where the saved step left off: the step and token count, the data position and each
rank's RNG state (dropout masks). DeepSpeed's own checkpoint restores weights, optimizer and LR
schedule.

The data position is the number of training sequences consumed (``step x micro_batch x grad_accum
x world``) and the world size and micro-batch it was consumed with. Every epoch of a rank's shard
holds the same micro-batches in the same order (the driver builds the datasets with
``preserve_order``, see :mod:`octoray.training.sft_data`), so a rank that skips the micro-batches
it had consumed continues with the very batches an unstopped run would have read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

#: octoray's own resume state (step, tokens, data position) next to the DeepSpeed shards.
STATE_FILE = "octoray_state.json"
#: Each rank's RNG states (torch CPU and accelerator, Python, NumPy): the dropout masks after a
#: resume are the ones an unstopped run would have drawn.
RNG_FILE = "octoray_rng_rank{rank}.pt"


@dataclass(frozen=True)
class DataPosition:
    """How much training data the run had consumed at a checkpoint."""

    sequences: int  #: global: every rank's micro-batches x micro_batch, summed
    world_size: int  #: ranks that consumed them
    micro_batch: int  #: sequences per micro-batch then

    def to_dict(self) -> dict[str, int]:
        """The JSON form in STATE_FILE."""
        return {"sequences": self.sequences, "world_size": self.world_size, "micro_batch": self.micro_batch}


@dataclass(frozen=True)
class ResumeState:
    """STATE_FILE: where a checkpoint's run stood."""

    step: int
    tokens: int
    data: DataPosition

    def to_json(self) -> str:
        """STATE_FILE's text."""
        return json.dumps({"step": self.step, "tokens": self.tokens, "data": self.data.to_dict()})


def state_at(step: int, tokens: int, *, micro_batch: int, grad_accum: int, world: int) -> ResumeState:
    """The state after ``step`` optimizer steps (each rank consumes ``grad_accum`` micro-batches a step)."""
    return ResumeState(step, tokens, DataPosition(step * micro_batch * grad_accum * world, world, micro_batch))


def read_state(ckpt_dir: Path, *, micro_batch: int, grad_accum: int, world: int) -> ResumeState:
    """STATE_FILE of a checkpoint directory. A checkpoint written before the data position was
    recorded is taken to have consumed ``step`` full global batches of this run's shape."""
    raw = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
    step, tokens = int(raw["step"]), int(raw["tokens"])
    data = raw.get("data")
    if data is None:
        return state_at(step, tokens, micro_batch=micro_batch, grad_accum=grad_accum, world=world)
    return ResumeState(step, tokens, DataPosition(int(data["sequences"]), int(data["world_size"]),
                                                  int(data["micro_batch"])))


def micro_batches_to_skip(position: DataPosition, *, micro_batch: int, world: int) -> tuple[int, Optional[str]]:
    """How many micro-batches each rank skips to continue at ``position``, and a note when the
    resumed run cannot see the same batches as an unstopped one (the world size or micro-batch
    changed: the shards are cut differently, so only the amount of data consumed carries over)."""
    per_rank = position.sequences // (micro_batch * world)
    if (position.world_size, position.micro_batch) == (world, micro_batch):
        return per_rank, None
    return per_rank, (f"the checkpoint's data position was reached with {position.world_size} worker(s) x micro_batch "
                      f"{position.micro_batch}, this worker group has {world} x {micro_batch}: each rank skips "
                      f"{per_rank} micro-batches of its new shard ({position.sequences} sequences consumed in all); "
                      f"the data order from here differs from an unstopped run")


def endless_batches(epoch: Callable[[], Any], skip: int = 0) -> Iterator[Any]:
    """Micro-batches forever, epoch after epoch, after skipping the first ``skip`` of them.

    ``epoch()`` iterates one pass over the shard. Every pass holds the same batches, so once one
    whole pass has been counted the skip is reduced modulo its length (the passes it covers are not
    read). Every rank skips the same number (equal shards), so the per-epoch barrier of Ray's
    streaming split still sees every rank in every epoch it starts.
    """
    while True:
        seen = 0
        for batch in epoch():
            seen += 1
            if skip:
                skip -= 1
                continue
            yield batch
        if not seen:
            raise RuntimeError("this worker's data shard holds fewer sequences than micro_batch")
        skip %= seen


def skip_to(batches: Iterator[Any], skip: int, say: Callable[[str], None]) -> Iterator[Any]:
    """Do ``batches``' skip now (it happens on the first ``next``), so the first resumed step's
    timing does not include it; say how long it took."""
    if not skip:
        return batches
    started = time.perf_counter()
    first = next(batches)
    say(f"skipped {skip} micro-batches of this rank's shard in {time.perf_counter() - started:.1f} s "
        f"(the data position of the checkpoint)")

    def chained() -> Iterator[Any]:
        yield first
        yield from batches

    return chained()


def save_rng(ckpt_dir: Path, rank: int, device: Any) -> None:
    """Write this rank's RNG states into ``ckpt_dir``."""
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if getattr(device, "type", None) == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(state, Path(ckpt_dir) / RNG_FILE.format(rank=rank))


def restore_rng(ckpt_dir: Path, rank: int, device: Any) -> bool:
    """Load this rank's RNG states from ``ckpt_dir``; False when it has none (an older checkpoint,
    or a rank the saving worker group did not have)."""
    import random

    import numpy as np
    import torch

    path = Path(ckpt_dir) / RNG_FILE.format(rank=rank)
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)  # our own file: Python and NumPy states are tuples
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and getattr(device, "type", None) == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    return True
