"""The memory model of ``octoray plan``: bytes per GPU for a training run, by part.

Pure arithmetic (no torch), so the plan, the driver's pre-flight check and the tests share one
formula. Sources and limits are in docs/training.md ("Will it fit"):

* **Model states** follow DeepSpeed's own estimators
  (``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` and
  ``stage3.estimate_zero3_model_states_mem_needs``): with bf16 and every weight trainable they are
  equal to them byte for byte (a test checks it). Generalised to LoRA (only the trainable
  parameters carry gradients and optimizer states) and to fp32 (4 bytes per weight, not 2).
* **Activations** count what autograd saves in a GPTBigCode block (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", section 4, redone for
  multi-query attention and PyTorch's kernels); with gradient checkpointing each block keeps only
  its input, and one block is recomputed at a time.
* **Buffers**: DeepSpeed's gradient reduce bucket (``reduce_bucket_size``, 5e8 elements by
  default; twice with ``overlap_comm``) and ZeRO-3's parameter prefetch bucket (5e7).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Adam's fp32 states per trainable parameter in DeepSpeed's ZeRO optimizers: fp32 master weight,
#: momentum, variance and the fp32 gradient partition (4 + 4 + 4 + 4 bytes).
OPTIMIZER_BYTES = 16
#: DeepSpeed's defaults for the buckets octoray's DeepSpeed config leaves unset.
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
#: Memory a GPU process holds outside PyTorch's allocator (CUDA context, NCCL's buffers).
CUDA_RUNTIME_BYTES = 1536 * 2**20
#: What a CPU training worker's resident set grows by whatever the model: PyTorch's thread pools
#: and kernels' scratch, gloo's buffers, the data iterator's prefetch — measured as the peak of a
#: 1-layer, 32-wide demo model (`benchmarks/bench_memory.py --layers 1 --embd 32`: 216 MiB, of
#: which the model's own parts are 22 MiB; 2026-12-03).
CPU_RUNTIME_BYTES = 192 * 2**20


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a decoder-only transformer."""

    params: int  # every parameter (tied weights once)
    trainable: int  # what the optimizer updates (LoRA: the adapters only)
    largest_layer: int  # the most parameters any one module holds itself (DeepSpeed's "largest layer")
    layers: int
    hidden: int
    heads: int
    kv_heads: int  # 1 for multi-query attention (StarCoder)
    ffn: int  # the MLP's inner width
    vocab: int
    positions: int
    attention_dropout: bool = False  # the config's attn_pdrop / attention_dropout > 0
    lora_inputs: int = 0  # LoRA: the input features of the modules it adapts, summed over one block
    lora_ranks: int = 0  # LoRA: their ranks, summed over one block (lora_A's outputs)
    lora_dropout: bool = False  # LoRA's own dropout (> 0: each adapted input is kept twice)


@dataclass(frozen=True)
class Setup:
    """How the run trains: the parts of the train: section that move memory."""

    gpus: int
    gpus_per_node: int
    zero_stage: int
    bytes_per_param: int  # 2 (bf16) or 4 (fp32)
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    attn_implementation: str
    offload_optimizer: bool = False
    offload_params: bool = False
    dropout: bool = True  # GPTBigCode's residual/embedding dropout: autograd keeps a 1-byte mask
    overlap_comm: bool = True  # octoray's DeepSpeed config turns it on with CUDA
    cuda: bool = True


def model_states(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """Weights, gradients and optimizer states on one GPU (DeepSpeed's estimators, generalised)."""
    p, t, n, b = shape.params, shape.trainable, setup.gpus, setup.bytes_per_param
    if setup.zero_stage == 3:
        gathered = 2 * b * shape.largest_layer  # the largest layer's weights + gradients, gathered
        if setup.offload_params:
            return {"params": gathered, "gradients": 0, "optimizer": 0}
        if setup.offload_optimizer:
            return {"params": gathered + b * p // n, "gradients": 0, "optimizer": 0}
        return {"params": gathered + b * p // n, "gradients": 0, "optimizer": OPTIMIZER_BYTES * t // n}
    if setup.offload_optimizer:
        return {"params": b * p, "gradients": 0, "optimizer": 0}
    partitions = {0: 1, 1: n, 2: n}[setup.zero_stage]
    grads = b * t // partitions if setup.zero_stage == 2 else b * t
    optimizer = (OPTIMIZER_BYTES * t) // partitions
    if setup.zero_stage == 0 and b == 4:
        optimizer = 8 * t  # plain fp32 AdamW: momentum and variance, no master copy
    return {"params": b * p, "gradients": grads, "optimizer": optimizer}


def cpu_model_states(shape: ModelShape, setup: Setup, buffer_factor: float = 1.5) -> int:
    """CPU memory per node for the model states (DeepSpeed's estimators' ``cpu_mem``, with its 1.5
    safety factor): offloaded states, and every process loading the weights before partitioning."""
    p, t, per_node = shape.params, shape.trainable, setup.gpus_per_node
    nodes = max(1, setup.gpus // max(1, per_node))
    if setup.zero_stage == 3:
        if setup.offload_optimizer and setup.offload_params:
            return int((2 * p + OPTIMIZER_BYTES * t) / nodes * buffer_factor)  # zero.Init: 18 p at full FT
        if setup.offload_optimizer:
            return int(OPTIMIZER_BYTES * t / nodes * buffer_factor)
        return int(shape.largest_layer * 4 * per_node * buffer_factor)
    if setup.offload_optimizer:
        return int(max(p * 4 * setup.gpus, OPTIMIZER_BYTES * t) * buffer_factor)
    return int(p * 4 * per_node * buffer_factor)


def block_activations(shape: ModelShape, setup: Setup) -> int:
    """Bytes autograd keeps for one transformer block of one micro-batch (no checkpointing)."""
    tokens = setup.micro_batch * setup.seq_len
    e = setup.bytes_per_param
    h, head_dim = shape.hidden, shape.hidden // shape.heads
    kv = 2 * shape.kv_heads * head_dim
    # Saved inputs: ln_1, c_attn, c_attn's output (q, k, v), the attention output and its merged
    # copy (c_proj's input), ln_2, c_fc, the GELU's input and c_proj's input (4h each).
    saved = e * tokens * (7 * h + (h + kv) + 2 * shape.ffn)
    masks = 2 * tokens * h if setup.dropout else 0  # residual dropouts: bool masks
    scores = setup.micro_batch * shape.heads * setup.seq_len ** 2
    if setup.attn_implementation == "eager":
        # The seq x seq scores: the softmax output, its dropout mask and the dropped copy.
        saved += scores * (2 * e + (1 if setup.dropout else 0))
    elif not setup.cuda and shape.attention_dropout and setup.dropout:
        # PyTorch's CPU sdpa has no fused kernel with dropout: its math path keeps the softmax
        # output, the dropped copy, the batched-matmul input and a bool mask, plus the keys and
        # values expanded to every head (measured per block with saved-tensor hooks: within 10 %).
        saved += scores * (3 * e + 1) + 2 * tokens * h * e
    else:
        saved += 4 * tokens * shape.heads  # the fused kernels' log-sum-exp, fp32
    if shape.lora_inputs:
        # Frozen weights need no inputs kept (c_attn, c_proj, c_fc, mlp.c_proj); the adapters keep
        # theirs, twice with LoRA dropout (the input and its dropped copy), and lora_A's outputs.
        saved -= e * tokens * (3 * h + shape.ffn)
        saved += e * tokens * (shape.lora_inputs * (2 if shape.lora_dropout else 1) + shape.lora_ranks)
    return saved + masks


def activations(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """Activation memory of one micro-batch at its peak (the start of the backward pass)."""
    tokens = setup.micro_batch * setup.seq_len
    e = setup.bytes_per_param
    block = block_activations(shape, setup)
    if setup.gradient_checkpointing:
        # Each block keeps its input; the backward pass recomputes one block at a time.
        layers = shape.layers * tokens * shape.hidden * e + block
    else:
        layers = shape.layers * block
    # Embedding output, ln_f and lm_head inputs; the logits, their fp32 copy for the loss (none
    # when they are fp32 already), log-softmax, and the logits' gradient.
    logits = tokens * shape.vocab * (e + (4 if e == 2 else 0) + 4 + 4)
    return {"layers": layers, "logits": logits + 3 * tokens * shape.hidden * e}


def buffers(shape: ModelShape, setup: Setup) -> int:
    """DeepSpeed's communication buckets on one GPU (a bucket never outgrows what it holds)."""
    b = setup.bytes_per_param
    if setup.zero_stage == 0:
        return 0
    reduce = min(REDUCE_BUCKET, shape.trainable) * b * (2 if setup.overlap_comm else 1)
    if setup.zero_stage == 3:
        return reduce + min(PREFETCH_BUCKET, shape.params) * b
    return reduce


def per_gpu(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """Every part of one GPU's memory, and their ``total``."""
    parts = {**{f"model_{k}": v for k, v in model_states(shape, setup).items()},
             **{f"activations_{k}": v for k, v in activations(shape, setup).items()},
             "deepspeed_buffers": buffers(shape, setup),
             "runtime": CUDA_RUNTIME_BYTES if setup.cuda else CPU_RUNTIME_BYTES}
    parts["total"] = sum(parts.values())
    return parts


def parse_size(text: str) -> int:
    """``80GB``, ``80GiB``, ``81920MiB``, ``512MB`` or plain bytes -> bytes.

    GPU memory is binary whatever the label says (an "80GB" A100 holds 81920 MiB), so GB and MB
    read as GiB and MiB here.
    """
    raw = str(text).strip().upper().replace(" ", "")
    for suffix, scale in (("GIB", 2**30), ("GB", 2**30), ("G", 2**30), ("MIB", 2**20), ("MB", 2**20),
                          ("M", 2**20), ("TIB", 2**40), ("TB", 2**40), ("B", 1)):
        if raw.endswith(suffix):
            number = raw[: -len(suffix)]
            break
    else:
        number, scale = raw, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GB)") from None
    if value <= 0:
        raise ValueError(f"memory size must be > 0, got {text!r}")
    return int(value * scale)


def gib(n: float) -> str:
    """Bytes as ``12.3 GiB``."""
    return f"{n / 2**30:.1f} GiB"
