"""Model and tokenizer loading, and the tiny demo model built from a config.

Real runs name a hub id (``bigcode/starcoderbase-1b``) or a local directory; both go through
``from_pretrained``. No weights can be downloaded on a laptop demo or in CI, so the demo builds a
small GPTBigCode (the StarCoder architecture) from a config and trains a byte-level BPE tokenizer
on the SFT text, saves both with ``save_pretrained``, and from then on loads them back through the
very same ``from_pretrained`` path a hub model uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from octoray.errors import UserError

EOS = "<|endoftext|>"
PAD = "<fim_pad>"
SPECIAL_TOKENS = (EOS, PAD)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (StarCoder's kind), as a fast HF tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, pad_token=PAD)


def build_demo_model(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 2048,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    n_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Build a randomly initialised GPTBigCode + BPE tokenizer trained on ``texts``; save both.

    Returns ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``.
    """
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = GPTBigCodeConfig(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, multi_query=True, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPTBigCodeForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(name_or_path: str) -> Any:
    """``AutoTokenizer.from_pretrained`` with a one-line error when it cannot be found.

    A model directory URI (``s3://bucket/runs/x/model``) is downloaded once per node first.
    """
    from transformers import AutoTokenizer

    from octoray.storage import local_copy

    try:
        tokenizer = AutoTokenizer.from_pretrained(local_copy(name_or_path))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer '{name_or_path}': {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; EOS is what StarCoder uses
    return tokenizer


def load_model(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with a one-line error when it cannot be found
    (a URI is downloaded once per node first)."""
    from transformers import AutoModelForCausalLM

    from octoray.storage import local_copy

    try:
        return AutoModelForCausalLM.from_pretrained(local_copy(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model '{name_or_path}': {str(exc).splitlines()[0]}") from None
