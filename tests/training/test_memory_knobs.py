"""gradient_checkpointing lowers the measured peak memory of a real forward+backward and leaves the
loss curve unchanged (same seed); the plan's activation estimate is checked against the measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # two real training processes (~30 s together): not the fast tier

# One process per measurement: peak RSS (VmHWM, reset through /proc/self/clear_refs) from just
# before training to its end, minus the RSS then. The model: 6 layers, 256 wide, sequences of 1024.
SCRIPT = r"""
import json, sys, torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM
checkpointing = sys.argv[1] == "1"
torch.manual_seed(0); torch.set_num_threads(1)
config = GPTBigCodeConfig(vocab_size=512, n_positions=1024, n_embd=256, n_layer=6, n_head=4, multi_query=True,
                          attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
config._attn_implementation = "sdpa"
model = GPTBigCodeForCausalLM(config)
model.config.use_cache = False
if checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
batches = [torch.randint(0, 512, (2, 1024)) for _ in range(4)]
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
# Adam's states exist from the first step on: take one step first, so the peak is the activations'.
model(input_ids=batches[0], labels=batches[0]).loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
torch.manual_seed(1)
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
losses = []
for batch in batches[1:]:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
print(json.dumps({"losses": losses, "peak": rss("VmHWM:") - before}))
"""


def _measure(checkpointing: bool) -> dict:
    # A fixed mmap threshold: glibc's adaptive one would keep freed activations in the heap, so
    # RSS would no longer follow what is allocated (the measurement would depend on history).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if checkpointing else "0"], capture_output=True,
                         text=True, check=True, cwd=REPO_ROOT, timeout=300, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured() -> dict[bool, dict]:
    return {flag: _measure(flag) for flag in (False, True)}


def test_checkpointing_lowers_measured_peak_memory(measured) -> None:
    off, on = measured[False]["peak"], measured[True]["peak"]
    assert on < 0.6 * off, (on, off)


def test_checkpointing_leaves_the_loss_curve_unchanged(measured) -> None:
    # Dropout is on (residual, embedding): the recompute replays the saved RNG state.
    assert measured[True]["losses"] == pytest.approx(measured[False]["losses"], rel=1e-5, abs=1e-6)


def test_plan_predicts_the_measured_activation_peak(measured) -> None:
    """The memory model's activations for this run against the measured peak RSS growth (within 20 %)."""
    from octoray.training.memory import ModelShape, Setup, activations

    shape = ModelShape(params=0, trainable=0, largest_layer=0, layers=6, hidden=256, heads=4, kv_heads=1, ffn=1024,
                       vocab=512, positions=1024)
    for flag in (False, True):
        setup = Setup(gpus=1, gpus_per_node=1, zero_stage=0, bytes_per_param=4, micro_batch=2, seq_len=1024,
                      gradient_checkpointing=flag, attn_implementation="sdpa", cuda=False, overlap_comm=False)
        predicted = sum(activations(shape, setup).values())
        assert predicted == pytest.approx(measured[flag]["peak"], rel=0.20), (flag, predicted, measured[flag]["peak"])
