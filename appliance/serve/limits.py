"""What one server accepts, and the admission control that keeps it answering under overload.

    limits = ServeLimits(workers=2, queue_depth=16)
    admission = Admission(limits)
    async with admission.slot(key_name):     # RequestRefused 429 (this key) / 503 (server) with Retry-After
        ...run the model in a worker thread...

Overload is answered, never queued without bound: each key may have `per_key_concurrency` requests
in the server; the server takes `workers` running plus `queue_depth` waiting, and a request that
waited `queue_timeout_s` for a worker is refused with 503. Bodies, prompts and outputs are capped.
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
    per_key_concurrency: int = 4
    """Requests one API key may have in the server at once; more get 429."""
    workers: int = 2
    """Requests running on the model at once (threads)."""
    queue_depth: int = 32
    """Requests waiting for a worker; beyond it the server answers 503."""
    queue_timeout_s: float = 30.0
    """Longest wait for a worker before 503."""
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


class Admission:
    """Per-key concurrency and a bounded wait for a worker. Lives on the server's event loop.

        ticket = admission.admit(key_name)   # 429 / 503 at once when the key or the server is full
        try:
            await ticket.start()             # waits for a worker; 503 after queue_timeout_s
            ...                              # run the model in a worker thread
        finally:
            ticket.release()                 # a streamed response releases when the stream ends
    """

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.per_key: dict[str, int] = {}
        self.workers = asyncio.Semaphore(limits.workers)
        self.admitted = 0
        """Requests in the server (running or waiting)."""
        self.running = 0

    def admit(self, key_name: str) -> Ticket:
        if self.per_key.get(key_name, 0) >= self.limits.per_key_concurrency:
            raise RequestRefused(429, "key_concurrency",
                                 f"API key {key_name!r} already has {self.limits.per_key_concurrency} requests "
                                 "in progress; wait for one to finish", retry_after_s=1)
        if self.admitted >= self.limits.workers + self.limits.queue_depth:
            raise RequestRefused(503, "overloaded", "the server is at capacity; retry shortly",
                                 retry_after_s=self.retry_after())
        self.per_key[key_name] = self.per_key.get(key_name, 0) + 1
        self.admitted += 1
        return Ticket(self, key_name)

    def retry_after(self) -> int:
        waiting = max(0, self.admitted - self.limits.workers)
        return max(1, min(60, 1 + waiting // self.limits.workers))


class Ticket:
    """One admitted request: its place in the key's count, and its worker once started."""

    def __init__(self, admission: Admission, key_name: str) -> None:
        self._admission = admission
        self._key_name = key_name
        self._has_worker = False
        self._released = False

    async def start(self) -> None:
        admission = self._admission
        try:
            await asyncio.wait_for(admission.workers.acquire(), admission.limits.queue_timeout_s)
        except TimeoutError:
            raise RequestRefused(503, "queue_timeout",
                                 f"no worker became free within {admission.limits.queue_timeout_s:g} s; retry later",
                                 retry_after_s=admission.retry_after()) from None
        self._has_worker = True
        admission.running += 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        admission = self._admission
        if self._has_worker:
            admission.running -= 1
            admission.workers.release()
        admission.admitted -= 1
        admission.per_key[self._key_name] -= 1
        if not admission.per_key[self._key_name]:
            del admission.per_key[self._key_name]
