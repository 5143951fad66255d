"""octoray plan: the memory model against DeepSpeed's own estimators, StarCoder-15.5B's published
fit on 8 x A100-80GB, and the command line (one JSON object; bad input one line, exit 2)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from octoray.training.memory import ModelShape, Setup, cpu_model_states, model_states
from octoray.training.planning import model_shape, plan
from octoray.training.train_config import TrainConfig
from tests.helpers import run_cli

GiB = 2**30


def _starcoder_config():
    from transformers import GPTBigCodeConfig

    # bigcode/starcoder's config.json: 40 layers, 6144 hidden, 48 heads, multi-query, 49152 tokens, 8192 positions.
    return GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=6144, n_layer=40, n_head=48, multi_query=True,
                            bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def starcoder_dir(tmp_path_factory) -> Path:
    """A model directory holding only config.json (no weights, no tokenizer)."""
    out = tmp_path_factory.mktemp("starcoder")
    _starcoder_config().save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    return out


def _setup(stage: int, gpus: int, per_node: int, offload_opt: bool = False, offload_params: bool = False) -> Setup:
    return Setup(gpus=gpus, gpus_per_node=per_node, zero_stage=stage, bytes_per_param=2, micro_batch=1, seq_len=2048,
                 gradient_checkpointing=True, attn_implementation="sdpa", offload_optimizer=offload_opt,
                 offload_params=offload_params)


SHAPES = {"starcoder-15.5b": None,  # from the real config, on the meta device (below)
          "1b": ModelShape(params=1_137_000_000, trainable=1_137_000_000, largest_layer=100_663_296, layers=24,
                           hidden=2048, heads=16, kv_heads=1, ffn=8192, vocab=49152, positions=8192),
          "tiny": ModelShape(params=431_232, trainable=431_232, largest_layer=131_328, layers=2, hidden=128, heads=4,
                             kv_heads=1, ffn=512, vocab=2050, positions=2048)}


def _shape(name: str) -> ModelShape:
    if SHAPES[name] is None:
        SHAPES[name] = model_shape(_starcoder_config(), TrainConfig(model="x"))
    return SHAPES[name]


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("gpus,per_node", [(1, 1), (8, 8), (16, 8), (64, 8)])
def test_model_states_equal_deepspeeds_estimators(name: str, gpus: int, per_node: int) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape, nodes = _shape(name), gpus // per_node
    for offload in (False, True):
        ours = _setup(2, gpus, per_node, offload_opt=offload)
        cpu, gpu = estimate_zero2_model_states_mem_needs(shape.params, per_node, nodes, cpu_offload=offload)
        assert abs(sum(model_states(shape, ours).values()) - gpu) <= 2  # integer division per part
        assert cpu_model_states(shape, ours) == cpu
    for offload_opt, offload_params in ((False, False), (True, False), (True, True)):
        ours = _setup(3, gpus, per_node, offload_opt, offload_params)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, per_node, nodes,
                                                            cpu_offload=offload_opt, cpu_offload_params=offload_params)
        assert abs(sum(model_states(shape, ours).values()) - gpu) <= 2
        assert cpu_model_states(shape, ours) == cpu


def test_all_cold_printouts_agree_for_starcoder() -> None:
    """DeepSpeed's printed tables (the _all_cold estimators, GB with two decimals) for 1 x 8 GPUs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    shape = _shape("starcoder-15.5b")
    for stage, estimator, args in ((2, estimate_zero2_model_states_mem_needs_all_cold, (shape.params,)),
                                   (3, estimate_zero3_model_states_mem_needs_all_cold, (shape.params, shape.largest_layer))):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            estimator(*args, num_gpus_per_node=8, num_nodes=1)
        rows = re.findall(r"([\d.]+)GB \|\s+([\d.]+)GB \| (.*)", out.getvalue())
        assert len(rows) == (2 if stage == 2 else 6), out.getvalue()
        for _, per_gpu_gb, options in rows:  # DeepSpeed's "GB" are 2**30 bytes
            ours = _setup(stage, 8, 8, offload_opt="offload_optimizer=none" not in options and "offload_optimizer" in options,
                          offload_params="offload_param=" in options and "offload_param=none" not in options)
            assert abs(sum(model_states(shape, ours).values()) / GiB - float(per_gpu_gb)) < 0.006, options


def test_starcoder_parameters_from_its_config_alone() -> None:
    shape = _shape("starcoder-15.5b")
    assert 15.4e9 < shape.params < 15.6e9  # "StarCoder 15.5B"
    assert shape.largest_layer == 49152 * 6144  # the (tied) token embedding
    lora = model_shape(_starcoder_config(), TrainConfig(model="x", lora=True))
    assert lora.params > shape.params and 0 < lora.trainable < 0.01 * shape.params


def _recipe(**changes) -> TrainConfig:
    """jobs/octocoder.yaml's train: section as full fine-tuning, changed as asked."""
    from octoray.config import load_config

    base = load_config(TrainConfig, "jobs/octocoder.yaml", section="train")
    return replace(base, lora=False, **changes)


def test_starcoder_on_8_a100_80gb_as_published() -> None:
    """Full fine-tuning of StarCoder-15B on 8 x A100-80GB fits only with sharded states, gradient
    checkpointing and micro-batch 1."""
    shape, memory = _shape("starcoder-15.5b"), 80 * GiB

    def fits(**changes) -> dict:
        return plan(_recipe(**changes), gpus=8, gpu_memory=memory, gpu_type="A100", shape=shape)

    zero2 = fits(zero_stage=2, gradient_checkpointing=False, micro_batch=1)
    assert not zero2["fits"] and zero2["per_gpu_bytes"] > memory
    assert any("gradient_checkpointing" in s or "zero_stage: 3" in s for s in zero2["suggestions"])
    zero3 = fits(zero_stage=3, gradient_checkpointing=True, micro_batch=1)
    assert zero3["fits"]
    # ZeRO-3 holds ~16 bytes of optimizer state per parameter across the data-parallel group.
    assert zero3["per_gpu_parts"]["model_optimizer"] * 8 == pytest.approx(16 * shape.params, rel=1e-6)
    assert not fits(zero_stage=3, gradient_checkpointing=False, micro_batch=8)["fits"]  # activations grow with the batch
    assert not fits(zero_stage=3, gradient_checkpointing=True, micro_batch=1, attn_implementation="eager",
                    seq_len=8192)["per_gpu_bytes"] < zero3["per_gpu_bytes"]


def test_checkpointing_and_attention_move_the_activations() -> None:
    shape = _shape("starcoder-15.5b")
    kwargs = {"gpus": 8, "gpu_memory": 80 * GiB, "gpu_type": "A100", "shape": shape}
    off = plan(_recipe(zero_stage=3, gradient_checkpointing=False), **kwargs)
    on = plan(_recipe(zero_stage=3, gradient_checkpointing=True), **kwargs)
    eager = plan(_recipe(zero_stage=3, gradient_checkpointing=False, attn_implementation="eager"), **kwargs)
    assert on["per_gpu_parts"]["activations_layers"] * 5 < off["per_gpu_parts"]["activations_layers"]
    assert eager["per_gpu_parts"]["activations_layers"] > off["per_gpu_parts"]["activations_layers"]
    assert on["seconds"] > off["seconds"]  # the recompute costs one more forward pass
    assert on["tokens"] == 35 * 32 * 2048 and on["steps"] == 35


def test_cli_json_with_a_config_only_model_dir(starcoder_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(f"train:\n  model: {starcoder_dir}\n  seq_len: 2048\n  num_workers: 8\n  device: gpu\n"
                      "  precision: bf16\n  zero_stage: 3\n  batch_size: 32\n  micro_batch: 1\n"
                      "  gradient_checkpointing: true\n  max_steps: 35\n")
    result = run_cli("plan", config, "--gpus", "8", "--gpu-memory", "80GB", "--json", "--usd-per-hour", "40")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("params", "trainable_params", "per_gpu_bytes", "per_gpu_parts", "gpu_memory_bytes", "fits",
                "suggestions", "tokens", "steps", "seconds"):
        assert key in out, key
    assert out["fits"] is True and out["gpu_memory_bytes"] == 80 * GiB
    assert out["per_gpu_bytes"] == sum(out["per_gpu_parts"].values())
    assert out["usd"] == pytest.approx(out["seconds"] / 3600 * 40, abs=0.01)
    small = run_cli("plan", config, "--gpus", "8", "--gpu-memory", "24GB", "--json", "zero_stage=2")
    assert small.returncode == 0 and json.loads(small.stdout)["fits"] is False
    assert json.loads(small.stdout)["suggestions"]


def test_cluster_yaml_labels_give_memory_and_price(starcoder_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {starcoder_dir}\nnum_workers: 8\ndevice: gpu\nbatch_size: 32\nzero_stage: 3\n"
                      "gradient_checkpointing: true\n")
    result = run_cli("plan", config, "--cluster", "cluster/aws.yaml", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["gpu_memory_bytes"] == 40 * GiB and out["usd_per_hour"] > 0 and out["usd"] > 0


@pytest.mark.parametrize("args,message", [
    (["missing.yaml", "--gpus", "8", "--gpu-memory", "80GB"], "config file not found"),
    (["jobs/octocoder.yaml", "--gpus", "8", "--gpu-memory", "eighty"], "not a memory size"),
    (["jobs/octocoder.yaml", "--gpus", "8", "--gpu-memory", "80GB", "zero_stage=7"], "zero_stage"),
    (["jobs/octocoder.yaml", "--gpus", "8"], "give the GPU memory"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], message: str) -> None:
    result = run_cli("plan", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("octoray plan")]) == 1


def test_calibrated_plan_times_the_run_from_the_calibrations_parts() -> None:
    """The plan's seconds and wall_seconds are calibration.predict's (tests/training/test_calibration.py
    checks its arithmetic); the parts are in the JSON."""
    from octoray.training.calibration import Calibration, predict
    from octoray.training.planning import timing

    cfg = TrainConfig(model="x", max_steps=100, checkpoint_every=10, num_workers=2, batch_size=4, seq_len=256)
    measured = Calibration(steps=10, checkpoint_every=3, workers=2, micro_batch=1, batch_size=4, train_sequences=243,
                           first_step_seconds=3.0, step_seconds=0.5, epoch_start_seconds=2.0,
                           epoch_start_source="step 1's wait for data", between_steps_seconds=0.01,
                           checkpoint_row_seconds=0.05, checkpoint_save_seconds=0.3, startup_seconds=60.0,
                           tail_seconds=8.0, wall_seconds=80.0, tokens_per_s_per_worker=1024.0)
    out = timing(cfg, flops=1.0, tokens=100 * 4 * 256, gpus=2, gpu_type=None, mfu=None, measured=measured)
    # Step 1, 99 more steps, the second pass over the data at step 61.
    assert out["seconds"] == pytest.approx(3.0 + 99 * 0.5 + 2.0) == predict(measured, max_steps=100, checkpoint_every=10, gpus=2)["seconds"]
    assert out["wall_seconds"] == pytest.approx(60.0 + out["seconds"] + 99 * 0.01 + 10 * 0.05 + 9 * 0.3 + 8.0)
    assert out["wall_seconds"] == pytest.approx(sum(out["wall_parts"].values()))
    assert out["epochs_started"] == 2 and out["calibration"]["startup_seconds"] == 60.0


def test_calibrate_needs_data() -> None:
    result = run_cli("plan", "jobs/demo.yaml", "--calibrate", "4", "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data=SFT_DIR" in result.stderr and result.stdout == ""


@pytest.mark.ray
@pytest.mark.slow
def test_calibrate_runs_octoray_train_and_prints_one_json_object(tmp_path: Path) -> None:
    """--calibrate trains for real (Ray Train + DeepSpeed, 2 workers) and times the plan from its rows;
    the rows also carry what each worker's memory peaked at."""
    from tests.helpers.sft import write_sft

    sft = write_sft(tmp_path / "sft", n=40)
    keep = tmp_path / "calibration"
    result = run_cli("plan", "jobs/demo.yaml", f"data={sft}", "max_steps=50", "--calibrate", "4",
                     "--calibrate-dir", keep, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)  # nothing else on stdout: the training's lines went to stderr
    calibration = out["calibration"]
    assert calibration["steps"] == 4 and calibration["step_seconds"] > 0 and calibration["wall_seconds"] > 0
    assert out["throughput_source"].startswith("calibrated") and out["steps"] == 50
    assert out["wall_seconds"] > calibration["wall_seconds"]  # 46 more steps and their saves
    assert calibration["startup_seconds"] > 0 and calibration["tail_seconds"] > 0
    # Start-up and tail are parts of the calibration run's own wall time; its steps are the rest.
    assert (calibration["startup_seconds"] + calibration["tail_seconds"] < calibration["wall_seconds"]
            and calibration["train_sequences"] > 0)
    rows = [json.loads(line) for line in (keep / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and all("time" in row for row in rows)
    peaks = [row["peak_memory_bytes"] for row in rows if "peak_memory_bytes" in row]
    assert peaks and min(peaks) > out["per_gpu_parts"]["model_params"]  # at least the weights were held
    assert [row["step"] for row in rows if "peak_memory_bytes" in row] == [2, 4]  # saved every 2nd step (at least)


def test_data_volume_counts_tokens_as_training_packs_them(tmp_path: Path) -> None:
    """A local model with a tokenizer: the plan's token count is what training's packing produces."""
    from octoray.modeling import build_demo_model
    from octoray.storage.stage_dirs import read_parquet
    from octoray.training.data_volume import data_volume
    from octoray.training.packing import IGNORE_INDEX, pack_examples
    from tests.helpers.sft import write_sft

    sft = write_sft(tmp_path / "sft", n=60, oasst=5)
    table = read_parquet(next((sft / "data").glob("*.parquet")), columns=["prompt", "completion"])
    prompts, completions = table["prompt"].to_pylist(), table["completion"].to_pylist()
    model = build_demo_model(tmp_path / "model", prompts + completions, vocab_size=400)
    volume = data_volume(TrainConfig(model=str(model), data=str(sft)))
    from transformers import AutoTokenizer

    packed = pack_examples(prompts, completions, AutoTokenizer.from_pretrained(model), seq_len=128)
    assert volume["rows"] == 65 and volume["tokens"] == int((packed["labels"] != IGNORE_INDEX).sum())
    assert volume["chars"] == sum(len(p) + len(c) for p, c in zip(prompts, completions))
    assert volume["tokens_source"].startswith("counted")


def test_plan_reports_the_datas_tokens_and_epochs(tmp_path: Path) -> None:
    """The demo model's tokenizer is trained at the start of training: the tokens are an estimate, said so."""
    from octoray.training.data_volume import CHARS_PER_TOKEN
    from tests.helpers.sft import write_sft

    sft = write_sft(tmp_path / "sft", n=50)
    result = run_cli("plan", "jobs/demo.yaml", f"data={sft}", "max_steps=20", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    data = out["data"]
    assert data["rows"] == 50 and data["tokens"] == round(data["chars"] / CHARS_PER_TOKEN)
    assert "estimated" in data["tokens_source"]
    assert out["epochs"] == pytest.approx(out["tokens"] / data["tokens"])
    text = run_cli("plan", "jobs/demo.yaml", f"data={sft}", "max_steps=20")
    assert text.returncode == 0 and "epochs of it" in text.stdout


def test_plan_refuses_data_that_is_not_a_complete_filter_output(tmp_path: Path) -> None:
    (tmp_path / "sft").mkdir()
    result = run_cli("plan", "jobs/demo.yaml", f"data={tmp_path / 'sft'}", "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a complete 'octoray filter' output" in result.stderr and result.stdout == ""
