"""A resumed run trains exactly as one that never stopped: real Ray Train + DeepSpeed on 2 CPU
workers (fp32, deterministic), one run with a worker killed mid-run (``fail_at_step``), one without.

Resume restores the weights, optimizer and LR schedule (DeepSpeed), the step and token count,
each rank's RNG state (dropout) and the data position: each rank skips the micro-batches it had
consumed, across epoch boundaries. With all of that, the per-step losses and the exported
weights of the two runs are equal (before the data position and RNG state were saved, on bc955a0,
the losses after the resume differed by up to 0.024).

The fast tests before it check octoray/training/resume.py alone: the skip's arithmetic across
epochs, the data position with the same and a changed world size, and the RNG round trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from octoray.config import from_mapping
from octoray.training.metrics import read_metrics
from octoray.training.resume import (STATE_FILE, DataPosition, endless_batches, micro_batches_to_skip, read_state,
                                     restore_rng, save_rng, skip_to, state_at)
from octoray.training.train_config import TrainConfig
from octoray.training.worker import FAIL_MARKER
from tests.helpers.sft import write_sft

# ------------------------------------------------------------------ fast: the resume state


def _epochs(n: int, log: list[int]):
    def epoch():
        log.append(len(log))  # one entry per pass started
        return iter(range(n))
    return epoch


def test_skip_crosses_epoch_boundaries_and_reads_no_whole_pass_twice() -> None:
    passes: list[int] = []
    batches = endless_batches(_epochs(5, passes), skip=6)
    assert [next(batches) for _ in range(6)] == [1, 2, 3, 4, 0, 1]  # 6 = one pass + 1
    passes.clear()
    batches = endless_batches(_epochs(5, passes), skip=5 * 1000 + 3)
    assert [next(batches) for _ in range(3)] == [3, 4, 0]
    assert len(passes) == 3  # one counted pass, then the skip is reduced modulo its length
    assert [next(endless_batches(_epochs(5, []), skip=s)) for s in (0, 4, 5, 10)] == [0, 4, 0, 0]
    with pytest.raises(RuntimeError, match="fewer sequences than micro_batch"):
        next(endless_batches(_epochs(0, []), skip=2))


def test_skip_is_done_before_the_first_step_and_said() -> None:
    said: list[str] = []
    batches = skip_to(endless_batches(_epochs(5, []), skip=7), 7, said.append)
    assert len(said) == 1 and said[0].startswith("skipped 7 micro-batches")  # before any next()
    assert [next(batches) for _ in range(4)] == [2, 3, 4, 0]


def test_data_position_same_and_changed_world(tmp_path: Path) -> None:
    state = state_at(3, 768, micro_batch=1, grad_accum=2, world=2)
    assert state.data == DataPosition(sequences=12, world_size=2, micro_batch=1)
    assert micro_batches_to_skip(state.data, micro_batch=1, world=2) == (6, None)
    skip, note = micro_batches_to_skip(state.data, micro_batch=1, world=4)
    assert skip == 3 and "2 worker(s) x micro_batch 1, this worker group has 4 x 1" in note
    assert "differs from an unstopped run" in note
    (tmp_path / STATE_FILE).write_text(state.to_json())
    assert read_state(tmp_path, micro_batch=1, grad_accum=2, world=2) == state
    (tmp_path / STATE_FILE).write_text('{"step": 5, "tokens": 1280}')  # written before the data position
    assert read_state(tmp_path, micro_batch=2, grad_accum=1, world=2).data == DataPosition(20, 2, 2)


def test_rng_states_round_trip_per_rank(tmp_path: Path) -> None:
    import random

    import numpy as np
    import torch

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    save_rng(tmp_path, 1, torch.device("cpu"))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    assert restore_rng(tmp_path, 1, torch.device("cpu"))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert not restore_rng(tmp_path, 0, torch.device("cpu"))  # no file for a rank the group lacked


# ------------------------------------------------------------------ real Ray Train + DeepSpeed

# 16 rows pack into ~10 sequences of 64 tokens: ~5 micro-batches per rank per epoch, so the 6
# micro-batches each rank consumed by checkpoint 3 (3 steps x grad_accum 2) end mid-epoch 2.
BASE = {"model": "demo", "demo_layers": 2, "demo_embd": 64, "demo_vocab": 512, "seq_len": 64,
        "num_workers": 2, "device": "cpu", "precision": "fp32", "batch_size": 4, "micro_batch": 1,
        "warmup_steps": 1, "min_lr_ratio": 0.1, "zero_stage": 2, "lr": 3e-3, "max_steps": 7,
        "checkpoint_every": 3, "keep_checkpoints": 3, "seed": 7, "preemption_notice_url": None}


@pytest.mark.ray
@pytest.mark.slow
def test_a_resumed_run_trains_exactly_as_one_that_never_stopped(tmp_path: Path, ray_local) -> None:
    import torch
    from safetensors.torch import load_file

    from octoray.training import driver as training

    sft = write_sft(tmp_path / "sft", n=16)
    reference = training.run(from_mapping(TrainConfig, {**BASE, "data": str(sft), "out": str(tmp_path / "ref")}))
    resumed = training.run(from_mapping(TrainConfig, {**BASE, "data": str(sft), "out": str(tmp_path / "failed"),
                                                      "fail_at_step": 5, "max_failures": 1}))
    assert (resumed / FAIL_MARKER).exists()  # rank 1 really died before step 5
    ref_rows, rows = read_metrics(reference / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert {r["start_step"] for r in rows if r["step"] > 3} == {3}  # restarted from checkpoint 3
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, 8))

    # The resume had to cross an epoch boundary and land mid-epoch, or rereading the shard from
    # its start (what resume did before) would have given the same batches.
    sequences = json.loads((resumed / "manifest.json").read_text())["counts"]["train_sequences"]
    per_rank_epoch = sequences // 2  # equal shards, micro_batch 1
    consumed = 3 * 2  # steps x grad_accum, per rank
    assert per_rank_epoch < consumed and consumed % per_rank_epoch, (sequences, consumed)

    ref_losses, losses = [r["loss"] for r in ref_rows], [r["loss"] for r in rows]
    assert losses == pytest.approx(ref_losses, abs=1e-6, rel=0), list(zip(ref_losses, losses))
    expected, got = load_file(reference / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, worst
    assert not torch.equal(expected[next(iter(expected))], load_file(reference / "base_model" / "model.safetensors")
                           [next(iter(expected))])  # it trained at all
    # What the resume read: the data position beside the step.
    state = json.loads((resumed / "checkpoint_000003" / STATE_FILE).read_text())
    assert state["data"] == {"sequences": 3 * 4, "world_size": 2, "micro_batch": 1}
