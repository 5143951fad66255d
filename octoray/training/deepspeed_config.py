"""Typed training fields -> the DeepSpeed config dict handed to ``deepspeed.initialize``.

Pure functions, so the mapping from octoray's config to DeepSpeed's JSON schema is visible in one
place and unit-testable without DeepSpeed or a GPU. The optimizer (AdamW) lives in the DeepSpeed
config; the schedule (linear warmup, then cosine decay) is :func:`warmup_cosine`, handed to
``deepspeed.initialize`` as a ``LambdaLR``. DeepSpeed's own ``WarmupCosineLR`` was not used: it
trains the first two steps at learning rate 0 (it is first stepped after step 1 and its linear
warmup starts from ratio 0), which is two of OctoCoder's 35 steps. DeepSpeed checkpoints the
client scheduler's state, so a resume continues the schedule.
"""

from __future__ import annotations

import math
from typing import Any


def build_deepspeed_config(
    *,
    zero_stage: int,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    grad_clip: float = 1.0,
    bf16: bool = False,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    cuda: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config for one run; the global batch is ``micro_batch * grad_accum * world_size``.

    ``cuda`` picks the fused AdamW kernel and communication overlap; without it (CPU workers)
    ``torch_adam`` keeps DeepSpeed from JIT-compiling its CPU Adam op, which costs a minute and a
    compiler for no gain at demo sizes. ``offload_optimizer`` needs DeepSpeed's CPU Adam anyway.
    """
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "contiguous_gradients": True,
        # Overlapping the reduce with the backward pass only pays with CUDA streams.
        "overlap_comm": bool(cuda),
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(cuda)}
    if zero_stage == 3:
        if offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": bool(cuda)}
        # The final export must see whole tensors, not this rank's partition.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                # Without CUDA DeepSpeed would build its fused CPU Adam op (needs a compiler).
                **({} if cuda or offload_optimizer else {"torch_adam": True}),
            },
        },
        # octoray logs its own per-step metrics; DeepSpeed's prints would only duplicate them.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warmup, cosine decay.

    Warmup climbs ``1/(w+1), 2/(w+1) ... w/(w+1)`` so no step is wasted at 0; then the cosine
    runs from 1 at step ``w`` down to ``min_lr_ratio`` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
