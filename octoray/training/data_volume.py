"""How much the SFT data holds, for ``octoray plan``: rows (from the manifest) and tokens.

Tokens are counted with the model's own tokenizer when it loads without the network (a local
model directory, or a hub id already in the cache), as training packs them: prompt, completion and
one EOS per example. Otherwise (the demo model, whose tokenizer is trained on the data at the start
of ``octoray train``; a config-only directory) they are estimated from the characters at
:data:`CHARS_PER_TOKEN`, and the plan says so.
"""

from __future__ import annotations

from typing import Any

from octoray.errors import UserError
from octoray.training.train_config import DEMO, TrainConfig

#: Characters per token the estimate assumes: a round figure for code and English under a BPE
#: vocabulary of ~50k entries such as StarCoder's; a count replaces it whenever a tokenizer loads.
CHARS_PER_TOKEN = 3.5


def data_volume(cfg: TrainConfig) -> dict[str, Any]:
    """Rows, characters and tokens of ``cfg.data``, and how the tokens were had."""
    from octoray.storage.locations import location
    from octoray.storage.stage_dirs import read_manifest, read_parquet
    from octoray.training.sft_data import sft_files

    manifest = read_manifest(cfg.data)
    if manifest is None or not manifest.get("complete"):
        raise UserError(f"data={cfg.data}: not a complete 'octoray filter' output (no complete manifest.json)")
    tokenizer = _offline_tokenizer(cfg.model)
    rows = chars = tokens = 0
    for path in sft_files(cfg.data):
        table = read_parquet(location(path), columns=["prompt", "completion"])
        prompts, completions = table["prompt"].to_pylist(), table["completion"].to_pylist()
        rows += len(prompts)
        chars += sum(len(p) + len(c) for p, c in zip(prompts, completions))
        if tokenizer is not None and prompts:
            tokens += sum(map(len, tokenizer(prompts, add_special_tokens=False)["input_ids"]))
            tokens += sum(map(len, tokenizer(completions, add_special_tokens=False)["input_ids"])) + len(prompts)
    if tokenizer is None:
        return {"rows": rows, "chars": chars, "tokens": round(chars / CHARS_PER_TOKEN),
                "tokens_source": f"estimated at {CHARS_PER_TOKEN} characters per token (no tokenizer to count with)"}
    return {"rows": rows, "chars": chars, "tokens": tokens, "tokens_source": f"counted with {cfg.model}'s tokenizer"}


def _offline_tokenizer(model: str) -> Any:
    """The model's tokenizer from disk or the hub cache, or None (the demo model; no files)."""
    if model == DEMO:
        return None
    from transformers import AutoTokenizer

    from octoray.storage.locations import is_uri

    if is_uri(model):
        return None  # counting would download the model directory first
    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return None
