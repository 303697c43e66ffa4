"""What one server accepts, and the admission control that keeps it answering under overload.

    limits = ServeLimits(max_batch=32, queue_depth=64)
    admission = Admission(limits)
    ticket = admission.admit(key_name, "batch")   # RequestRefused 429 (this key) / 503 (server) with Retry-After

Overload is answered, never queued without bound. The running capacity is the batch: a batched language
model decodes `max_batch` requests together (appliance.serve.batching), other backends run `workers`
requests in threads. Beyond that, `queue_depth` requests wait (503 beyond it, or after `queue_timeout_s`
of waiting), and each API key may have `per_key_concurrency` requests in the server (429 beyond it). The
defaults serve one application of 32 users on one key: 32 rows decode, 32 more requests of the same key
may wait. Bodies, prompts and outputs are capped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields

from appliance.serve.errors import RequestRefused, ServeError

MIB = 1 << 20


@dataclass(frozen=True)
class ServeLimits:
    max_text_body_bytes: int = 1 * MIB
    """Largest JSON body of /v1/completions and /v1/chat/completions."""
    max_classify_body_bytes: int = 64 * MIB
    """Largest image or DICOM file sent to /v1/classify."""
    max_prompt_tokens: int = 4096
    """Longest prompt (after the chat template) in tokens; longer prompts get 400."""
    max_tokens: int = 32768
    """Most tokens one request may generate (`--max-tokens`); above it, or beyond the model's context after
    the prompt, gets 400. 32768 is DeepSeek's recommended generation length for R1 models."""
    default_max_tokens: int = 256
    """Tokens generated when a request does not say (within the model's context)."""
    default_reasoning_max_tokens: int = 4096
    """The same for a chat with an R1-family model: its reasoning comes before the answer."""
    max_stop_sequences: int = 4
    """Stop sequences per request (as in the OpenAI API)."""
    max_batch: int = 32
    """Requests one language model decodes together (continuous batching, `--max-batch`; 1: no batching, each
    request decodes alone in a worker thread)."""
    per_key_concurrency: int = 64
    """Requests one API key may have in the server at once (running or waiting); more get 429. Default: twice
    max_batch, so one application with max_batch users on one key gets every row and as many waiting places."""
    workers: int = 2
    """Requests running at once on backends that do not batch (classifiers, TensorRT, `--max-batch 1`), in threads."""
    queue_depth: int = 64
    """Requests waiting for a place (a batch row or a worker), over all models; beyond it the server answers 503.
    Default: twice max_batch."""
    queue_timeout_s: float = 30.0
    """Longest wait for a place before 503."""
    generation_timeout_s: float = 120.0
    """Longest generation; a longer one is stopped (504, or an error event when streaming)."""
    body_timeout_s: float = 30.0
    """Time allowed to receive a request body (slow senders get 408)."""
    max_connections: int = 256
    """Open connections; uvicorn answers 503 beyond it (a backstop under the admission control)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ServeError(f"serve limit {f.name} = {value!r} must be a positive number",
                                 hint="check the --workers/--queue-depth options")
        if self.default_max_tokens > self.max_tokens:
            raise ServeError(f"default_max_tokens {self.default_max_tokens} exceeds max_tokens {self.max_tokens}",
                             hint="lower the default or raise the limit (--max-tokens)")


def lm_rows_per_call(limits: ServeLimits, backend_kind: str) -> int:
    """Requests one forward call of a language model carries on this server: `max_batch` where the backend is
    batched (continuous batching, appliance.serve.batching.BATCHED_KINDS), else 1 (a request per worker thread).

    A TensorRT engine's profile must hold this many rows, besides the longest prompt and request
    (appliance.optimize.tensorrt_engine.check_lm_profile, at start-up)."""
    from appliance.serve.batching import BATCHED_KINDS

    return limits.max_batch if limits.max_batch > 1 and backend_kind in BATCHED_KINDS else 1


class _Pool:
    """Places of one kind: rows of the language models' running batches, or worker threads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = asyncio.Semaphore(capacity)
        self.claimed = 0
        """Requests admitted to this pool (running or waiting for a place)."""

    @property
    def waiting(self) -> int:
        return max(0, self.claimed - self.capacity)


class Admission:
    """Per-key concurrency and a bounded wait for a place. Lives on the server's event loop.

        ticket = admission.admit(key_name, "batch")  # 429 / 503 at once when the key or the queue is full
        try:
            await ticket.start()             # waits for a place; 503 after queue_timeout_s
            ...                              # run the model in a worker thread
        finally:
            ticket.release()                 # a streamed response releases when the stream ends

    Two kinds of place: "batch", a row in a language model's running batch (`max_batch`; requests to a
    batched LM), and "worker", a thread for a backend that does not batch (`workers`: classifiers,
    TensorRT). Requests beyond the places wait, `queue_depth` of them at most over both kinds.
    """

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.per_key: dict[str, int] = {}
        self.pools = {"batch": _Pool(limits.max_batch), "worker": _Pool(limits.workers)}
        self.admitted = 0
        """Requests in the server (running or waiting)."""
        self.running = 0

    @property
    def waiting(self) -> int:
        return sum(pool.waiting for pool in self.pools.values())

    def admit(self, key_name: str, place: str = "worker") -> Ticket:
        pool = self.pools[place]
        if self.per_key.get(key_name, 0) >= self.limits.per_key_concurrency:
            raise RequestRefused(429, "key_concurrency",
                                 f"API key {key_name!r} already has {self.limits.per_key_concurrency} requests "
                                 "in progress; wait for one to finish", retry_after_s=1)
        if pool.claimed >= pool.capacity and self.waiting >= self.limits.queue_depth:
            raise RequestRefused(503, "overloaded", "the server is at capacity; retry shortly",
                                 retry_after_s=self.retry_after(pool))
        self.per_key[key_name] = self.per_key.get(key_name, 0) + 1
        self.admitted += 1
        pool.claimed += 1
        return Ticket(self, key_name, pool)

    def retry_after(self, pool: _Pool) -> int:
        """Seconds until a place is likely: a second per full round of the waiting requests (1 to 60)."""
        return max(1, min(60, 1 + pool.waiting // pool.capacity))


class Ticket:
    """One admitted request: its place in the key's count, and its place (row or worker) once started."""

    def __init__(self, admission: Admission, key_name: str, pool: _Pool) -> None:
        self._admission = admission
        self._key_name = key_name
        self._pool = pool
        self._has_place = False
        self._released = False

    async def start(self) -> None:
        admission = self._admission
        try:
            await asyncio.wait_for(self._pool.free.acquire(), admission.limits.queue_timeout_s)
        except TimeoutError:
            raise RequestRefused(503, "queue_timeout",
                                 f"no place became free within {admission.limits.queue_timeout_s:g} s; retry later",
                                 retry_after_s=admission.retry_after(self._pool)) from None
        self._has_place = True
        admission.running += 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        admission = self._admission
        if self._has_place:
            admission.running -= 1
            self._pool.free.release()
        self._pool.claimed -= 1
        admission.admitted -= 1
        admission.per_key[self._key_name] -= 1
        if not admission.per_key[self._key_name]:
            del admission.per_key[self._key_name]
