"""The config of ``octoray train`` (a leaf: imports nothing from octoray.training, so the driver,
the worker loop, the tune and its hand-off all import it without a cycle)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from octoray.cluster.resources import resource_problems
from octoray.config import option
from octoray.storage.stage_dirs import input_dir_problems

STAGE = "train"
#: ``model: demo``: a tiny GPTBigCode built from the SFT text (octoray.modeling.build_demo_model).
DEMO = "demo"


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``octoray train`` reads; the ``train:`` section of a jobs/ YAML file."""

    data: Optional[str] = option(None, "sft/ directory written by 'octoray filter'; a path or a URI", metavar="SFT_DIR")
    out: Optional[str] = option(None, "run directory RUN_DIR: checkpoints, metrics, model/; "
                                      "a path or a URI (s3://bucket/prefix)", metavar="RUN_DIR")
    model: str = option(DEMO, "hub id or local path of a causal LM (e.g. bigcode/starcoder), or 'demo' for a tiny GPTBigCode built from the SFT text")
    demo_layers: int = option(2, "demo model: transformer layers")
    demo_embd: int = option(128, "demo model: hidden size")
    demo_vocab: int = option(2048, "demo model: BPE vocabulary trained on the SFT text")
    seq_len: int = option(512, "tokens per packed training sequence (OctoCoder: 2048)")
    target_only: bool = option(False, "loss on completions only (OctoCoder trains on the whole sequence)")
    oasst_ratio: Optional[float] = option(None, "fraction of training rows drawn from OASST (source=oasst), e.g. 0.63 for ~8.6k OASST per 5k commits; null keeps the rows as filtered")
    val_fraction: float = option(0.0, "fraction of packed sequences held out for validation loss (0 = none)")
    num_workers: int = option(2, "Ray Train workers (one per GPU on a GPU cluster)")
    cpus_per_worker: int = option(1, "CPUs reserved per worker")
    worker_resources: Optional[dict[str, float]] = option(
        None, "extra Ray resources per worker, e.g. {fake_gpu: 1} for a node type that advertises its "
              "accelerators as a custom resource (the GPU itself comes from device)")
    device: Literal["auto", "cpu", "gpu"] = option("auto", "gpu when the cluster has GPUs (auto), else cpu")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "bf16 on GPUs that have it (auto), fp32 on CPU")
    zero_stage: Literal[0, 1, 2, 3] = option(2, "DeepSpeed ZeRO stage")
    offload_optimizer: bool = option(False, "ZeRO optimizer state offload to CPU memory")
    offload_params: bool = option(False, "ZeRO-3 parameter offload to CPU memory")
    batch_size: int = option(4, "global batch in sequences = micro_batch x grad_accum x num_workers (OctoCoder: 32)")
    micro_batch: int = option(1, "sequences per worker per forward pass")
    gradient_checkpointing: bool = option(
        False, "recompute each transformer block's activations in the backward pass instead of keeping them "
               "(the model's own gradient_checkpointing_enable; ~1/3 more compute, activations ~1/L as large)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = option(
        "sdpa", "attention kernel: sdpa (PyTorch's scaled_dot_product_attention), eager (the model's own "
                "matmuls; keeps the seq_len x seq_len scores), flash_attention_2 (needs the flash-attn package, "
                "GPUs and bf16)")
    check_fit: bool = option(True, "refuse to start when 'octoray plan' says the run does not fit in the GPUs' "
                                   "memory (false: log the plan and start anyway)")
    lr: float = option(5e-4, "peak learning rate (AdamW)")
    warmup_steps: int = option(2, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient norm clipping (0 = off)")
    max_steps: int = option(35, "optimizer steps (OctoCoder: 35)")
    lora: bool = option(False, "train LoRA adapters (peft) instead of all weights; merged into model/ on export")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_targets: tuple[str, ...] = option(("c_attn", "c_proj"), "module names LoRA wraps (GPTBigCode attention projections)")
    checkpoint_every: int = option(10, "save a checkpoint (and compute validation loss) every N steps and at the end")
    keep_checkpoints: int = option(2, "checkpoints kept on disk (CheckpointConfig.num_to_keep)")
    max_failures: int = option(3, "worker-group restarts from the last checkpoint before giving up (-1 = forever)")
    export: bool = option(True, "write the final model in Hugging Face format to RUN_DIR/model")
    seed: int = option(0, "seed for shuffling, OASST sampling and init")
    preemption_watch: bool = option(True, "watch for a preemption of each worker's node (Ray drain, SIGTERM, the cloud's "
                                          "notice) and checkpoint at the next step when one comes (docs/training.md)")
    preemption_notice_url: Optional[str] = option(
        "auto", "metadata URL polled for a spot/preemption notice: auto (AWS's spot/instance-action on EC2, "
                "GCP's instance/preempted on GCE, none elsewhere), null (none), or a URL answering either's format")
    preemption_drain_node: bool = option(True, "on an AWS/GCP notice from preemption_notice_url, also drain the node "
                                               "in Ray (reason PREEMPTION, the notice's deadline), so the restarted "
                                               "workers are placed on other nodes")
    preemption_poll_s: float = option(5.0, "seconds between polls of Ray's drain state and the notice URL")
    preemption_sigterm_grace_s: float = option(30.0, "the deadline a SIGTERM implies, in seconds (Kubernetes' "
                                                     "terminationGracePeriodSeconds)")
    fail_at_step: int = option(0, "testing hook: the last worker exits abruptly once before this step (0 = never)")
    hparams: Optional[str] = option(None, "tune directory written by 'octoray tune': its best trial's hyperparameters "
                                           "override this section's (the pipeline sets it when 'tune' runs)", metavar="TUNE_DIR")
    from_best_checkpoint: bool = option(False, "with hparams: continue from the best trial's checkpoint instead of "
                                               "training from scratch; needs the trial to have trained like this run "
                                               "(same max_steps, num_workers, model, schedule)")
    resource_wait_s: float = option(600.0, "seconds to wait for the workers' CPUs/GPUs (an autoscaling cluster adds "
                                           "nodes meanwhile) before failing with what holds the cluster")

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        return max(1, self.batch_size // max(1, self.micro_batch * self.num_workers))

    def problems(self) -> list[str]:
        """Every inconsistency in the config, for one ConfigError."""
        out = []
        for name in ("seq_len", "num_workers", "cpus_per_worker", "batch_size", "micro_batch", "max_steps",
                     "checkpoint_every", "keep_checkpoints", "lora_r", "lora_alpha", "demo_layers", "demo_embd"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        per_step = self.micro_batch * self.num_workers
        if per_step >= 1 and self.batch_size % per_step:
            out.append(f"batch_size {self.batch_size} is not divisible by micro_batch x num_workers = "
                       f"{self.micro_batch} x {self.num_workers} (global batch = micro_batch x grad_accum x num_workers)")
        if not 0.0 <= self.val_fraction < 1.0:
            out.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.oasst_ratio is not None and not 0.0 <= self.oasst_ratio < 1.0:
            out.append(f"oasst_ratio must be in [0, 1) or null, got {self.oasst_ratio}")
        if self.lr <= 0:
            out.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps < max(1, self.max_steps):
            out.append(f"warmup_steps must be in [0, max_steps), got {self.warmup_steps}")
        if self.offload_params and self.zero_stage != 3:
            out.append("offload_params needs zero_stage 3")
        if self.precision == "bf16" and self.device == "cpu":
            out.append("precision bf16 needs device gpu (CPU training runs in fp32)")
        if self.attn_implementation == "flash_attention_2" and self.device == "cpu":
            out.append("attn_implementation flash_attention_2 needs device gpu (use sdpa or eager on CPU)")
        if self.attn_implementation == "flash_attention_2" and self.precision == "fp32":
            out.append("attn_implementation flash_attention_2 needs precision bf16 (FlashAttention-2 has no fp32 kernels)")
        if self.lora and not self.lora_targets:
            out.append("lora_targets must name at least one module")
        if self.from_best_checkpoint and self.hparams is None:
            out.append("from_best_checkpoint needs hparams (a tune directory)")
        if self.preemption_poll_s <= 0:
            out.append(f"preemption_poll_s must be > 0, got {self.preemption_poll_s}")
        if self.preemption_sigterm_grace_s <= 0:
            out.append(f"preemption_sigterm_grace_s must be > 0, got {self.preemption_sigterm_grace_s}")
        url = self.preemption_notice_url
        if url is not None and url != "auto" and not url.startswith(("http://", "https://")):
            hint = " (YAML reads off/no/false as a boolean: write null to poll no URL)" if url in ("False", "false") else ""
            out.append(f"preemption_notice_url must be auto, null or an http(s) URL, got {url!r}{hint}")
        if self.resource_wait_s <= 0:
            out.append(f"resource_wait_s must be > 0, got {self.resource_wait_s}")
        out += resource_problems("worker_resources", self.worker_resources)
        return out

    def input_problems(self) -> list[str]:
        """What ``octoray train`` by itself needs: SFT data that exists, a run directory, and the tune
        directory ``hparams`` names (the pipeline writes both as it goes, so they are not in
        :meth:`problems`). URIs are taken as given: checking them would need the network."""
        return input_dir_problems(data=self.data, out=self.out, hparams=self.hparams)


