"""octoray train: config checks, DeepSpeed config, packing, metrics (fast); real Ray Train +
DeepSpeed runs on 2 CPU workers (ZeRO-2 and ZeRO-3, worker failure, rerun resume, LoRA, export)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from octoray.config import ConfigError, from_mapping, load_config
from octoray.training.deepspeed_config import build_deepspeed_config, warmup_cosine
from octoray.training.metrics import MetricsLog, mfu, peak_flops, read_metrics
from octoray.training.train_config import TrainConfig
from octoray.training.worker import FAIL_MARKER
from tests.helpers import REPO_ROOT, run_cli
from tests.helpers.sft import write_sft

# ------------------------------------------------------------------ fast: config and helpers


def test_batch_must_divide_into_micro_batch_times_workers() -> None:
    with pytest.raises(ConfigError, match="batch_size 6 is not divisible by micro_batch x num_workers = 2 x 2"):
        from_mapping(TrainConfig, {"batch_size": 6, "micro_batch": 2, "num_workers": 2})
    cfg = from_mapping(TrainConfig, {"batch_size": 32, "micro_batch": 1, "num_workers": 8})
    assert cfg.grad_accum == 4


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(TrainConfig, {"val_fraction": 1.5, "offload_params": True, "zero_stage": 2, "lr": -1.0})
    message = str(err.value)
    for fragment in ("val_fraction", "offload_params needs zero_stage 3", "lr must be > 0"):
        assert fragment in message
    with pytest.raises(ConfigError, match="expected one of 0, 1, 2, 3"):
        from_mapping(TrainConfig, {"zero_stage": 4})


def test_deepspeed_config_zero3_offload_and_cpu_adam() -> None:
    ds = build_deepspeed_config(zero_stage=3, micro_batch=1, grad_accum=4, world_size=8, lr=5e-4, bf16=True,
                                offload_optimizer=True, offload_params=True, cuda=True, grad_clip=1.0)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "torch_adam" not in ds["optimizer"]["params"]  # fused / CPU Adam on GPU clusters
    cpu = build_deepspeed_config(zero_stage=2, micro_batch=2, grad_accum=1, world_size=2, lr=1e-3)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["bf16"]["enabled"] is False
    assert "offload_param" not in cpu["zero_optimization"]


def test_warmup_cosine_schedule() -> None:
    ratios = [warmup_cosine(s, warmup_steps=2, max_steps=10, min_lr_ratio=0.1) for s in range(10)]
    assert ratios[0] == pytest.approx(1 / 3) and ratios[1] == pytest.approx(2 / 3)  # no step at lr 0
    assert ratios[2] == pytest.approx(1.0) and ratios[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(ratios[2:], ratios[3:]))


def test_packing_eos_separators_padding_and_target_mask(tmp_path: Path) -> None:
    from octoray.modeling import train_bpe_tokenizer
    from octoray.training.packing import IGNORE_INDEX, pack_examples

    tok = train_bpe_tokenizer(["Question: fix it\nAnswer:\ndef f(): pass\n"] * 20, vocab_size=300)
    prompts, completions = ["Question: fix it\nAnswer:\n"] * 3, ["def f(): pass\n"] * 3
    whole = pack_examples(prompts, completions, tok, 16)
    masked = pack_examples(prompts, completions, tok, 16, target_only=True)
    ids = whole["input_ids"].ravel().tolist()
    assert whole["input_ids"].shape[1] == 16 and ids.count(tok.eos_token_id) == 3
    n_p = len(tok(prompts[0], add_special_tokens=False)["input_ids"])
    n_c = len(tok(completions[0], add_special_tokens=False)["input_ids"])
    real = 3 * (n_p + n_c + 1)
    labels, mlabels = whole["labels"].ravel().tolist(), masked["labels"].ravel().tolist()
    assert labels[:real] == ids[:real] and set(labels[real:]) <= {IGNORE_INDEX}  # padding ignored
    assert mlabels[:n_p] == [IGNORE_INDEX] * n_p and mlabels[n_p:n_p + n_c + 1] == ids[n_p:n_p + n_c + 1]
    assert sum(v != IGNORE_INDEX for v in mlabels) == 3 * (n_c + 1)


def test_metrics_log_truncates_to_resumed_step(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=True)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    log.close()
    resumed = MetricsLog(tmp_path, enabled=True, resume_step=3)  # steps 4, 5 are redone
    resumed.log({"step": 4, "loss": 0.2})
    resumed.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("cpu") is None
    assert mfu(1_000_000, 1000.0, None) is None
    assert mfu(10**9, 10_000.0, 312e12) == pytest.approx(6 * 10**13 / 312e12)


def test_jobs_presets_follow_the_recipe() -> None:
    demo = load_config(TrainConfig, REPO_ROOT / "jobs" / "demo.yaml", section="train")
    octo = load_config(TrainConfig, REPO_ROOT / "jobs" / "octocoder.yaml", section="train")
    assert demo.device == "cpu" and demo.num_workers == 2 and demo.model == "demo"
    assert (octo.model, octo.num_workers, octo.zero_stage, octo.precision) == ("bigcode/starcoder", 8, 3, "bf16")
    assert (octo.lora, octo.lora_r, octo.lora_alpha, octo.lora_dropout) == (True, 16, 32, 0.05)
    assert (octo.lr, octo.batch_size, octo.seq_len, octo.max_steps, octo.grad_accum) == (5e-4, 32, 2048, 35, 4)


# ------------------------------------------------------------------ CLI: one-line errors, exit 2


def _one_line_error(result, fragment: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("octoray train: error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_cli_batch_not_divisible(tmp_path: Path) -> None:
    result = run_cli("train", "jobs/demo.yaml", "--data", tmp_path, "--out", tmp_path / "run", "batch_size=5")
    _one_line_error(result, "batch_size 5 is not divisible")


def test_cli_missing_data_dir(tmp_path: Path) -> None:
    result = run_cli("train", "jobs/demo.yaml", "--data", tmp_path / "nope", "--out", tmp_path / "run")
    _one_line_error(result, "SFT data directory not found")


def test_cli_unknown_model(tmp_path: Path) -> None:
    sft = write_sft(tmp_path / "sft", n=10)
    result = run_cli("train", "jobs/demo.yaml", "--data", sft, "--out", tmp_path / "run", "model=./no/such/model")
    _one_line_error(result, "model directory not found: ./no/such/model")
    result = run_cli("train", "jobs/demo.yaml", "--data", sft, "--out", tmp_path / "run",
                     "model=no-such-org/no-such-model", env={"HF_HUB_OFFLINE": "1"})
    _one_line_error(result, "cannot load model 'no-such-org/no-such-model'")


# ------------------------------------------------------------------ real Ray Train + DeepSpeed

TINY = {"model": "demo", "demo_layers": 2, "demo_embd": 64, "demo_vocab": 512, "seq_len": 64,
        "num_workers": 2, "device": "cpu", "precision": "fp32", "batch_size": 4, "micro_batch": 1,
        "warmup_steps": 1, "min_lr_ratio": 0.1}


def _tiny(tmp_path: Path, **changes) -> TrainConfig:
    sft = tmp_path / "sft"
    if not sft.exists():
        write_sft(sft, n=240, oasst=40)
    return from_mapping(TrainConfig, {**TINY, "data": str(sft), "out": str(tmp_path / "run"), **changes})


def _check_export_generates(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = tok("Question: Make alpha add its arguments\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0]), str)


def _rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.ray
@pytest.mark.slow
def test_zero2_worker_failure_resumes_and_loss_falls(tmp_path: Path, ray_local) -> None:
    from octoray.training import driver as training
    cfg = _tiny(tmp_path, zero_stage=2, lr=3e-3, max_steps=10, checkpoint_every=4, fail_at_step=6,
                max_failures=1, val_fraction=0.1, oasst_ratio=0.1, keep_checkpoints=2)
    run_dir = training.run(cfg)
    assert (run_dir / FAIL_MARKER).exists()  # rank 1 really died before step 6
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 11))  # every step exactly once
    assert {r["start_step"] for r in rows if r["step"] > 4} == {4}  # restarted from checkpoint 4
    per_step = cfg.batch_size * cfg.seq_len
    assert all(r["tokens"] == r["step"] * per_step for r in rows)  # token count resumed too
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    assert all(r["mfu"] is None for r in rows) and all(r["tokens_per_s"] > 0 for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 10]
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000008", "checkpoint_000010"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["complete"] and 5 <= manifest["counts"]["oasst_rows"] <= 40  # ~27 wanted (0.1 of the mix)
    assert (run_dir / "loss.png").stat().st_size > 1000 and any((run_dir / "tb").iterdir())
    _check_export_generates(run_dir / "model")
    assert training.run(cfg) == run_dir  # complete: a rerun does nothing


@pytest.mark.ray
@pytest.mark.slow
def test_zero3_lora_rerun_resumes_exports_merged_model(tmp_path: Path, ray_local) -> None:
    import torch
    from ray.train.v2.api.exceptions import TrainingFailedError
    from safetensors.torch import load_file

    from octoray.training import driver as training
    cfg = _tiny(tmp_path, zero_stage=3, lora=True, lr=1e-2, max_steps=6, checkpoint_every=2, fail_at_step=4,
                max_failures=0)
    with pytest.raises(TrainingFailedError):
        training.run(cfg)  # the worker dies, no retries allowed: the run fails after checkpoint 2
    assert (Path(cfg.out) / FAIL_MARKER).exists()  # it failed because of the hook, not something else
    assert not (Path(cfg.out) / "manifest.json").exists()
    run_dir = training.run(cfg)  # the same command again resumes from checkpoint 2
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {r["start_step"] for r in rows if r["step"] > 2} == {2}
    # LoRA adapts only the attention projections of a random model: it learns slower than full FT.
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.25, [r["loss"] for r in rows]
    exported = load_file(run_dir / "model" / "model.safetensors")
    base = load_file(run_dir / "base_model" / "model.safetensors")
    assert not any("lora" in key for key in exported)  # adapters merged, plain GPTBigCode keys
    key = next(k for k in exported if k.endswith("attn.c_attn.weight"))
    assert not torch.equal(exported[key], base[key])  # the merged adapter changed the weights
    other = next(k for k in exported if k.endswith("mlp.c_fc.weight"))
    assert torch.equal(exported[other], base[other])  # untouched by LoRA
    _check_export_generates(run_dir / "model")
    # the template of its (OctoCoder-style) data, so apply_chat_template prompts it as trained
    from octoray.modeling import chat_template, load_tokenizer, octocoder_prompt

    tokenizer = load_tokenizer(str(run_dir / "model"))
    assert tokenizer.chat_template == chat_template("octocoder")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False,
                                         add_generation_prompt=True) == octocoder_prompt("q")
    assert len(tokenizer("<fim_prefix>")["input_ids"]) == 1  # the demo tokenizer's FIM tokens


def test_train_config_is_a_frozen_dataclass() -> None:
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    assert math.isclose(cfg.lr, 5e-4)
