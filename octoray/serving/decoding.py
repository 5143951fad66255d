"""Batched decoding for ``octoray serve``: left-padded batches, a KV cache, per-row sampling.

:class:`Sequence` is one completion being generated with its own sampling settings (temperature,
top_p, seed, stop strings, ``max_tokens``); :class:`BatchDecoder` decodes a list of them together
with a Hugging Face causal LM, one forward pass per step for the whole batch. Torch only: no Ray,
no HTTP (the server's scheduler, :mod:`octoray.serving.scheduler`, drives it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional

logger = logging.getLogger("octoray.serve")


@dataclass(eq=False)
class Sequence:
    """One completion being generated (one prompt, one of its ``n`` samples) and its settings."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    index: int = 0
    seed: Optional[int] = None
    queue: Optional[asyncio.Queue] = None  # streamed pieces go here: (index, text, finish_reason)
    token_ids: list[int] = field(default_factory=list)
    generated: int = 0  # tokens produced, the EOS included (the usage count)
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    finish_reason: Optional[str] = None
    cancelled: bool = False
    uniforms: list[float] = field(default_factory=list)  # one draw per token, from this row's seed
    # vLLM's sampling extras (off at these defaults)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL-style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS is masked and stop strings are passed over until this many tokens are out
    logprobs: Optional[int] = None  # record each token's log-probability and this many alternatives
    #: per sampled token (EOS included): (its log-probability, [(token id, log-probability)] best first)
    sampled_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # incremental detokenisation: token_ids[_prefix:_read] is the window whose text is already in text
    _prefix: int = field(default=0, repr=False)
    _read: int = field(default=0, repr=False)

    @property
    def done(self) -> bool:
        """Finished (stop, length) or abandoned by its client."""
        return self.finish_reason is not None or self.cancelled

    def add(self, token: int, eos_ids: frozenset[int], decode: Any) -> None:
        """Append one sampled token; update text, stop/length state and stream the safe new text."""
        self.generated += 1
        if token in eos_ids:
            self.finish_reason = "stop"
            self._detokenize(decode, final=True)
        else:
            self.token_ids.append(token)
            seen = len(self.text)
            self._detokenize(decode, final=self.generated >= self.max_tokens)
            # only the new text (and the stop string's length before it) can hold a new match; before
            # min_tokens no stop string ends the sequence (vLLM's rule: a match there is passed over)
            hits = [i for i in (self.text.find(s, max(0, seen - len(s) + 1)) for s in self.stop) if i >= 0
                    ] if self.generated >= self.min_tokens else []
            if hits:  # the stop string itself is never returned, as in the OpenAI API
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop"
            elif self.generated >= self.max_tokens:
                self.finish_reason = "length"
        if self.queue is not None:
            self._emit()

    def _detokenize(self, decode: Any, final: bool) -> None:
        """Append the text of the tokens not shown yet, without decoding the whole output each step.

        The prefix-offset method of TGI and vLLM: decode the window from the last committed point
        and keep what it adds; a window ending inside a multi-byte character ("\ufffd") waits
        for the next token, unless the sequence is ending. For byte-level BPE (GPT-2, StarCoder)
        the result is exactly ``decode(token_ids)``.
        """
        before = decode(self.token_ids[self._prefix:self._read]) if self._read > self._prefix else ""
        window = decode(self.token_ids[self._prefix:])
        if len(window) > len(before) and (final or not window.endswith("\ufffd")):
            self.text += window[len(before):]
            self._prefix, self._read = self._read, len(self.token_ids)

    def _emit(self) -> None:
        end = len(self.text)
        if self.finish_reason is None:
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1  # an incomplete UTF-8 character: wait for its remaining bytes
            # hold back what could be the start of a stop string, so it is never sent
            end -= max((len(s) for s in self.stop), default=1) - 1
        if end > self.emitted or self.finish_reason is not None:
            self.queue.put_nowait((self.index, self.text[self.emitted:max(end, self.emitted)], self.finish_reason))
            self.emitted = max(end, self.emitted)


@dataclass(eq=False)
class _Batch:
    """Decoding state of the sequences in flight: KV cache, mask, positions, sampled tokens."""

    seqs: list[Sequence]
    cache: Any
    attention_mask: Any
    positions: Any  # position id of the last token, per row: (B, 1)
    next_tokens: list[int]


class BatchDecoder:
    """Left-padded batch decoding with a KV cache and per-row sampling settings.

    Left padding keeps every row's last token in the last column, so one forward pass per step
    serves all rows; explicit position ids make padded rows see the same positions as unpadded
    ones. Rows that finish are dropped from the cache (``batch_select_indices``).
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        import inspect

        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
        self.eos_ids = frozenset(i for i in eos if i is not None)
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._backend = _plain_backend(tokenizer)

    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text, special tokens dropped."""
        if self._backend is not None:  # twice per token per row: the wrapper's checks cost as much as the decode
            return self._backend.decode(token_ids, skip_special_tokens=True)
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate(self, seqs: list[Sequence]) -> None:
        """Decode ``seqs`` together until each one finishes (the synchronous form of the server loop)."""
        batch = self.prefill(seqs)
        while keep := self.advance(batch):
            self.step(batch, keep)

    def advance(self, batch: _Batch) -> list[int]:
        """Hand each row its sampled token; return the rows still going (empty: the batch is done).

        A row whose logits were not finite, or whose bookkeeping raises, fails alone
        (``finish_reason = "error"``); the other rows go on.
        """
        for seq, token in zip(batch.seqs, batch.next_tokens):
            if seq.done:
                continue
            if token < 0:
                seq.finish_reason = "error"
                continue
            try:
                seq.add(token, self.eos_ids, self.decode)
            except Exception:  # noqa: BLE001 - one row's failure must not end the batch
                logger.exception("sequence %d failed", seq.index)
                seq.finish_reason = "error"
        return [i for i, seq in enumerate(batch.seqs) if not seq.done]

    def prefill(self, seqs: list[Sequence]) -> _Batch:
        """Run the prompts (left-padded) and sample each row's first token."""
        import torch

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids):] = 1
            generator = torch.Generator().manual_seed(seq.seed if seq.seed is not None else random.getrandbits(63))
            seq.uniforms = torch.rand(seq.max_tokens, generator=generator, dtype=torch.float64).tolist()
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **self._last_only)
            tokens = self._checked_sample(out.logits[:, -1, :], seqs)
        return _Batch(seqs, _cache_of(out), mask, positions[:, -1:], tokens)

    def step(self, batch: _Batch, keep: list[int]) -> None:
        """Drop finished rows, feed each kept row its last token, sample the next ones."""
        import torch

        with torch.inference_mode():
            self._select(batch, keep)
            tokens = torch.tensor(batch.next_tokens, dtype=torch.long, device=self.device)
            batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((len(tokens), 1))], 1)
            batch.positions = batch.positions + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=batch.attention_mask,
                             position_ids=batch.positions, use_cache=True, **{self._cache_arg: batch.cache})
            batch.cache = _cache_of(out)
            batch.next_tokens = self._checked_sample(out.logits[:, -1, :], batch.seqs)

    def join(self, batch: Optional[_Batch], keep: list[int], other: _Batch, other_keep: list[int]) -> Optional[_Batch]:
        """One batch of the kept rows of ``batch`` (may be None) and of ``other``; None if no row is kept.

        Both are left-padded to the wider one, so every row's last token stays in the last column;
        the KV caches are joined by :func:`octoray.serving.kv_cache.join`.
        """
        import torch

        from octoray.serving import kv_cache

        self._select(other, other_keep)
        if batch is not None:
            self._select(batch, keep)
        if batch is None or not batch.seqs:
            return other if other.seqs else None
        if not other.seqs:
            return batch
        width = max(batch.attention_mask.shape[1], other.attention_mask.shape[1])
        masks = [torch.nn.functional.pad(b.attention_mask, (width - b.attention_mask.shape[1], 0)) for b in (batch, other)]
        with torch.inference_mode():
            cache = kv_cache.join(batch.cache, other.cache)
        return _Batch(batch.seqs + other.seqs, cache, torch.cat(masks), torch.cat([batch.positions, other.positions]),
                      batch.next_tokens + other.next_tokens)

    def joinable(self, batch: _Batch) -> bool:
        """Whether other batches can join ``batch`` (its cache type is one kv_cache handles)."""
        from octoray.serving import kv_cache

        return kv_cache.joinable(batch.cache)

    def _select(self, batch: _Batch, keep: list[int]) -> None:
        """Keep only rows ``keep`` of ``batch``, and drop leading columns no kept row uses."""
        import torch

        from octoray.serving import kv_cache

        if len(keep) == len(batch.seqs) or not hasattr(batch.cache, "batch_select_indices"):
            return  # without a cache that can shrink, finished rows ride along; advance() skips them
        with torch.inference_mode():
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            batch.cache.batch_select_indices(index)
            batch.attention_mask = batch.attention_mask[index]
            batch.positions = batch.positions[index]
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.next_tokens = [batch.next_tokens[i] for i in keep]
            if keep and kv_cache.joinable(batch.cache):
                unused = int(batch.attention_mask.any(0).int().argmax())  # first column some row uses
                if unused:
                    kv_cache.trim_left(batch.cache, unused)
                    batch.attention_mask = batch.attention_mask[:, unused:]

    def _checked_sample(self, logits: Any, seqs: list[Sequence]) -> list[int]:
        """:meth:`_sample`, with -1 for rows whose logits are not finite (a broken model or row)."""
        import torch

        finite = torch.isfinite(logits).all(-1)
        if not bool(finite.all()):  # (a copy of the logits only when some row needs it)
            logits = torch.where(finite[:, None], logits, torch.zeros_like(logits))
        tokens = self._sample(logits, seqs)
        return [t if ok else -1 for t, ok in zip(tokens, finite.tolist())]

    def _sample(self, logits: Any, seqs: list[Sequence]) -> list[int]:
        """Greedy where temperature is 0, else temperature + top-k/min-p/nucleus sampling, row by
        row settings; penalties and EOS masks first (they change greedy rows too).

        Sampling is by inverse CDF with one uniform per row drawn from that row's own generator
        (pre-drawn at prefill), so a seeded row gets the same tokens in any batch, and a step
        costs one vectorised search instead of a ``multinomial`` call per row.
        """
        import torch

        raw = logits
        logits = adjust_logits(logits, seqs, self.eos_ids)
        chosen = logits.argmax(-1)
        sampled = [i for i, s in enumerate(seqs) if s.temperature > 0 and not s.done]
        if sampled:
            device = logits.device
            index = torch.tensor(sampled, device=device)
            temps = torch.tensor([seqs[i].temperature for i in sampled], device=device)[:, None]
            probs = truncate(torch.softmax(logits[index].float() / temps, dim=-1), [seqs[i] for i in sampled])
            top_p = torch.tensor([seqs[i].top_p for i in sampled], device=device)[:, None]
            if bool((top_p < 1).any()):
                probs = nucleus(probs, top_p[:, 0])
            cdf = probs.cumsum(-1)
            draws = torch.tensor([seqs[i].uniforms[seqs[i].generated] for i in sampled], device=device)
            # first token whose cumulative mass exceeds the draw: never one of zero probability
            target = (draws[:, None] * cdf[:, -1:]).clamp(min=torch.finfo(cdf.dtype).tiny)
            picked = torch.searchsorted(cdf, target).clamp(max=cdf.shape[-1] - 1)
            chosen[index] = picked[:, 0]
        record_logprobs(raw, chosen, seqs)
        return chosen.tolist()


def adjust_logits(logits: Any, seqs: list[Sequence], eos_ids: frozenset[int]) -> Any:
    """``logits`` (B, V) with each row's penalties applied and EOS masked where ``ignore_eos`` or
    ``min_tokens`` forbid it; ``logits`` itself when no row asks for either (the common case)."""
    import torch

    rows = [i for i, s in enumerate(seqs) if not s.done and (
        s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty or s.ignore_eos
        or s.generated < s.min_tokens)]
    if not rows:
        return logits
    logits = logits.float().clone()
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=logits.device)
    for i in rows:
        seq, row = seqs[i], logits[i]
        if seq.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.token_ids)), dtype=torch.long, device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / seq.repetition_penalty, values * seq.repetition_penalty)
        if (seq.presence_penalty or seq.frequency_penalty) and seq.token_ids:
            counts = torch.bincount(torch.tensor(seq.token_ids, device=row.device), minlength=row.shape[-1]).to(row.dtype)
            row -= seq.frequency_penalty * counts + seq.presence_penalty * (counts > 0).to(row.dtype)
        if (seq.ignore_eos or seq.generated < seq.min_tokens) and len(eos):
            row[eos] = float("-inf")
    return logits


def nucleus(probs: Any, top_p: Any, candidates: int = 64) -> Any:
    """``probs`` (B, V) with each row's tokens outside its top-p nucleus set to 0 (``top_p`` (B,);
    a row with ``top_p >= 1`` keeps every token).

    In descending order a token is dropped once the mass before it reaches ``top_p`` (the first
    always stays), so the nucleus is every token at least as likely as its least likely member: a
    threshold, found from probabilities in descending order without their token ids. They come
    from a partial top-k of ``candidates`` -- 30x cheaper than sorting a 49k vocabulary on a CPU --
    and, for rows whose nucleus is wider (flat ones), from a values-only sort (numpy's on a CPU,
    6x faster than torch's sort with indices). The mask is the full sort's, except that tokens tied
    with the least likely member all stay, whatever order a sort would have put them in.
    """
    import torch

    k = min(candidates, probs.shape[-1])
    threshold = torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)  # top_p >= 1: all stay
    # k tokens of at most the largest probability each cannot reach top_p: such a (flat) row goes
    # straight to the full sort, without a top-k that could not settle it
    may_fit = (top_p < 1) & (probs.amax(-1) * k >= top_p)
    wider = (top_p < 1) & ~may_fit
    if bool(may_fit.any()):
        rows = may_fit.nonzero()[:, 0]
        values = probs[rows].topk(k, dim=-1).values
        threshold[rows] = _least_kept(values, top_p[rows])
        # every token past the candidates has at least their whole mass before it: dropped if that
        # reaches top_p; a row where it does not needs the full sort after all
        wider[rows[values.sum(-1) < top_p[rows]]] = True
    if bool(wider.any()):
        rows = wider.nonzero()[:, 0]
        threshold[rows] = _least_kept(_descending(probs[rows]), top_p[rows])
    return probs.masked_fill(probs < threshold[:, None], 0.0)


def _least_kept(ordered: Any, top_p: Any) -> Any:
    """Per row of ``ordered`` (probabilities, descending): the last one whose preceding mass is below ``top_p``."""
    kept = ((ordered.cumsum(-1) - ordered) < top_p[:, None]).sum(-1)  # >= 1: nothing precedes the first
    return ordered.gather(-1, (kept - 1)[:, None])[:, 0]


def _descending(probs: Any) -> Any:
    """Each row's values sorted in descending order (no indices)."""
    import numpy as np
    import torch

    if probs.device.type != "cpu":
        return probs.sort(dim=-1, descending=True).values
    return torch.from_numpy(np.ascontiguousarray(np.sort(probs.numpy(), axis=-1)[:, ::-1]))


def truncate(probs: Any, seqs: list[Sequence]) -> Any:
    """``probs`` (one row per sequence) with ``top_k`` and ``min_p`` applied and renormalised
    (before ``top_p``, as vLLM); ``probs`` itself when no row uses either."""
    import torch

    if not any(s.top_k > 0 or s.min_p > 0 for s in seqs):
        return probs
    vocab = probs.shape[-1]
    k = torch.tensor([min(s.top_k, vocab) if s.top_k > 0 else vocab for s in seqs], device=probs.device)
    kth = probs.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    min_p = torch.tensor([s.min_p for s in seqs], device=probs.device, dtype=probs.dtype)[:, None]
    floor = torch.maximum(kth, min_p * probs.max(dim=-1, keepdim=True).values)
    probs = probs.masked_fill(probs < floor, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def record_logprobs(logits: Any, chosen: Any, seqs: list[Sequence]) -> None:
    """Append, for each live row that asked for them, the chosen token's log-probability under the
    model (the raw logits: before temperature, truncation and penalties, as vLLM reports them)
    and its ``logprobs`` best alternatives."""
    import torch

    rows = [i for i, s in enumerate(seqs) if s.logprobs is not None and not s.done]
    if not rows:
        return
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits[index].float(), dim=-1)
    picked = logp.gather(-1, chosen[index][:, None])[:, 0].tolist()
    most = max(seqs[i].logprobs for i in rows)
    top_v, top_i = logp.topk(most, dim=-1) if most else (logp[:, :0], logp[:, :0].long())
    for j, i in enumerate(rows):
        k = seqs[i].logprobs
        seqs[i].sampled_logprobs.append((picked[j], list(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist()))))


def prompt_logprobs(model: Any, prompt_ids: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each prompt token's log-probability given the tokens before it, and the ``top`` best
    alternatives there (one forward pass; the first token has no context and is left out):
    what ``echo`` with ``logprobs`` reports, e.g. to score a prompt with ``max_tokens: 0``."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids], device=device)).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(prompt_ids[1:], device=device)
        picked = logp.gather(-1, target[:, None])[:, 0].tolist()
        top_v, top_i = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
        return [(picked[j], list(zip(top_i[j].tolist(), top_v[j].tolist()))) for j in range(len(picked))]


def _plain_backend(tokenizer: Any) -> Any:
    """The ``tokenizers`` object a fast tokenizer's ``decode`` ends in, when that call adds nothing
    to it (no subclass ``_decode``, no clean-up of spaces); else None."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    if (isinstance(tokenizer, PreTrainedTokenizerFast) and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
            and not tokenizer.clean_up_tokenization_spaces):
        return tokenizer.backend_tokenizer
    return None


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
