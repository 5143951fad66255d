"""Tokenise prompt/completion pairs and pack them into fixed-length training blocks.

OctoCoder packs samples back to back, separated by EOS, into sequences of ``seq_len`` tokens and
trains on the whole sequence; a target-only mask (loss on completions only) is kept as an option
because the paper found it slightly worse. Samples are not masked from attending to each other
inside a block, exactly like the original recipe. The tail of each packed batch is padded with
the pad token and ignored by the loss rather than dropped, so small data sets lose nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

#: Label value that Hugging Face causal LMs leave out of the loss.
IGNORE_INDEX = -100


def pack_examples(
    prompts: Sequence[str],
    completions: Sequence[str],
    tokenizer: Any,
    seq_len: int,
    *,
    target_only: bool = False,
) -> dict[str, np.ndarray]:
    """Pack ``prompt + completion + EOS`` for every pair into ``(n, seq_len)`` ``input_ids``/``labels``.

    Prompt and completion are tokenised separately so the target-only mask knows exactly where
    the completion starts. Labels equal the inputs (the model shifts them), with
    :data:`IGNORE_INDEX` on padding and, if ``target_only``, on prompt tokens.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if len(prompts) else []
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"] if len(completions) else []
    ids: list[int] = []
    labels: list[int] = []
    for p, c in zip(prompt_ids, completion_ids):
        ids.extend(p)
        ids.extend(c)
        ids.append(eos)
        labels.extend([IGNORE_INDEX] * len(p) if target_only else p)
        labels.extend(c)
        labels.append(eos)
    remainder = len(ids) % seq_len
    if remainder:
        ids.extend([pad] * (seq_len - remainder))
        labels.extend([IGNORE_INDEX] * (seq_len - remainder))
    return {
        "input_ids": np.asarray(ids, dtype=np.int64).reshape(-1, seq_len),
        "labels": np.asarray(labels, dtype=np.int64).reshape(-1, seq_len),
    }


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str) -> Any:
    # One load per Ray Data worker process instead of one per batch.
    from octoray.modeling import load_tokenizer

    return load_tokenizer(path)


def pack_batch(batch: dict[str, np.ndarray], *, tokenizer_path: str, seq_len: int,
               target_only: bool = False) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: a batch of SFT rows -> a batch of packed blocks."""
    return pack_examples([str(p) for p in batch["prompt"]], [str(c) for c in batch["completion"]],
                         _cached_tokenizer(tokenizer_path), seq_len, target_only=target_only)
