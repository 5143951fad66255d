"""The numbers of ``octoray plan``: a training config's memory per GPU, fit, time and cost.

The model's parameters come from its config alone (built on PyTorch's meta device: no weights are
read, ``model`` may be a directory holding only ``config.json``), the trainable ones (LoRA), memory
per GPU by part (:mod:`octoray.training.memory`), whether it fits, the smallest changes that make
it fit, tokens, steps, time at a stated MFU (or at the step time a calibration run measured) and
cost from a node type's hourly price. The command line is :mod:`octoray.training.plan`; ``octoray
train`` calls :func:`preflight` before training: it logs the plan and refuses, in one line, a run
that cannot fit (``check_fit: false`` overrides).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Optional

from octoray.errors import UserError
from octoray.training.calibration import Calibration, predict
from octoray.training.memory import ModelShape, Setup, gib, per_gpu
from octoray.training.metrics import peak_flops
from octoray.training.train_config import DEMO, TrainConfig

#: The MFU time estimates assume when nothing was measured (DeepSpeed ZeRO-3 bf16 on A100s
#: typically reaches 0.3-0.5; stated in every plan).
DEFAULT_MFU = 0.35
#: Node-type labels in a cluster launcher YAML that octoray plan reads (docs/training.md).
LABEL_GPU_MEMORY = "octoray-gpu-memory"
LABEL_GPU_TYPE = "octoray-gpu-type"
LABEL_PRICE = "octoray-usd-per-hour"


def host_memory() -> int:
    """This machine's memory (a CPU run's workers share it)."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

def model_config(cfg: TrainConfig) -> Any:
    """The model's transformers config: the demo's from its keys, else ``AutoConfig`` (config.json only)."""
    if cfg.model == DEMO:
        from octoray.modeling import demo_model_config

        # As octoray.training.driver.resolve_model has it built (context max(seq_len, 2048)).
        return demo_model_config(vocab_size=cfg.demo_vocab, n_layer=cfg.demo_layers, n_embd=cfg.demo_embd,
                                 n_positions=max(cfg.seq_len, 2048))
    from transformers import AutoConfig

    from octoray.modeling import load_error

    try:
        return AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as exc:
        raise load_error("model config", cfg.model, exc) from None


def model_shape(hf_config: Any, cfg: TrainConfig) -> ModelShape:
    """Parameters, trainable parameters (LoRA) and the largest layer of the model ``hf_config``
    describes, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets)))
    params = list(model.parameters())  # tied weights once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    get = lambda *names: next(getattr(hf_config, n) for n in names if getattr(hf_config, n, None))  # noqa: E731
    hidden, heads = get("n_embd", "hidden_size"), get("n_head", "num_attention_heads")
    if getattr(hf_config, "model_type", "") == "gpt_bigcode":
        kv_heads = 1 if hf_config.multi_query else heads
    else:
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    adapters = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")]
    return ModelShape(params=sum(p.numel() for p in params),
                      trainable=sum(p.numel() for p in params if p.requires_grad), largest_layer=largest,
                      layers=get("n_layer", "num_hidden_layers"), hidden=hidden, heads=heads, kv_heads=kv_heads,
                      ffn=getattr(hf_config, "n_inner", None) or getattr(hf_config, "intermediate_size", None) or 4 * hidden,
                      vocab=hf_config.vocab_size,
                      positions=get("n_positions", "max_position_embeddings"),
                      attention_dropout=(getattr(hf_config, "attn_pdrop", None)
                                         or getattr(hf_config, "attention_dropout", None) or 0) > 0,
                      lora_inputs=sum(m.in_features for m in adapters) // get("n_layer", "num_hidden_layers"),
                      lora_ranks=sum(cfg.lora_r for _ in adapters) // get("n_layer", "num_hidden_layers"),
                      lora_dropout=cfg.lora and cfg.lora_dropout > 0)


def setup_for(cfg: TrainConfig, gpus: int, gpus_per_node: int) -> Setup:
    """The memory model's view of ``cfg`` on ``gpus`` GPUs (``device: cpu``: fp32, no CUDA)."""
    cuda = cfg.device != "cpu"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    return Setup(gpus=gpus, gpus_per_node=gpus_per_node, zero_stage=cfg.zero_stage, bytes_per_param=2 if bf16 else 4,
                 micro_batch=cfg.micro_batch, seq_len=cfg.seq_len, gradient_checkpointing=cfg.gradient_checkpointing,
                 attn_implementation=cfg.attn_implementation, offload_optimizer=cfg.offload_optimizer,
                 offload_params=cfg.offload_params, overlap_comm=cuda, cuda=cuda)


def plan(cfg: TrainConfig, *, gpus: int, gpu_memory: int, gpus_per_node: int = 8, gpu_type: Optional[str] = None,
         usd_per_hour: Optional[float] = None, mfu: Optional[float] = None, measured: Optional[Calibration] = None,
         shape: Optional[ModelShape] = None) -> dict[str, Any]:
    """The plan of ``cfg`` on ``gpus`` GPUs of ``gpu_memory`` bytes each, as one JSON-able dict."""
    shape = shape or model_shape(model_config(cfg), cfg)
    gpus_per_node = min(gpus_per_node, gpus)
    parts = per_gpu(shape, setup_for(cfg, gpus, gpus_per_node))
    fits = parts["total"] <= gpu_memory
    tokens = cfg.max_steps * cfg.batch_size * cfg.seq_len  # every step: batch_size packed sequences
    flops = tokens * flops_per_token(shape, cfg)
    result: dict[str, Any] = {
        "model": cfg.model, "device": "cpu" if cfg.device == "cpu" else "gpu", "params": shape.params, "trainable_params": shape.trainable,
        "largest_layer_params": shape.largest_layer, "gpus": gpus, "gpus_per_node": gpus_per_node,
        "zero_stage": cfg.zero_stage, "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len,
        "gradient_checkpointing": cfg.gradient_checkpointing, "attn_implementation": cfg.attn_implementation,
        "lora": cfg.lora, "per_gpu_bytes": parts["total"], "per_gpu_parts": {k: v for k, v in parts.items() if k != "total"},
        "gpu_memory_bytes": gpu_memory, "fits": fits,
        "suggestions": [] if fits else suggestions(cfg, shape, gpus, gpus_per_node, gpu_memory),
        "steps": cfg.max_steps, "tokens": tokens, "flops": flops,
    }
    result.update(timing(cfg, flops, tokens, gpus, gpu_type, mfu, measured))
    nodes = math.ceil(gpus / gpus_per_node)
    seconds = result["seconds"]
    result["nodes"] = nodes
    result["usd_per_hour"] = usd_per_hour
    result["usd"] = round(seconds / 3600 * nodes * usd_per_hour, 2) if seconds is not None and usd_per_hour else None
    return result


def flops_per_token(shape: ModelShape, cfg: TrainConfig) -> float:
    """Training FLOPs per token: 6 N (forward 2 N, backward 4 N; LoRA skips the frozen weights'
    gradients, 4 N), one more forward (2 N) with checkpointing, and attention's 12 L h s (PaLM, app. B)."""
    n = shape.params
    per_token = (4 * n + 2 * shape.trainable) if cfg.lora else 6 * n
    attention = 12 * shape.layers * shape.hidden * cfg.seq_len
    if cfg.gradient_checkpointing:
        per_token += 2 * n + attention / 3
    return float(per_token + attention)


def timing(cfg: TrainConfig, flops: float, tokens: int, gpus: int, gpu_type: Optional[str], mfu: Optional[float],
           measured: Optional[Calibration]) -> dict[str, Any]:
    """``seconds`` at the step time a calibration run ``measured`` (``octoray plan --calibrate``) or at
    ``mfu`` of the GPU's peak."""
    if measured is not None:
        predicted = predict(measured, max_steps=cfg.max_steps, checkpoint_every=cfg.checkpoint_every, gpus=gpus)
        return {"seconds": predicted["seconds"], "wall_seconds": predicted["wall_seconds"],
                "wall_parts": predicted["wall_parts"], "epochs_started": predicted["epochs_started"],
                "throughput_source": f"calibrated: {measured.steps} real steps of octoray train on "
                                     f"{measured.workers} worker(s)",
                "tokens_per_s_per_gpu": measured.tokens_per_s_per_worker, "calibration": measured.to_json(),
                "mfu": None, "peak_flops": None}
    peak = peak_flops(gpu_type) if gpu_type else None
    used_mfu = mfu or DEFAULT_MFU
    if peak is None:
        return {"seconds": None, "wall_seconds": None, "wall_parts": None, "throughput_source": "unknown GPU peak (use --calibrate or --gpu-type)",
                "tokens_per_s_per_gpu": None, "mfu": used_mfu, "peak_flops": None}
    return {"seconds": flops / (gpus * peak * used_mfu), "wall_seconds": None, "wall_parts": None,
            "throughput_source": f"{used_mfu} MFU of {gpu_type}",
            "tokens_per_s_per_gpu": peak * used_mfu * tokens / flops, "mfu": used_mfu, "peak_flops": peak}

def checkpoints(steps: int, every: int) -> int:
    """Checkpoints a run of ``steps`` saves: every ``every`` steps and at the end."""
    return steps // every + (1 if steps % every else 0)


def suggestions(cfg: TrainConfig, shape: ModelShape, gpus: int, gpus_per_node: int, gpu_memory: int) -> list[str]:
    """The smallest changes that make ``cfg`` fit: single changes first, then pairs; each with its total."""
    singles: list[tuple[str, Callable[[TrainConfig], TrainConfig], int]] = []
    if cfg.micro_batch > 1:
        singles += [(f"micro_batch: {m}", lambda c, m=m: replace(c, micro_batch=m), gpus)
                    for m in _halvings(cfg.micro_batch)]
    if not cfg.gradient_checkpointing:
        singles.append(("gradient_checkpointing: true", lambda c: replace(c, gradient_checkpointing=True), gpus))
    if cfg.zero_stage < 3:
        singles.append(("zero_stage: 3", lambda c: replace(c, zero_stage=3), gpus))
    if not cfg.offload_optimizer:
        singles.append(("offload_optimizer: true", lambda c: replace(c, offload_optimizer=True), gpus))
    if not cfg.lora:
        singles.append(("lora: true", lambda c: replace(c, lora=True), gpus))
    more = [(f"{g} GPUs", lambda c: c, g) for g in (gpus * 2, gpus * 4, gpus * 8)]

    def total(changes: list[tuple[str, Callable[[TrainConfig], TrainConfig], int]]) -> int:
        changed, n = cfg, gpus
        for _, change, g in changes:
            changed, n = change(changed), max(n, g)
        lora_shape = shape if changed.lora == cfg.lora else _with_lora_estimate(shape, changed)
        return per_gpu(lora_shape, setup_for(changed, n, min(gpus_per_node, n)))["total"]

    found = [f"{name} ({gib(t)})" for name, *rest in singles + more
             if (t := total([(name, *rest)])) <= gpu_memory]
    if found:
        return found[:6]
    pairs = [[a, b] for i, a in enumerate(singles) for b in singles[i + 1:] + more if a[0].split(":")[0] != b[0].split(":")[0]]
    found = [f"{' + '.join(c[0] for c in pair)} ({gib(t)})" for pair in pairs if (t := total(pair)) <= gpu_memory]
    return found[:6] or ["no single change or pair of changes fits: see the per_gpu_parts"]


def _halvings(micro_batch: int) -> list[int]:
    return sorted({max(1, micro_batch // 2 ** k) for k in range(1, 8)} - {micro_batch}, reverse=True)


def _with_lora_estimate(shape: ModelShape, cfg: TrainConfig) -> ModelShape:
    """``shape`` with LoRA adapters on every attention and MLP projection (an estimate for a
    suggestion: r (in + out) per wrapped matrix; the plan itself counts them on the model)."""
    h, kv = shape.hidden, 2 * shape.kv_heads * (shape.hidden // shape.heads)
    per_layer = cfg.lora_r * ((h + h + kv) + (h + h) + (shape.ffn + h))  # c_attn, attn.c_proj, mlp.c_proj
    return replace(shape, trainable=shape.layers * per_layer)


def describe(result: dict[str, Any]) -> str:
    """The plan as a few lines for people."""
    parts = ", ".join(f"{k} {gib(v)}" for k, v in result["per_gpu_parts"].items() if v)
    verdict = "fits" if result["fits"] else "does NOT fit"
    unit = "CPU worker" if result.get("device") == "cpu" else "GPU"
    params = result["params"]
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    lines = [f"octoray plan: {result['model']}: {size} parameters, "
             f"{result['trainable_params'] / 1e6:.1f}M trainable; ZeRO-{result['zero_stage']} on {result['gpus']} {unit}s, "
             f"micro_batch {result['micro_batch']} x seq_len {result['seq_len']}, checkpointing "
             f"{'on' if result['gradient_checkpointing'] else 'off'}",
             f"octoray plan: per {unit} {gib(result['per_gpu_bytes'])} of {gib(result['gpu_memory_bytes'])}: {verdict} ({parts})"]
    if result["suggestions"]:
        lines.append("octoray plan: to fit: " + "; ".join(result["suggestions"]))
    time_text = f"{result['seconds'] / 3600:.2f} h" if result["seconds"] is not None else "unknown time"
    cost = f", ${result['usd']:.2f}" if result.get("usd") is not None else ""
    lines.append(f"octoray plan: {result['steps']} steps, {result['tokens']:,} tokens: {time_text}{cost} "
                 f"({result['throughput_source']})")
    if result.get("wall_parts"):
        parts_text = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in result["wall_parts"].items())
        lines.append(f"octoray plan: wall time {result['wall_seconds']:.1f} s ({parts_text})")
    if result.get("data"):
        data = result["data"]
        lines.append(f"octoray plan: the data: {data['rows']:,} rows, {data['tokens']:,} tokens ({data['tokens_source']}): "
                     f"{result['steps']} steps cover {result['epochs']:.2f} epochs of it")
    return "\n".join(lines)


def preflight(cfg: TrainConfig, say: Callable[[str], None], *, cuda: bool, gpu_memory: Optional[int]) -> None:
    """What ``octoray train`` does before training: log the plan; refuse when it cannot fit.

    ``gpu_memory`` None (the cluster does not say) logs the plan without a verdict.
    """
    memory = gpu_memory or host_memory() // max(1, cfg.num_workers)
    if not cuda:
        cfg = replace(cfg, device="cpu")
    result = plan(cfg, gpus=cfg.num_workers, gpu_memory=memory, gpus_per_node=min(cfg.num_workers, 8))
    for line in describe(result).splitlines():
        say(line.replace("octoray plan: ", "plan: "))
    if not result["fits"] and cfg.check_fit and (gpu_memory is not None or not cuda):
        hint = f"; {result['suggestions'][0]}" if result["suggestions"] else ""
        raise UserError(f"the plan says this run does not fit: {gib(result['per_gpu_bytes'])} per "
                        f"{'GPU' if cuda else 'worker'} of {gib(memory)}{hint} (check_fit: false starts it anyway)")

