"""Joining and trimming left-padded KV caches, for continuous batching (torch only).

A running batch keeps every row's last token in the last column (left padding). A request that
joins it has its own prefill cache, usually of another length; :func:`join` left-pads the shorter
of the two caches with zeros (masked out by the attention mask, so no row sees them) and stacks
them on the batch dimension. :func:`trim_left` drops leading columns that no remaining row uses,
so a batch whose long rows have left stops paying for their width.

Works on transformers' ``DynamicCache`` (``cache.layers[i].keys/values``, transformers >= 4.56)
and on the older ``key_cache``/``value_cache`` lists. Other caches (sliding windows, static,
quantised) are reported as not joinable by :func:`joinable`; the scheduler then lets new
requests in only between batches, which is slower but still correct.
"""

from __future__ import annotations

from typing import Any


def joinable(cache: Any) -> bool:
    """Whether :func:`join` and :func:`trim_left` can handle ``cache``."""
    return _tensors(cache) is not None


def join(cache: Any, other: Any) -> Any:
    """``cache`` with the rows of ``other`` appended (both left-padded to the wider one); returns ``cache``."""
    import torch

    mine, theirs = _tensors(cache), _tensors(other)
    if mine is None or theirs is None or len(mine) != len(theirs):
        raise ValueError("these KV caches cannot be joined")
    for (get_a, set_a), (get_b, _) in zip(mine, theirs):
        a, b = get_a(), get_b()
        width = max(a.shape[-2], b.shape[-2])
        set_a(torch.cat([_pad_left(a, width), _pad_left(b, width)], dim=0))
    return cache


def trim_left(cache: Any, columns: int) -> None:
    """Drop the first ``columns`` positions of every row (positions no row attends to)."""
    if columns <= 0:
        return
    for get, put in _tensors(cache) or ():
        put(get()[..., columns:, :])


def _pad_left(t: Any, width: int) -> Any:
    import torch

    if t.shape[-2] == width:
        return t
    pad = t.new_zeros((*t.shape[:-2], width - t.shape[-2], t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


def _tensors(cache: Any) -> list[tuple[Any, Any]] | None:
    """(getter, setter) for every key and value tensor of ``cache``; None for a cache not handled here."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        from transformers.cache_utils import DynamicLayer

        # exactly DynamicLayer: its sliding-window subclasses keep extra state that padding would break
        if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
            return None
        return [pair for layer in layers for pair in (_attr(layer, "keys"), _attr(layer, "values"))]
    keys, values = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)
    if isinstance(keys, list) and isinstance(values, list) and keys:
        return [_item(lst, i) for lst in (keys, values) for i in range(len(lst))]
    return None


def _attr(obj: Any, name: str) -> tuple[Any, Any]:
    return (lambda: getattr(obj, name)), (lambda value: setattr(obj, name, value))


def _item(lst: list[Any], i: int) -> tuple[Any, Any]:
    return (lambda: lst[i]), (lambda value: lst.__setitem__(i, value))
