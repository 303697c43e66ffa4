"""Continuous batching: concurrent requests to one language model share its forward passes.

    batched = BatchingLMBackend(TorchLMBackend(model), max_batch=32)   # or RunnerLMBackend (ONNX Runtime)
    for token in batched.generate(prompt_ids, sampling, should_stop):  # in each request's worker thread
        ...

One scheduler thread per model runs the batch; each request's thread only waits for its tokens,
so everything above the backend (`decoding.complete`: detokenizing, stop sequences, the reasoning
split, timeouts, streaming) is the same as for one request alone. At every token boundary the
scheduler

1. drops the rows whose client stopped listening (EOS or a stop sequence seen above, a closed
   connection, the generation timeout: `should_stop`), freeing their places at once;
2. lets waiting requests join (as vLLM does): each new prompt is prefilled alone, batch 1 and
   unpadded, up to `PREFILL_TOKENS_PER_STEP` prompt tokens per step so running streams keep flowing,
   and its KV cache joins the batch's;
3. decodes one token for every row in one forward pass.

The batch's KV cache is left-padded to its longest row, with an attention mask that zeroes the padding
and each row's own position ids, so a row decodes the same tokens as it would alone (greedy, exact;
tests/appliance/serve/test_batching.py). A backend whose attention takes each row's length from the mask
(onnxruntime-genai exports: GroupQueryAttention, `cache_padding = "right"`) gets its rows right-padded instead: a
row's tokens first, zeros after, its new token written at its own length (test_genai_batching.py).
Rows that join in one step are merged with one copy of the cache, a row that leaves is replaced by the last row,
and columns no row needs any more are dropped once they are an eighth of the width (`_Batch`;
tests/appliance/serve/test_batch_cache.py). A backend that keeps the batch's cache itself (`kv_slots()`:
onnxruntime-genai exports on the CPU, written in place by the graph) gets a `_SlotBatch` instead: row i is the
cache's slot i, a joining prompt is prefilled straight into the next free slot and a leaving row's slot is taken
by the last row (one row's cached columns copied); nothing else is copied between steps.
Each request keeps its own sampling parameters and seeded generator (`pick_token` per row).

A failure stays with its request: a prefill or a sampling error fails that request only; a batched
forward pass that raises is retried row by row, so only the rows that fail alone fail. The thread
exits when no request is left (a hot-swapped model's weights are freed after its last request).
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from appliance.serve.backends import Sampling, make_generator, pick_token, pick_tokens

PREFILL_TOKENS_PER_STEP = 2048
"""Prompt tokens prefilled between two decode steps (at least one prompt): a burst of long prompts delays the
running streams by about one such prefill, not by all of them."""

_END = object()


BATCHED_KINDS = ("pytorch", "ort-cpu", "ort-cuda", "genai-cpu")
"""Backends batched here. A TensorRT engine's profiles hold a few rows at most (`causal_lm_profiles`) and are not
checked against `max_batch`: TensorRT serves one request per worker thread. onnxruntime-genai on CUDA decodes one
request per worker thread through og.Generator (its own continuous batching, og.Engine, needs a PagedAttention export,
which the optimize stage does not build yet)."""


def batchable(backend: Any) -> bool:
    return callable(getattr(backend, "forward_batch", None)) and getattr(backend, "kind", None) in BATCHED_KINDS


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    sampling: Sampling
    should_stop: Callable[[], bool]
    generator: Any
    tokens: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    """Token ids, then _END or the exception that ended the request."""
    produced: int = 0
    left: threading.Event = field(default_factory=threading.Event)
    """The consumer stopped iterating (EOS or a stop sequence found above, or its thread gave up)."""

    def finish(self, outcome: Any = _END) -> None:
        self.tokens.put(outcome)

    def done(self) -> bool:
        """True when the request needs no more tokens (it is then finished here)."""
        if self.left.is_set():
            self.finish()
            return True
        try:
            stop = self.should_stop()
        except Exception as exc:  # the caller's own check failed: that request ends with its error, nothing else
            self.finish(exc)
            return True
        if stop:
            self.finish()
        return stop


@dataclass(eq=False)
class _Row:
    request: _Request
    length: int
    """Tokens in this row's KV cache (its next position)."""
    token: int
    """The token this row feeds at the next step."""


class _Batch:
    """Rows decoded together: their KV caches left-padded to one length, and the mask that hides the padding.

    What a step costs besides the forward pass is kept to what changed (measured, ONNX Runtime CPU, 32 rows: the
    full-cache copies of joining and leaving rows, through torch's OpenMP threads on a loaded machine, cost more
    than the forward pass itself):

    - rows that join in one step are merged into the cache with ONE copy (`add` takes all of them);
    - a row that leaves is replaced by the last row (`keep`): only the moved rows are copied, in place;
    - columns no row needs any more are dropped only once they are `TRIM_FRACTION` of the width (one copy then),
      not at every step (a few masked columns cost the attention less than copying the cache);
    - CPU caches are copied with numpy (a single-threaded memcpy), not torch.cat (OpenMP threads that spin
      against the forward pass and the request threads on a few cores)."""

    TRIM_FRACTION = 8
    """Unused columns are dropped once they are at least 1/TRIM_FRACTION of the width (and at least 8)."""

    def __init__(self, right: bool = False) -> None:
        self.right = right
        """Right-padded rows (a row's tokens first; the padding, and the columns trimmed, at the end)."""
        self.rows: list[_Row] = []
        self.past: list[Any] = []
        self.mask: Any = None
        """[rows, columns] int64: 1 where a row has a cached token."""

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, groups: list[tuple[list[_Row], list[Any], Any]]) -> None:
        """Append groups of rows with their caches (same layout, any lengths) in one copy: every cache is
        padded to the widest (on the left, or on the right for a right-padded batch)."""
        if self.rows:
            groups = [(self.rows, self.past, self.mask), *groups]
        if len(groups) == 1:
            self.rows, self.past, self.mask = list(groups[0][0]), list(groups[0][1]), groups[0][2]
            return
        width = max(int(mask.shape[1]) for _, _, mask in groups)
        self.past = [_stack_padded([past[i] for _, past, _ in groups], width, dim=2, right=self.right)
                     for i in range(len(groups[0][1]))]
        self.mask = _stack_padded([mask for _, _, mask in groups], width, dim=1, right=self.right)
        self.rows = [row for rows, _, _ in groups for row in rows]

    def keep(self, indices: list[int]) -> None:
        """Only these rows stay (their order may change: a leaving row's place is taken by a row from the end)."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.rows, self.past, self.mask = [], [], None
            return
        count = len(indices)
        staying = set(indices)
        holes = [i for i in range(count) if i not in staying]
        movers = [i for i in range(count, len(self.rows)) if i in staying]
        if holes:
            self.past = [_move_rows(t, movers, holes) for t in self.past]
            self.mask = _move_rows(self.mask, movers, holes)
            for hole, mover in zip(holes, movers, strict=True):
                self.rows[hole] = self.rows[mover]
        self.rows = self.rows[:count]
        self.past = [t[:count] for t in self.past]
        self.mask = self.mask[:count]
        self._trim()

    def _trim(self) -> None:
        used = self.mask.any(0)
        width = int(self.mask.shape[1])
        if self.right:
            end = int(used.nonzero()[-1]) + 1 if bool(used.any()) else width
            if width - end >= max(8, width // self.TRIM_FRACTION):
                self.mask = _contiguous(self.mask[:, :end])
                self.past = [_contiguous(t[:, :, :end]) for t in self.past]
            return
        start = int(used.nonzero()[0]) if bool(used.any()) else 0
        if start >= max(8, width // self.TRIM_FRACTION):
            self.mask = _contiguous(self.mask[:, start:])
            self.past = [_contiguous(t[:, :, start:]) for t in self.past]

    def split(self) -> list[_Batch]:
        """One batch per row, each with its own copy of its cache (to find which row a failed forward pass
        failed for)."""
        alone = []
        for i, row in enumerate(self.rows):
            single = _Batch(self.right)
            single.rows = [row]
            single.past = [t[i:i + 1].clone() for t in self.past]
            single.mask = self.mask[i:i + 1].clone()
            single._trim()
            alone.append(single)
        return alone


class _SlotBatch:
    """Rows whose KV cache the backend keeps in place between steps (`kv_slots()`: genai_backend.KVSlots, its
    buffers bound as both past and present): row i of the batch is the cache's slot i. A row joins by prefilling
    into the next free slot; a row that leaves is replaced by the last row (that row's cached columns are copied,
    nothing else moves); nothing is padded, stacked or trimmed here."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.rows: list[_Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, indices: list[int]) -> None:
        """Only these rows stay (a leaving row's slot is taken by a row from the end)."""
        if len(indices) == len(self.rows):
            return
        count = len(indices)
        staying = set(indices)
        holes = [i for i in range(count) if i not in staying]
        movers = [i for i in range(count, len(self.rows)) if i in staying]
        for hole, mover in zip(holes, movers, strict=True):
            self.cache.move(mover, hole)
            self.rows[hole] = self.rows[mover]
        for slot in range(count, len(self.rows)):
            self.cache.release(slot)
        self.rows = self.rows[:count]


def _numpy_ok(tensor: Any) -> bool:
    """A CPU tensor of a dtype numpy has (not bfloat16): its copies go through numpy."""
    import torch

    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float16, torch.float64, torch.int64)


def _contiguous(tensor: Any) -> Any:
    """A contiguous copy; a CPU tensor through numpy (torch's copy of a large tensor runs on its OpenMP threads)."""
    if not _numpy_ok(tensor):
        return tensor.contiguous()
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(tensor.numpy()))


def _move_rows(tensor: Any, sources: list[int], targets: list[int]) -> Any:
    """tensor[targets] = tensor[sources], in place (a row per source)."""
    if _numpy_ok(tensor):
        array = tensor.numpy()
        array[targets] = array[sources]
        return tensor
    import torch

    tensor[torch.tensor(targets, device=tensor.device)] = tensor[torch.tensor(sources, device=tensor.device)]
    return tensor


def _stack_padded(tensors: list[Any], width: int, dim: int, right: bool = False) -> Any:
    """The tensors stacked along dim 0, each padded with zeros to `width` along `dim`, on the left (or the right)
    (one copy)."""
    import torch

    first = tensors[0]
    shape = list(first.shape)
    shape[0], shape[dim] = sum(int(t.shape[0]) for t in tensors), width
    on_numpy = _numpy_ok(first)
    if on_numpy:
        import numpy as np

        target = np.zeros(shape, dtype=first.numpy().dtype)
        out = torch.from_numpy(target)
    else:
        out = target = torch.zeros(shape, dtype=first.dtype, device=first.device)
    row = 0
    for tensor in tensors:
        rows, length = int(tensor.shape[0]), int(tensor.shape[dim])
        index: list[Any] = [slice(row, row + rows)] + [slice(None)] * (out.dim() - 1)
        index[dim] = slice(0, length) if right else slice(width - length, width)
        target[tuple(index)] = tensor.numpy() if on_numpy else tensor
        row += rows
    return out


class BatchingLMBackend:
    """An LM backend whose concurrent requests share forward passes (see the module docstring).

    `inner` runs batched forward passes: `forward_batch(input_ids, attention_mask, position_ids, past)
    -> (last-position logits [batch, vocab] float32 on the CPU, present)` with torch tensors, `past=None` for a
    prefill (`TorchLMBackend`, `RunnerLMBackend`)."""

    def __init__(self, inner: Any, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.inner = inner
        self.kind = str(inner.kind)
        self.max_batch = max_batch
        self.right = getattr(inner, "cache_padding", "left") == "right"
        """The inner backend takes right-padded caches (`_Batch.right`)."""
        self.slotted = callable(getattr(inner, "kv_slots", None))
        """The inner backend keeps the batch's KV cache itself, in place (`kv_slots()`, `_SlotBatch`): onnxruntime-genai
        exports on the CPU. Otherwise the caches are ours (`_Batch`) and go through `forward_batch`."""
        self.sampler = getattr(inner, "sampler", None)
        """The backend's own sampler for the batch (`generator(seed)`, `pick(logits, samplings, generators)`,
        genai_backend.BatchSampler), else `pick_token` per row with torch generators."""
        self._pending: collections.deque[_Request] = collections.deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.rows = 0
        """Rows in the running batch (read by /metrics)."""
        self.steps = 0
        """Batched decode steps run, and the rows they decoded (mean batch size = rows_decoded / steps)."""
        self.rows_decoded = 0

    def __getattr__(self, name: str) -> Any:
        # What the wrapped backend offers beyond generate (a runner, a layout) stays reachable.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def generate(self, prompt_ids: list[int], sampling: Sampling, should_stop: Callable[[], bool]
                 ) -> Iterator[int]:
        generator = self.sampler.generator(sampling.seed) if self.sampler else make_generator(sampling.seed)
        request = _Request(list(prompt_ids), sampling, should_stop, generator)
        with self._lock:
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"airlock-batch-{self.kind}", daemon=True)
                self._thread.start()
        try:
            while True:
                item = request.tokens.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.left.set()  # the scheduler frees the row at the next token boundary

    # -- the scheduler thread ---------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        batch: Any = None
        try:
            # The slotted cache lives as long as this thread: an idle model holds no batch cache.
            batch = _SlotBatch(self.inner.kv_slots()) if self.slotted else _Batch(self.right)
            with torch.inference_mode():
                while True:
                    with self._lock:
                        if not batch.rows and not self._pending:
                            self._thread = None
                            self.rows = 0
                            return
                    batch.keep([i for i, row in enumerate(batch.rows) if not row.request.done()])
                    self._admit(batch)
                    self.rows = len(batch)
                    if batch.rows:
                        self._step(batch)
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            with self._lock:
                stranded = [row.request for row in (batch.rows if batch else [])] + list(self._pending)
                self._pending.clear()
                self._thread = None
            for request in stranded:
                request.finish(exc)
            raise

    def _admit(self, batch: _Batch) -> None:
        """Prefill waiting requests into the batch, within the batch size and the per-step prefill budget."""
        import torch

        budget = PREFILL_TOKENS_PER_STEP
        joining: list[tuple[list[_Row], list[Any], Any]] = []
        try:
            while len(batch) + len(joining) < self.max_batch and budget > 0:
                with self._lock:
                    if not self._pending:
                        return
                    request = self._pending.popleft()
                if request.done():
                    continue
                ids = request.prompt_ids
                budget -= len(ids)
                if isinstance(batch, _SlotBatch):
                    slot = len(batch) + len(joining)
                    try:  # straight into its slot of the batch's cache
                        token = self._emit(request, torch.from_numpy(batch.cache.prefill(slot, ids))[0])
                    except Exception as exc:  # this prompt's failure is this request's alone
                        batch.cache.release(slot)
                        request.finish(exc)
                        continue
                    if token is None:
                        batch.cache.release(slot)
                        continue
                    joining.append(([_Row(request, len(ids), token)], [], None))
                    continue
                try:
                    logits, past = self.inner.forward_batch(
                        torch.tensor([ids], dtype=torch.int64), torch.ones(1, len(ids), dtype=torch.int64),
                        torch.arange(len(ids), dtype=torch.int64)[None], None)
                    token = self._emit(request, logits[0])
                except Exception as exc:  # this prompt's failure is this request's alone
                    request.finish(exc)
                    continue
                if token is None:
                    continue
                mask = torch.ones(1, len(ids), dtype=torch.int64, device=past[0].device)
                joining.append(([_Row(request, len(ids), token)], past, mask))
        finally:
            if joining and isinstance(batch, _SlotBatch):  # already in their slots
                batch.rows.extend(row for rows, _, _ in joining for row in rows)
            elif joining:  # one copy of the cache for every row that joins in this step
                batch.add(joining)

    def _emit(self, request: _Request, logits: Any) -> int | None:
        """Sample and hand over one token; None when the request is complete (or its sampling failed)."""
        if self.sampler is None:
            return self._hand_over(request, pick_token(logits, request.sampling, request.generator))
        token = self.sampler.pick(logits[None], [request.sampling], [request.generator])[0]
        if isinstance(token, Exception):
            raise token
        return self._hand_over(request, token)

    @staticmethod
    def _hand_over(request: _Request, token: int) -> int | None:
        """Give the request its token; None when that was its last."""
        request.tokens.put(token)
        request.produced += 1
        if request.produced >= request.sampling.max_new_tokens:
            request.finish()
            return None
        return token

    def _step(self, batch: Any) -> None:
        if isinstance(batch, _SlotBatch):
            self._slot_step(batch)
            return
        try:
            logits, present = self._forward(batch)
        except Exception as exc:
            if len(batch) == 1:
                batch.rows[0].request.finish(exc)
                batch.keep([])
                return
            # Retry row by row: the rows that fail alone fail, the others carry on in one batch again.
            survivors = _Batch(self.right)
            for single in batch.split():
                try:
                    logits, present = self._forward(single)
                except Exception as exc:
                    single.rows[0].request.finish(exc)
                    continue
                if self._advance(single, logits, present):
                    survivors.add([(single.rows, single.past, single.mask)])
            batch.rows, batch.past, batch.mask = survivors.rows, survivors.past, survivors.mask
            return
        self._advance(batch, logits, present)

    def _forward(self, batch: _Batch) -> tuple[Any, list[Any]]:
        import torch

        device = batch.mask.device
        tokens = torch.tensor([[row.token] for row in batch.rows], dtype=torch.int64, device=device)
        positions = torch.tensor([[row.length] for row in batch.rows], dtype=torch.int64, device=device)
        logits, present = self.inner.forward_batch(tokens, _with_new_column(batch.mask, batch.right), positions,
                                                   batch.past)
        self.steps += 1
        self.rows_decoded += len(batch)
        return logits, present

    def _slot_step(self, batch: _SlotBatch) -> None:
        """One token for every row of a slotted batch; a step that raises is retried row by row (in their slots)."""
        import numpy as np
        import torch

        rows = batch.rows
        try:
            logits = batch.cache.decode([row.token for row in rows])
            decoded = list(range(len(rows)))
        except Exception as exc:
            if len(rows) == 1:
                rows[0].request.finish(exc)
                batch.keep([])
                return
            parts, decoded = [], []
            for i, row in enumerate(rows):
                try:
                    parts.append(batch.cache.decode([row.token], start=i))
                except Exception as alone:
                    row.request.finish(alone)
                    continue
                decoded.append(i)
            if not decoded:
                batch.keep([])
                return
            logits = np.concatenate(parts)
        self.steps += 1
        self.rows_decoded += len(decoded)
        going = self._take([rows[i] for i in decoded], torch.from_numpy(logits))
        batch.keep([decoded[i] for i in going])

    def _advance(self, batch: _Batch, logits: Any, present: list[Any]) -> bool:
        """Take one decoded token per row; rows that are complete leave. True when rows remain."""
        batch.mask = _with_new_column(batch.mask, batch.right)
        batch.past = list(present)
        batch.keep(self._take(batch.rows, logits))
        return bool(batch.rows)

    def _take(self, rows: list[_Row], logits: Any) -> list[int]:
        """Sample and hand over a token per row (`logits` [rows, vocab]); the indices of the rows that go on."""
        keep = []
        picked = (self.sampler.pick if self.sampler else pick_tokens)(
            logits, [row.request.sampling for row in rows], [row.request.generator for row in rows])
        for i, row in enumerate(rows):
            choice = picked[i]
            if isinstance(choice, Exception):
                row.request.finish(choice)
                continue
            token = self._hand_over(row.request, choice)
            if token is not None:
                row.length += 1
                row.token = token
                keep.append(i)
        return keep


def _with_new_column(mask: Any, right: bool = False) -> Any:
    """The mask one column wider, with each row's next token: in the new last column, or for right-padded rows
    (ones first) at the row's own length."""
    import torch

    if right:
        import numpy as np

        array = mask.cpu().numpy()
        wider = np.zeros((array.shape[0], array.shape[1] + 1), dtype=array.dtype)
        wider[:, :-1] = array
        wider[np.arange(array.shape[0]), array.sum(1)] = 1
        return torch.from_numpy(wider).to(mask.device)
    if mask.device.type == "cpu":
        import numpy as np

        array = mask.numpy()
        return torch.from_numpy(np.concatenate([array, np.ones((array.shape[0], 1), dtype=array.dtype)], axis=1))
    return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
