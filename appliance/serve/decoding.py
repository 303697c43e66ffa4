"""From a request's prompt to text: chat template, token limits, detokenizing, stop sequences.

    prompt_ids = encode_chat(tokenizer, messages, limit=4096)
    result = complete(backend, tokenizer, prompt_ids, sampling, stops=["\\n\\n"], eos_ids={1},
                      should_stop=lambda: cancelled, on_text=send_chunk)   # in a worker thread

`TextStream` turns tokens into text pieces as they come. It holds back a piece while it could be
the start of a stop sequence or an incomplete UTF-8 character, so a streamed response never shows
a stop sequence or half a character, and streamed pieces join to exactly the non-streamed text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.serve.backends import LMBackend, Sampling
from appliance.serve.errors import RequestRefused

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    """'stop' (EOS or a stop sequence) or 'length' (max_tokens reached)."""
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class GenerationTimeout(Exception):
    """The generation ran past the server's generation_timeout_s."""


def _check_length(ids: list[int], limit: int) -> list[int]:
    if len(ids) > limit:
        raise RequestRefused(400, "prompt_too_long",
                             f"the prompt is {len(ids)} tokens; this server takes at most {limit}")
    if not ids:
        raise RequestRefused(400, "empty_prompt", "the prompt is empty")
    return ids


def encode_prompt(tokenizer: Any, prompt: str, *, limit: int) -> list[int]:
    """A plain completion prompt, after the model's BOS token (as the model was trained)."""
    bos = tokenizer.bos_token or ""
    text = prompt if not bos or prompt.startswith(bos) else bos + prompt
    return _check_length(tokenizer(text, add_special_tokens=False)["input_ids"], limit)


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]], *, limit: int) -> list[int]:
    """Messages through the base model's chat template, ending with the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestRefused(400, "no_chat_template", "this model has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return _check_length(tokenizer(text, add_special_tokens=False)["input_ids"], limit)


class TextStream:
    """Token ids in, text pieces out; ends at a stop sequence."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that became final with this token ('' while held back)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # half of a multi-byte character: wait for the rest
        self.text = text
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self._take(cut)
        return self._take(len(text) - self._held_back(text))

    def finish(self) -> str:
        """Whatever was held back, at the end of the generation."""
        return self._take(len(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that starts some stop sequence."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece


def complete(backend: LMBackend, tokenizer: Any, prompt_ids: list[int], sampling: Sampling, *,
             stops: Sequence[str], eos_ids: frozenset[int], should_stop: Callable[[], bool],
             on_text: Callable[[str], None] | None = None, timeout_s: float | None = None) -> Completion:
    """Generate until EOS, a stop sequence or max_new_tokens (runs in a worker thread)."""
    started = time.monotonic()
    deadline = started + timeout_s if timeout_s else None
    timed_out = [False]

    def stop_now() -> bool:
        if deadline is not None and time.monotonic() > deadline:
            timed_out[0] = True
            return True
        return should_stop()

    stream = TextStream(tokenizer, stops)
    parts: list[str] = []
    count, finish_reason = 0, "length"
    tokens = backend.generate(prompt_ids, sampling, stop_now)
    try:
        for token in tokens:
            count += 1
            if token in eos_ids:
                finish_reason = "stop"
                break
            piece = stream.push(token)
            if piece:
                parts.append(piece)
                if on_text:
                    on_text(piece)
            if stream.stopped:
                finish_reason = "stop"
                break
    finally:
        close = getattr(tokens, "close", None)
        if close:
            close()
    if timed_out[0]:
        raise GenerationTimeout()
    tail = stream.finish()
    if tail:
        parts.append(tail)
        if on_text:
            on_text(tail)
    return Completion("".join(parts), finish_reason, len(prompt_ids), count, time.monotonic() - started)
