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
tests/appliance/serve/test_batching.py). Columns no row needs any more are trimmed when rows leave.
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

from appliance.serve.backends import Sampling, make_generator, pick_token

PREFILL_TOKENS_PER_STEP = 2048
"""Prompt tokens prefilled between two decode steps (at least one prompt): a burst of long prompts delays the
running streams by about one such prefill, not by all of them."""

_END = object()


BATCHED_KINDS = ("pytorch", "ort-cpu", "ort-cuda")
"""Backends batched here. A TensorRT engine's profiles hold a few rows at most (`causal_lm_profiles`) and are not
checked against `max_batch`: TensorRT serves one request per worker thread."""


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
    """Rows decoded together: their KV caches left-padded to one length, and the mask that hides the padding."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.past: list[Any] = []
        self.mask: Any = None
        """[rows, columns] int64: 1 where a row has a cached token."""

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[_Row], past: list[Any], mask: Any) -> None:
        """Append rows with their cache (same layout, any length): the shorter side is padded on the left."""
        import torch

        if not self.rows:
            self.rows, self.past, self.mask = list(rows), list(past), mask
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def pad(tensor: Any, to: int, dim: int) -> Any:
            missing = to - tensor.shape[dim]
            if not missing:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        self.past = [torch.cat([pad(a, width, 2), pad(b, width, 2)]) for a, b in zip(self.past, past, strict=True)]
        self.mask = torch.cat([pad(self.mask, width, 1), pad(mask, width, 1)])
        self.rows += rows

    def keep(self, indices: list[int]) -> None:
        """Only these rows stay; cache columns that no remaining row uses are dropped."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.rows, self.past, self.mask = [], [], None
            return
        import torch

        index = torch.tensor(indices, device=self.mask.device)
        self.rows = [self.rows[i] for i in indices]
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0]) if bool(mask.any()) else 0
        self.mask = mask[:, start:].contiguous()
        self.past = [t.index_select(0, index)[:, :, start:].contiguous() for t in self.past]

    def split(self) -> list[_Batch]:
        """One batch per row (to find which row a failed forward pass failed for)."""
        alone = []
        for i in range(len(self.rows)):
            single = _Batch()
            single.rows, single.past, single.mask = list(self.rows), list(self.past), self.mask
            single.keep([i])
            alone.append(single)
        return alone


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
        request = _Request(list(prompt_ids), sampling, should_stop, make_generator(sampling.seed))
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

        batch = _Batch()
        try:
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
                stranded = [row.request for row in batch.rows] + list(self._pending)
                self._pending.clear()
                self._thread = None
            for request in stranded:
                request.finish(exc)
            raise

    def _admit(self, batch: _Batch) -> None:
        """Prefill waiting requests into the batch, within the batch size and the per-step prefill budget."""
        import torch

        budget = PREFILL_TOKENS_PER_STEP
        while len(batch) < self.max_batch and budget > 0:
            with self._lock:
                if not self._pending:
                    return
                request = self._pending.popleft()
            if request.done():
                continue
            ids = request.prompt_ids
            budget -= len(ids)
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
            batch.add([_Row(request, len(ids), token)], past, mask)

    def _emit(self, request: _Request, logits: Any) -> int | None:
        """Sample and hand over one token; None when the request is complete (or its sampling failed)."""
        token = pick_token(logits, request.sampling, request.generator)
        request.tokens.put(token)
        request.produced += 1
        if request.produced >= request.sampling.max_new_tokens:
            request.finish()
            return None
        return token

    def _step(self, batch: _Batch) -> None:
        try:
            logits, present = self._forward(batch)
        except Exception as exc:
            if len(batch) == 1:
                batch.rows[0].request.finish(exc)
                batch.keep([])
                return
            # Retry row by row: the rows that fail alone fail, the others carry on in one batch again.
            survivors = _Batch()
            for single in batch.split():
                try:
                    logits, present = self._forward(single)
                except Exception as exc:
                    single.rows[0].request.finish(exc)
                    continue
                if self._advance(single, logits, present):
                    survivors.add(single.rows, single.past, single.mask)
            batch.rows, batch.past, batch.mask = survivors.rows, survivors.past, survivors.mask
            return
        self._advance(batch, logits, present)

    def _forward(self, batch: _Batch) -> tuple[Any, list[Any]]:
        import torch

        device = batch.mask.device
        tokens = torch.tensor([[row.token] for row in batch.rows], dtype=torch.int64, device=device)
        positions = torch.tensor([[row.length] for row in batch.rows], dtype=torch.int64, device=device)
        logits, present = self.inner.forward_batch(tokens, _with_new_column(batch.mask), positions, batch.past)
        self.steps += 1
        self.rows_decoded += len(batch)
        return logits, present

    def _advance(self, batch: _Batch, logits: Any, present: list[Any]) -> bool:
        """Take one decoded token per row; rows that are complete leave. True when rows remain."""
        batch.mask = _with_new_column(batch.mask)
        batch.past = list(present)
        keep = []
        for i, row in enumerate(batch.rows):
            try:
                token = self._emit(row.request, logits[i])
            except Exception as exc:
                row.request.finish(exc)
                continue
            if token is not None:
                row.length += 1
                row.token = token
                keep.append(i)
        batch.keep(keep)
        return bool(batch.rows)


def _with_new_column(mask: Any) -> Any:
    import torch

    return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
