"""Attention over a packed row without a mask: each example attends only to itself, causally.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=use_packed_attention())

A packed micro-batch is one row of concatenated examples whose `position_ids` restart at each
example (sft_data.py). Given that with `attn_implementation="sdpa"`, transformers builds a
block-diagonal 4D mask over the whole row (rows x rows booleans) and SDPA computes every score of
it, masked or not: a 4,096-token row of 8 examples costs 8x the attention of the same examples
padded, which made packing slower than padding (issue 18's profile: the masked SDPA and its
backward were most of a step on the tiny model).

This registers "airlock_packed_sdpa" with transformers' `AttentionInterface` (the documented way
to plug an attention function in): where no mask is given and queries and keys have the same
length (training, evaluation, a prefill without padding), it cuts the row at the position restarts
(the rule transformers' `find_packed_sequence_indices` uses) and runs transformers' own
`sdpa_attention_forward` with `is_causal=True` on each example, i.e. the varlen ("flattened")
attention that flash-attention's `cu_seqlens` and `DataCollatorWithFlattening` give on GPUs,
with no mask materialised and sum(length^2) work. Anything else (a padding mask, decoding with a
cache) goes to the unchanged SDPA path. Its mask function returns no mask exactly in the case
the attention function handles itself. Exact: the same scores as the masked computation, which
tests/appliance/train/test_packed_attention.py checks against the per-example loss.
"""

from __future__ import annotations

from typing import Any

NAME = "airlock_packed_sdpa"
_registered = False
_last_bounds: tuple[Any, list[list[tuple[int, int]]]] | None = None
"""Every layer of one forward (and its recomputation under checkpointing) gets the same
position_ids tensor: its example bounds are found once, not once per layer."""


def use_packed_attention() -> str:
    """Register the implementation with transformers (once) and return its name for `attn_implementation`."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(NAME, packed_sdpa_attention)
        AttentionMaskInterface.register(NAME, packed_sdpa_mask)
        _registered = True
    return NAME


def _square_without_mask(q_length: int, kv_length: int, q_offset: Any, kv_offset: Any, attention_mask: Any) -> bool:
    return attention_mask is None and q_length == kv_length and q_length > 1 and q_offset == 0 and kv_offset == 0


def packed_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                     attention_mask: Any = None, **kwargs: Any) -> Any:
    """No mask where `packed_sdpa_attention` splits the row itself; transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if _square_without_mask(q_length, kv_length, q_offset, kv_offset, attention_mask):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def example_bounds(position_ids: Any) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: a new one starts wherever the position does not
    go up by exactly one (transformers' packed-sequence rule)."""
    import torch

    rows = position_ids.shape[0]
    length = position_ids.shape[-1]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    out = []
    for row in range(rows):
        begin = starts[row].nonzero().flatten().tolist()
        out.append(list(zip(begin, [*begin[1:], length], strict=True)))
    return out


def packed_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """SDPA per packed example (causal, no mask); transformers' SDPA unchanged for everything else.

    query: (batch, heads, length, head_dim); key/value: (batch, kv_heads, length, head_dim).
    Returns (batch, length, heads, head_dim) like `sdpa_attention_forward`.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    if (position_ids is None or not _square_without_mask(query.shape[2], key.shape[2], 0, 0, attention_mask)
            or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    global _last_bounds
    if _last_bounds is None or _last_bounds[0] is not position_ids:
        _last_bounds = (position_ids, example_bounds(position_ids))
    rows = []
    for row, bounds in enumerate(_last_bounds[1]):
        # torch.split, not slicing: the backward of a split is one concatenation, while each slice's
        # backward would fill a zero tensor of the whole row (measured: 12% of a step).
        lengths = [b - a for a, b in bounds]
        pieces = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True,
                                         **kwargs)[0]
                  for q, k, v in zip(query[row:row + 1].split(lengths, dim=2), key[row:row + 1].split(lengths, dim=2),
                                     value[row:row + 1].split(lengths, dim=2), strict=True)]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None
