"""Model and tokenizer loading, and the tiny demo model built from a config.

Real runs name a hub id (``bigcode/starcoderbase-1b``) or a local directory; both go through
``from_pretrained``. No weights can be downloaded on a laptop demo or in CI, so the demo builds a
small GPTBigCode (the StarCoder architecture) from a config and trains a byte-level BPE tokenizer
on the SFT text, saves both with ``save_pretrained``, and from then on loads them back through the
very same ``from_pretrained`` path a hub model uses.

The prompt templates live here too (one source of truth): what ``octoray filter`` writes into the
SFT rows, what ``octoray eval`` sends, and the ``chat_template`` ``octoray train`` saves with the
model (see "Prompt templates" below).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterable, Literal

from octoray.errors import UserError

EOS = "<|endoftext|>"
PAD = "<fim_pad>"
#: Fill-in-the-middle sentinels, StarCoder's (its prefix-suffix-middle order is
#: ``<fim_prefix>PREFIX<fim_suffix>SUFFIX<fim_middle>`` and the model writes the middle).
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<fim_prefix>", "<fim_middle>", "<fim_suffix>"
#: StarCoder's special tokens, in its vocabulary's order (ids 0-18 there): the demo tokenizer has
#: them too, each one token, so FIM and the commit-tag template work on the demo model as on StarCoder.
SPECIAL_TOKENS = (EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, PAD, "<filename>", "<gh_stars>", "<issue_start>",
                  "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
                  "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>",
                  "<reponame>")


def name_deepspeed_accelerator() -> None:
    """Tell DeepSpeed it runs on the CPU when this process sees no GPU.

    transformers imports DeepSpeed whenever it is installed, and DeepSpeed then probes for an
    accelerator and warns "unable to detect" one: a warning on every CPU run (the demo, CI) that
    asks nothing of the user. ``DS_ACCELERATOR`` set by the user wins.
    """
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (StarCoder's kind), as a fast HF tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS, PAD)])


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
    name_deepspeed_accelerator()  # before transformers imports DeepSpeed
    import torch
    from transformers import GPTBigCodeForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = demo_model_config(vocab_size=len(tokenizer), n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                               n_positions=n_positions, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    model = GPTBigCodeForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def demo_model_config(*, vocab_size: int, n_layer: int, n_embd: int, n_positions: int, n_head: int = 4,
                      eos_token_id: int = 0, pad_token_id: int | None = None) -> Any:
    """The demo model's GPTBigCode config (multi-query attention, as StarCoder): what
    :func:`build_demo_model` builds and what ``octoray plan`` sizes before it is built."""
    from transformers import GPTBigCodeConfig

    return GPTBigCodeConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, multi_query=True, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id)


def load_tokenizer(name_or_path: str) -> Any:
    """``AutoTokenizer.from_pretrained`` with a one-line error when it cannot be found.

    A model directory URI (``s3://bucket/runs/x/model``) is downloaded once per node first.
    """
    from transformers import AutoTokenizer

    from octoray.storage.locations import local_copy

    source = local_copy(name_or_path)
    # A hub id with no network: the cache or one line at once, not the client's ~25 s of retries.
    offline = _hub_name(str(source)) and hub_unreachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError) as exc:
        if offline:
            raise UserError(f"cannot load tokenizer '{name_or_path}': the Hugging Face Hub is unreachable ({offline}) "
                            "and it is not in the local cache: give a local model directory "
                            "(model=./runs/demo/train/model)") from None
        raise load_error("tokenizer", name_or_path, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; EOS is what StarCoder uses
    return tokenizer


def load_model(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with a one-line error when it cannot be found
    (a URI is downloaded once per node first)."""
    name_deepspeed_accelerator()
    from transformers import AutoModelForCausalLM

    from octoray.storage.locations import local_copy

    try:
        return AutoModelForCausalLM.from_pretrained(local_copy(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise load_error("model", name_or_path, exc) from None


def load_error(what: str, name_or_path: str, exc: BaseException) -> UserError:
    """The one-line error for a failed ``from_pretrained`` of a ``what`` ("tokenizer", "model").

    A gated hub model (``bigcode/starcoder``, the filter's default tokenizer, is one) fails with
    an authorization error for anyone who has not accepted its licence or is not logged in; the
    message then says what to do instead of repeating the Hub's HTTP status.
    """
    if _is_gated(exc):
        return UserError(
            f"cannot load {what} '{name_or_path}': it is a gated model on the Hugging Face Hub: accept its "
            f"licence at https://huggingface.co/{name_or_path} and log in ('hf auth login' or HF_TOKEN), "
            f"or give another {what.split()[0]}: a hub id you can read or a local directory "
            "(model= in filter and train)")
    text = str(exc).strip()
    return UserError(f"cannot load {what} '{name_or_path}': {text.splitlines()[0] if text else type(exc).__name__}")


def _is_gated(exc: BaseException) -> bool:
    """True when ``exc`` comes from huggingface_hub's ``GatedRepoError`` (transformers wraps it in an OSError)."""
    try:
        from huggingface_hub.errors import GatedRepoError
    except ImportError:  # an old huggingface_hub: only the text can tell
        GatedRepoError = ()  # type: ignore[assignment]  # noqa: N806
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, GatedRepoError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "gated repo" in str(exc).lower()


def preflight_model(name_or_path: str) -> tuple[str, Any]:
    """Check a model before any Ray work: ``(model, config)`` with a local directory made
    absolute (Ray workers do not share our working directory), or a one-line UserError.

    Loads the tokenizer and the model config -- small files -- never the weights.
    """
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(f"model '{name_or_path}' is a file; give a model directory or a hub id")
        model = str(local.resolve())
    elif not _is_hub_id(name_or_path):
        raise UserError(f"model '{name_or_path}': no such model directory, and not a hub id "
                        f"(hub ids look like 'bigcode/starcoder'); {_model_dirs_hint()}")
    else:
        model = name_or_path
    from transformers import AutoConfig  # only now: a mistyped path is answered without importing torch

    load_tokenizer(model)
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise load_error("model config", name_or_path, exc) from None
    return model, config


def _model_dirs_hint(root: Path = Path("runs")) -> str:
    """Which model directories exist under ``runs/`` (what ``octoray train`` and the demo write),
    so a mistyped path is answered with the one that exists."""
    found = sorted(str(config.parent) for pattern in ("*/model/config.json", "*/*/model/config.json")
                   for config in root.glob(pattern))
    if found:
        return f"model directories under {root}/: {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}"
    return "octoray train writes RUN_DIR/model (make demo: runs/demo/train/model)"


@functools.lru_cache(maxsize=1)  # once per process: every language and tokenizer asks, one answer does
def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, or None when it can (or cannot be told).

    The hub clients retry a missing network for tens of seconds before they fail; a DNS lookup
    and a TCP connect say the same in milliseconds. ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``
    count as unreachable only for downloads, so they are left to the clients (they read their
    caches); behind a proxy the direct connect proves nothing, so the check is skipped.
    """
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except socket.gaierror:
        return f"{host} does not resolve (no network?)"
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


def offline_mode(*variables: str) -> bool:
    """Whether one of the Hugging Face clients' offline switches (``HF_HUB_OFFLINE`` ...) is on."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in variables)


def _hub_name(name: str) -> bool:
    """A name ``from_pretrained`` would look up on the hub: no such local path, not a URI, and the
    clients not already told to stay offline."""
    return (not offline_mode("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and "://" not in name
            and not Path(name).expanduser().exists() and _is_hub_id(name))


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` is a well-formed Hugging Face Hub repo id (it may still not exist)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True



# ---------------------------------------------------------------------------------------------
# Prompt templates
#
# The prompt templates, one source of truth: what ``octoray filter`` writes into the SFT rows,
# what ``octoray eval`` sends, and the ``chat_template`` ``octoray train`` saves with the model.
#
# Two formats, as in OctoPack:
#
# - ``octocoder``: ``Question: {instruction}\n\nAnswer:\n{response}``. The ``Answer:\n`` is
#   bigcode-evaluation-harness's HumanEvalPack prompt byte for byte (the reference prompts must not
#   change), so training writes the same bytes: a model trained on ``Answer: \n`` and evaluated on
#   ``Answer:\n`` sees a token sequence at evaluation it never saw in training.
# - ``commit_tags``: ``<commit_before>{old}<commit_msg>{subject}<commit_after>{new}`` (StarCoder's
#   commit format; the tags are single special tokens of StarCoder's tokenizer and the demo's).
#
# The chat templates are Jinja (what ``tokenizer.apply_chat_template``, vLLM and the Hub render);
# tests check that they render exactly the training prompt.

TemplateName = Literal["octocoder", "commit_tags"]

QUESTION = "Question: "
#: Between the instruction and the response.
ANSWER = "\n\nAnswer:\n"
COMMIT_BEFORE, COMMIT_MSG, COMMIT_AFTER = "<commit_before>", "<commit_msg>", "<commit_after>"

#: The template a model without a ``chat_template`` is served with (OctoCoder's).
DEFAULT_TEMPLATE: TemplateName = "octocoder"

# A system message goes first, followed by a blank line; each user turn is a Question, each
# assistant turn an Answer closed by EOS -- training packs prompt + completion + EOS, so a
# conversation reads exactly like packed training examples.
_OCTOCODER_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{{ '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' }}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\nAnswer:\\n' }}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAnswer:\\n' }}{% endif %}"
)
# The system message is the code before the change, the user message the commit message, the
# assistant message the code after.
_COMMIT_TAGS_JINJA = (
    "{% set ns = namespace(before='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.before = message['content'] %}"
    "{% elif message['role'] == 'user' %}{{ '<commit_before>' }}{{ ns.before }}{{ '<commit_msg>' }}"
    "{{ message['content'] }}{% set ns.before = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ '<commit_after>' }}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<commit_after>' }}{% endif %}"
)
CHAT_TEMPLATES: dict[str, str] = {"octocoder": _OCTOCODER_JINJA, "commit_tags": _COMMIT_TAGS_JINJA}


def octocoder_prompt(instruction: str) -> str:
    """The OctoCoder prompt of one instruction (the response follows it directly)."""
    return f"{QUESTION}{instruction}{ANSWER}"


def commit_tags_prompt(old: str, subject: str) -> str:
    """The commit-tag prompt of a change (the new contents follow it directly)."""
    return f"{COMMIT_BEFORE}{old}{COMMIT_MSG}{subject}{COMMIT_AFTER}"


def chat_template(name: str) -> str:
    """The Jinja chat template of the format ``name`` (``octocoder`` or ``commit_tags``)."""
    return CHAT_TEMPLATES[name]


def detect_template(prompts: Iterable[str]) -> TemplateName:
    """Which format SFT prompts were written in: ``commit_tags`` when most start with the tag
    (OASST rows are always OctoCoder-style, so a commit-tag dataset still holds some of those)."""
    tags = other = 0
    for prompt in prompts:
        if prompt.startswith(COMMIT_BEFORE):
            tags += 1
        else:
            other += 1
    return "commit_tags" if tags > other else "octocoder"
