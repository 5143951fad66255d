"""The plan's per-block activation bytes against what autograd really saves in one GPTBigCode block.

Counted with saved-tensor hooks during one block's forward (each storage once, parameters left
out), for the variants whose terms the memory model adds: attention dropout on CPU sdpa (the math
kernel), LoRA with and without its own dropout, and none of them. The model is the real one
(transformers' GPTBigCode, peft's LoRA through the worker's own wrapping), fp32 on the CPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from octoray.training.memory import Setup, block_activations
from octoray.training.planning import model_shape
from octoray.training.train_config import TrainConfig

BATCH, SEQ = 2, 256


def _config(attn_pdrop: float):
    from transformers import GPTBigCodeConfig

    return GPTBigCodeConfig(vocab_size=512, n_positions=SEQ, n_embd=256, n_layer=2, n_head=4, multi_query=True,
                            attn_pdrop=attn_pdrop, bos_token_id=0, eos_token_id=0)


def _saved_bytes_of_one_block(hf_config, cfg: TrainConfig) -> int:
    """Bytes of the tensors autograd saves during the forward of the model's first block."""
    import torch
    from transformers import AutoModelForCausalLM

    from octoray.training.worker import _with_lora

    torch.manual_seed(0)
    hf_config._attn_implementation = "sdpa"
    model = _with_lora(AutoModelForCausalLM.from_config(hf_config), cfg)
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    block = next(m for name, m in model.named_modules() if name.endswith("transformer.h.0"))
    inside, saved = [False], {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    ids = torch.randint(0, hf_config.vocab_size, (BATCH, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(saved.values())


VARIANTS = {
    "full fine-tuning": (0.0, TrainConfig(model="x")),
    "attention dropout (CPU sdpa: math kernel)": (0.1, TrainConfig(model="x")),
    "LoRA with its dropout": (0.0, TrainConfig(model="x", lora=True, lora_dropout=0.05)),
    "LoRA without dropout": (0.0, TrainConfig(model="x", lora=True, lora_dropout=0.0)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_block_activations_match_what_autograd_saves(variant: str) -> None:
    attn_pdrop, cfg = VARIANTS[variant]
    hf_config = _config(attn_pdrop)
    setup = Setup(gpus=1, gpus_per_node=1, zero_stage=0, bytes_per_param=4, micro_batch=BATCH, seq_len=SEQ,
                  gradient_checkpointing=False, attn_implementation="sdpa", cuda=False, overlap_comm=False)
    predicted = block_activations(model_shape(hf_config, cfg), setup)
    measured = _saved_bytes_of_one_block(hf_config, cfg)
    assert predicted == pytest.approx(measured, rel=0.10), (variant, predicted, measured)


def test_the_terms_move_the_estimate_the_way_the_kernels_do() -> None:
    """On a GPU the fused kernel keeps no seq x seq scores even with dropout; LoRA without dropout
    keeps less than full fine-tuning (frozen weights need no inputs), with dropout more (each adapted
    input is kept again, dropped)."""
    cfg, lora = TrainConfig(model="x"), TrainConfig(model="x", lora=True)
    shape, lora_shape = model_shape(_config(0.1), cfg), model_shape(_config(0.1), lora)
    assert shape.attention_dropout and not model_shape(_config(0.0), cfg).attention_dropout
    assert lora_shape.lora_inputs == 256 + 256 + 1024  # c_attn, attn.c_proj, mlp.c_proj
    assert lora_shape.lora_ranks == 3 * lora.lora_r and lora_shape.lora_dropout
    cpu = Setup(gpus=1, gpus_per_node=1, zero_stage=2, bytes_per_param=2, micro_batch=1, seq_len=2048,
                gradient_checkpointing=False, attn_implementation="sdpa", cuda=False)
    gpu = replace(cpu, cuda=True)
    assert block_activations(shape, cpu) > block_activations(shape, gpu)
    no_dropout = model_shape(_config(0.1), replace(lora, lora_dropout=0.0))
    assert block_activations(no_dropout, gpu) < block_activations(shape, gpu) < block_activations(lora_shape, gpu)
