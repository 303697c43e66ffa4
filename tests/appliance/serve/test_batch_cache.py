"""The batch's KV-cache bookkeeping (appliance.serve.batching._Batch) and per-row sampling (pick_tokens), on plain
tensors: no model, milliseconds. Rows that join in one step, leave from the middle (their place taken by the last
row) or leave the longest row behind keep exactly their own cache, right-aligned under a mask of ones; the
model-level check (mixed-length prompts decode the same tokens batched as alone) is in test_batching.py."""

from __future__ import annotations

import math

from appliance.serve.backends import Sampling, make_generator, pick_token, pick_tokens
from appliance.serve.batching import _Batch, _Request, _Row

LAYERS, HEADS, DIM = 2, 2, 3


def _row(name: int, length: int) -> tuple[_Row, list, object]:
    """A row whose cache holds `length` columns, every value encoding (row, layer tensor, head, column, dim)."""
    import torch

    request = _Request([name], Sampling(max_new_tokens=1), lambda: False, make_generator(0))
    past = [torch.tensor([[[[name * 1e4 + t * 1e3 + h * 100 + c * 10 + d for d in range(DIM)]
                            for c in range(length)] for h in range(HEADS)]], dtype=torch.float32)
            for t in range(2 * LAYERS)]
    return _Row(request, length, name), past, torch.ones(1, length, dtype=torch.int64)


def _check(batch: _Batch, lengths: dict[int, int]) -> None:
    """Each row's cache is its own columns, right-aligned; the mask is 1 exactly there; padding is zero."""
    assert sorted(row.token for row in batch.rows) == sorted(lengths)
    width = batch.mask.shape[1]
    for i, row in enumerate(batch.rows):
        name, length = row.token, lengths[row.token]
        assert batch.mask[i].tolist() == [0] * (width - length) + [1] * length
        for t, tensor in enumerate(batch.past):
            assert tensor.shape == (len(batch.rows), HEADS, width, DIM) and tensor.is_contiguous()
            cached = tensor[i, :, width - length:]
            expected = _row(name, length)[1][t][0]
            assert bool((cached == expected).all()), (name, t)
            assert bool((tensor[i, :, :width - length] == 0).all())


def test_rows_join_leave_and_trim_keep_each_cache_exact():
    lengths = {1: 5, 2: 12, 3: 1, 4: 30, 5: 9}
    batch = _Batch()
    batch.add([([r], p, m) for r, p, m in (_row(n, lengths[n]) for n in (1, 2))])
    _check(batch, {n: lengths[n] for n in (1, 2)})
    # Three rows join in one step, one of them wider than the batch: everything is padded to 30 once.
    batch.add([([r], p, m) for r, p, m in (_row(n, lengths[n]) for n in (3, 4, 5))])
    assert batch.mask.shape[1] == 30
    _check(batch, lengths)
    # Rows 1 and 3 (positions 0 and 2) leave: the last rows move into their places, nothing else is copied.
    names = [row.token for row in batch.rows]
    batch.keep([i for i, n in enumerate(names) if n not in (1, 3)])
    assert [row.token for row in batch.rows] == [4, 2, 5]
    _check(batch, {n: lengths[n] for n in (2, 4, 5)})
    # The 30-column row leaves: 18 unused columns (>= 30 / TRIM_FRACTION and >= 8) are dropped.
    batch.keep([i for i, row in enumerate(batch.rows) if row.token != 4])
    assert batch.mask.shape[1] == 12
    _check(batch, {n: lengths[n] for n in (2, 5)})
    # A few unused columns stay (masked) rather than costing a copy: row 2 leaves, 3 of 12 columns unused.
    batch.keep([i for i, row in enumerate(batch.rows) if row.token == 5])
    assert batch.mask.shape[1] == 12
    _check(batch, {5: 9})
    singles = _Batch()
    singles.add([([r], p, m) for r, p, m in (_row(n, lengths[n]) for n in (2, 4))])
    alone = singles.split()  # each row with its own copy, trimmed to its own length
    assert [b.mask.shape[1] for b in alone] == [12, 30]
    _check(alone[0], {2: 12})
    _check(alone[1], {4: 30})
    batch.keep([])
    assert len(batch) == 0 and batch.mask is None


def test_pick_tokens_match_one_row_picks_and_a_bad_row_fails_alone():
    import torch

    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(3))
    logits[3] = math.nan  # NaN logits: sampling this row raises, the others are picked as usual
    samplings = [Sampling(4, temperature=0.0), Sampling(4, temperature=0.8, seed=11),
                 Sampling(4, temperature=0.9, top_p=0.5, seed=12), Sampling(4, temperature=1.0, seed=13),
                 Sampling(4, temperature=0.0)]
    picked = pick_tokens(logits, samplings, [make_generator(s.seed) for s in samplings])
    for i in (0, 1, 2, 4):
        assert picked[i] == pick_token(logits[i], samplings[i], make_generator(samplings[i].seed)), i
    assert isinstance(picked[3], Exception)
    assert picked[0] == int(torch.argmax(logits[0])) and picked[4] == int(torch.argmax(logits[4]))


def test_greedy_ties_take_the_first_maximum_as_torch_argmax():
    import torch

    logits = torch.zeros(2, 10)
    logits[:, 3] = logits[:, 7] = 1.0
    assert pick_tokens(logits, [Sampling(1, temperature=0.0)] * 2, [None, None]) == [3, 3]
    assert int(torch.argmax(logits[0])) == 3
