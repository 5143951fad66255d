"""``octoray plan CONFIG``: will a training run fit, how long will it take, what will it cost.

Plans the config's ``train:`` section (keys as ``octoray train`` takes them) before anything is
launched: the model's parameters from its config alone (built on PyTorch's meta device: no
weights are read, ``model`` may be a directory holding only ``config.json``), the trainable ones
(LoRA), memory per GPU by part (:mod:`octoray.training.memory`), whether it fits, the smallest
changes that make it fit, tokens, steps, time at a stated MFU (or at the throughput ``--calibrate``
measures) and cost from a node type's hourly price. ``octoray train`` logs the same plan before
training starts and refuses, in one line, a run that cannot fit (``check_fit: false`` overrides).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from typing import Any, Callable, Optional

from octoray.config import load_config, read_yaml, split_overrides
from octoray.errors import UserError
from octoray.training.memory import ModelShape, Setup, gib, parse_size, per_gpu
from octoray.training.metrics import peak_flops
from octoray.training.train_config import DEMO, TrainConfig

#: The MFU time estimates assume when nothing was measured (DeepSpeed ZeRO-3 bf16 on A100s
#: typically reaches 0.3-0.5; stated in every plan).
DEFAULT_MFU = 0.35
#: Node-type labels in a cluster launcher YAML that octoray plan reads (docs/training.md).
LABEL_GPU_MEMORY = "octoray-gpu-memory"
LABEL_GPU_TYPE = "octoray-gpu-type"
LABEL_PRICE = "octoray-usd-per-hour"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``octoray plan``."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="a train, tune or pipeline config: its train: section is planned")
    parser.add_argument("settings", nargs="*", metavar="key=value", help="train: keys to change first (as octoray train takes them)")
    parser.add_argument("--cluster", metavar="CLUSTER.yaml", help="cluster launcher YAML: GPUs per node, GPU memory, "
                        "type and hourly price from its GPU node type's labels (octoray-gpu-memory, ...)")
    parser.add_argument("--node-type", help="which node type of --cluster (default: the one with the most GPUs)")
    parser.add_argument("--gpus", type=int, help="data-parallel GPUs (default: the config's num_workers)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: --cluster's, else min(gpus, 8))")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 80GB (read as GiB, as GPU vendors mean it)")
    parser.add_argument("--gpu-type", help="GPU name for its peak bf16 FLOP/s, e.g. A100, H100 (default: --cluster's, else A100)")
    parser.add_argument("--mfu", type=float, help=f"model FLOPs utilisation the time assumes (default {DEFAULT_MFU})")
    parser.add_argument("--usd-per-hour", type=float, help="price of one node per hour (default: --cluster's label)")
    parser.add_argument("--calibrate", type=int, nargs="?", const=5, metavar="STEPS",
                        help="run STEPS (5) real forward+backward micro-batches of the model on this machine and "
                             "time the run at the measured tokens/s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run ``octoray plan``: print the plan (text or ``--json``); exit 0 whether it fits or not."""
    positional, overrides = split_overrides(args.settings)
    if positional:
        raise UserError(f"unexpected argument(s): {' '.join(positional)} (give CONFIG.yaml and key=value)")
    cfg = load_train_section(args.config, overrides)
    hardware = hardware_from(args, cfg)
    result = plan(cfg, **hardware, mfu=args.mfu, calibrate_steps=args.calibrate)
    print(json.dumps(result, indent=1) if args.json else describe(result))
    return 0


def load_train_section(path: str, overrides: list[str]) -> TrainConfig:
    """The config file's ``train:`` section (a flat file is a train: section) as a TrainConfig."""
    read_yaml(path)  # a missing or malformed file: one line
    return load_config(TrainConfig, path, overrides, section="train")


def hardware_from(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any]:
    """GPUs, memory, type and price from the flags, then the cluster YAML's node type."""
    node: dict[str, Any] = cluster_node_type(args.cluster, args.node_type) if args.cluster else {}
    gpus = args.gpus or cfg.num_workers
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    memory_text = args.gpu_memory or node.get("gpu_memory")
    if memory_text is None and cfg.device != "cpu":
        raise UserError("give the GPU memory: --gpu-memory 80GB, or --cluster CLUSTER.yaml whose GPU node type "
                        f"has the label {LABEL_GPU_MEMORY}")
    try:
        memory = parse_size(memory_text) if memory_text is not None else _host_memory() // gpus
    except ValueError as exc:
        raise UserError(f"--gpu-memory: {exc}") from None
    per_node = args.gpus_per_node or node.get("gpus") or min(gpus, 8)
    return {"gpus": gpus, "gpus_per_node": int(per_node), "gpu_memory": memory,
            "gpu_type": args.gpu_type or node.get("gpu_type") or ("A100" if cfg.device != "cpu" else None),
            "usd_per_hour": args.usd_per_hour if args.usd_per_hour is not None else node.get("usd_per_hour")}


def cluster_node_type(path: str, name: Optional[str]) -> dict[str, Any]:
    """The GPU node type of a cluster launcher YAML: its GPUs and its octoray-* labels."""
    data = read_yaml(path)
    types = data.get("available_node_types") or {}
    gpu_types = {k: v for k, v in types.items() if (v.get("resources") or {}).get("GPU")}
    if name is not None:
        if name not in types:
            raise UserError(f"{path}: no node type '{name}' (node types: {', '.join(types)})")
        chosen = name
    elif gpu_types:
        chosen = max(gpu_types, key=lambda k: gpu_types[k]["resources"]["GPU"])
    else:
        raise UserError(f"{path}: no node type with GPUs in available_node_types")
    labels = types[chosen].get("labels") or {}
    price = labels.get(LABEL_PRICE)
    try:
        usd = float(price) if price is not None else None
    except ValueError:
        raise UserError(f"{path}: node type {chosen}: label {LABEL_PRICE} must be a number, got {price!r}") from None
    return {"node_type": chosen, "gpus": (types[chosen].get("resources") or {}).get("GPU"),
            "gpu_memory": labels.get(LABEL_GPU_MEMORY), "gpu_type": labels.get(LABEL_GPU_TYPE), "usd_per_hour": usd}


def _host_memory() -> int:
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
    return ModelShape(params=sum(p.numel() for p in params),
                      trainable=sum(p.numel() for p in params if p.requires_grad), largest_layer=largest,
                      layers=get("n_layer", "num_hidden_layers"), hidden=hidden, heads=heads, kv_heads=kv_heads,
                      ffn=getattr(hf_config, "n_inner", None) or getattr(hf_config, "intermediate_size", None) or 4 * hidden,
                      vocab=hf_config.vocab_size,
                      positions=get("n_positions", "max_position_embeddings"))


def setup_for(cfg: TrainConfig, gpus: int, gpus_per_node: int) -> Setup:
    """The memory model's view of ``cfg`` on ``gpus`` GPUs (``device: cpu``: fp32, no CUDA)."""
    cuda = cfg.device != "cpu"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    return Setup(gpus=gpus, gpus_per_node=gpus_per_node, zero_stage=cfg.zero_stage, bytes_per_param=2 if bf16 else 4,
                 micro_batch=cfg.micro_batch, seq_len=cfg.seq_len, gradient_checkpointing=cfg.gradient_checkpointing,
                 attn_implementation=cfg.attn_implementation, offload_optimizer=cfg.offload_optimizer,
                 offload_params=cfg.offload_params, overlap_comm=cuda, cuda=cuda)


def plan(cfg: TrainConfig, *, gpus: int, gpu_memory: int, gpus_per_node: int = 8, gpu_type: Optional[str] = None,
         usd_per_hour: Optional[float] = None, mfu: Optional[float] = None, calibrate_steps: Optional[int] = None,
         shape: Optional[ModelShape] = None) -> dict[str, Any]:
    """The plan of ``cfg`` on ``gpus`` GPUs of ``gpu_memory`` bytes each, as one JSON-able dict."""
    hf_config = model_config(cfg) if shape is None or calibrate_steps else None
    shape = shape or model_shape(hf_config, cfg)
    gpus_per_node = min(gpus_per_node, gpus)
    parts = per_gpu(shape, setup_for(cfg, gpus, gpus_per_node))
    fits = parts["total"] <= gpu_memory
    tokens = cfg.max_steps * cfg.batch_size * cfg.seq_len  # every step: batch_size packed sequences
    flops = tokens * flops_per_token(shape, cfg)
    result: dict[str, Any] = {
        "model": cfg.model, "params": shape.params, "trainable_params": shape.trainable,
        "largest_layer_params": shape.largest_layer, "gpus": gpus, "gpus_per_node": gpus_per_node,
        "zero_stage": cfg.zero_stage, "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len,
        "gradient_checkpointing": cfg.gradient_checkpointing, "attn_implementation": cfg.attn_implementation,
        "lora": cfg.lora, "per_gpu_bytes": parts["total"], "per_gpu_parts": {k: v for k, v in parts.items() if k != "total"},
        "gpu_memory_bytes": gpu_memory, "fits": fits,
        "suggestions": [] if fits else suggestions(cfg, shape, gpus, gpus_per_node, gpu_memory),
        "steps": cfg.max_steps, "tokens": tokens, "flops": flops,
    }
    result.update(timing(cfg, shape, hf_config, flops, tokens, gpus, gpu_type, mfu, calibrate_steps))
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


def timing(cfg: TrainConfig, shape: ModelShape, hf_config: Any, flops: float, tokens: int, gpus: int,
           gpu_type: Optional[str], mfu: Optional[float], calibrate_steps: Optional[int]) -> dict[str, Any]:
    """``seconds`` at the measured tokens/s (``--calibrate``) or at ``mfu`` of the GPU's peak."""
    if calibrate_steps:
        measured = calibrate(hf_config, cfg, calibrate_steps)
        # Each worker processes its share of the tokens at the measured rate.
        return {"seconds": tokens / (measured * gpus), "throughput_source": "calibrated",
                "tokens_per_s_per_gpu": measured, "mfu": None, "peak_flops": None}
    peak = peak_flops(gpu_type) if gpu_type else None
    used_mfu = mfu or DEFAULT_MFU
    if peak is None:
        return {"seconds": None, "throughput_source": "unknown GPU peak (use --calibrate or --gpu-type)",
                "tokens_per_s_per_gpu": None, "mfu": used_mfu, "peak_flops": None}
    return {"seconds": flops / (gpus * peak * used_mfu), "throughput_source": f"{used_mfu} MFU of {gpu_type}",
            "tokens_per_s_per_gpu": peak * used_mfu * tokens / flops, "mfu": used_mfu, "peak_flops": peak}


def calibrate(hf_config: Any, cfg: TrainConfig, steps: int) -> float:
    """Tokens/s of real forward+backward+AdamW micro-batches of the model on this machine (random
    weights, random tokens; the first, warm-up micro-batch is not timed)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and cfg.precision != "fp32" else torch.float32
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attn_implementation).to(device, dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, hf_config.vocab_size, (cfg.micro_batch, cfg.seq_len), device=device)
    started = 0.0
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch.numel() / (time.perf_counter() - started)


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
    lines = [f"octoray plan: {result['model']}: {result['params'] / 1e9:.2f}B parameters, "
             f"{result['trainable_params'] / 1e6:.1f}M trainable; ZeRO-{result['zero_stage']} on {result['gpus']} GPUs, "
             f"micro_batch {result['micro_batch']} x seq_len {result['seq_len']}, checkpointing "
             f"{'on' if result['gradient_checkpointing'] else 'off'}",
             f"octoray plan: per GPU {gib(result['per_gpu_bytes'])} of {gib(result['gpu_memory_bytes'])}: {verdict} ({parts})"]
    if result["suggestions"]:
        lines.append("octoray plan: to fit: " + "; ".join(result["suggestions"]))
    time_text = f"{result['seconds'] / 3600:.2f} h" if result["seconds"] is not None else "unknown time"
    cost = f", ${result['usd']:.2f}" if result.get("usd") is not None else ""
    lines.append(f"octoray plan: {result['steps']} steps, {result['tokens']:,} tokens: {time_text}{cost} "
                 f"({result['throughput_source']})")
    return "\n".join(lines)


def preflight(cfg: TrainConfig, say: Callable[[str], None], *, cuda: bool, gpu_memory: Optional[int]) -> None:
    """What ``octoray train`` does before training: log the plan; refuse when it cannot fit.

    ``gpu_memory`` None (the cluster does not say) logs the plan without a verdict.
    """
    memory = gpu_memory or _host_memory() // max(1, cfg.num_workers)
    if not cuda:
        cfg = replace(cfg, device="cpu")
    result = plan(cfg, gpus=cfg.num_workers, gpu_memory=memory, gpus_per_node=min(cfg.num_workers, 8))
    for line in describe(result).splitlines():
        say(line.replace("octoray plan: ", "plan: "))
    if not result["fits"] and cfg.check_fit and (gpu_memory is not None or not cuda):
        hint = f"; {result['suggestions'][0]}" if result["suggestions"] else ""
        raise UserError(f"the plan says this run does not fit: {gib(result['per_gpu_bytes'])} per "
                        f"{'GPU' if cuda else 'worker'} of {gib(memory)}{hint} (check_fit: false starts it anyway)")

