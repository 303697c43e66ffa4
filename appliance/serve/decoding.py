"""From a request's prompt to text: chat template, token limits, detokenizing, stop sequences.

    prompt_ids = encode_chat(tokenizer, messages, limit=4096)
    result = complete(backend, tokenizer, prompt_ids, sampling, stops=["\\n\\n"], eos_ids={1},
                      should_stop=lambda: cancelled, on_text=send_chunk)   # in a worker thread
    result = complete(..., reasoning=True, on_reasoning=send_reasoning)  # an R1 chat: reasoning apart

R1-family models (DeepSeek-R1 and its distills) open a `<think>` block in the chat template's
generation prompt: everything the model writes up to `</think>` is its reasoning, the rest the
answer. With `reasoning=True`, `complete` returns them apart (`Completion.reasoning`, `.text`), as
DeepSeek's API does (`reasoning_content`, `content`); a generation that never closes the block
within max_tokens is all reasoning, with an empty answer.

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
    reasoning: str | None = None
    """The text up to `</think>` when the generation was split (`complete(..., reasoning=True)`); else None."""
    reasoning_tokens: int = 0
    """Generated tokens before the answer began (all of them when the thinking never closed)."""


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


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def opens_reasoning(tokenizer: Any) -> bool:
    """True when the chat template starts the assistant's turn inside a `<think>` block (R1 family)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that cannot render this is not one we can split for
        return False
    return isinstance(text, str) and text.rstrip().endswith(THINK_OPEN)


def think_tokens(tokenizer: Any) -> dict[int, str]:
    """`<think>` / `</think>` where the tokenizer has them as special tokens (decoding would drop them):
    id -> tag, for `TextStream(keep=...)`. DeepSeek's own tokenizers keep them as plain added tokens."""
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    found = {}
    for tag in (THINK_OPEN, THINK_CLOSE):
        if tag in special:
            token = tokenizer.convert_tokens_to_ids(tag)
            if isinstance(token, int) and token != getattr(tokenizer, "unk_token_id", None):
                found[token] = tag
    return found


class ReasoningSplitter:
    """Text pieces of an R1 answer in, (channel, piece) out: 'reasoning' up to `</think>`, then 'content'.

    Holds back what could be the start of `</think>` and the whitespace around the tag, so the
    reasoning never ends in whitespace, the content never starts with it, and streamed pieces join
    to the same two texts as a non-streamed answer. A `<think>` the model repeats at the start is dropped.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.phase = "start"
        """start (nothing seen but whitespace) -> reasoning -> content."""
        self.emitted = {"reasoning": False, "content": False}

    def push(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        if self.phase == "start":
            head = self.buffer.lstrip()
            if not head or (THINK_OPEN.startswith(head) and head != THINK_OPEN):
                return out  # nothing yet, or maybe a repeated <think>
            self.buffer = head[len(THINK_OPEN):] if head.startswith(THINK_OPEN) else head
            self.phase = "reasoning"
        if self.phase == "reasoning":
            end = self.buffer.find(THINK_CLOSE)
            if end < 0:
                keep = _partial_suffix(self.buffer, THINK_CLOSE)
                cut = len(self.buffer[:len(self.buffer) - keep].rstrip())
                self._emit(out, "reasoning", self.buffer[:cut])
                self.buffer = self.buffer[cut:]
                return out
            self._emit(out, "reasoning", self.buffer[:end].rstrip())
            self.buffer = self.buffer[end + len(THINK_CLOSE):]
            self.phase = "content"
        self._emit(out, "content", self.buffer)
        self.buffer = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        """What was held back, at the end of the generation (an unclosed block is all reasoning)."""
        out: list[tuple[str, str]] = []
        if self.phase != "content":
            self._emit(out, "reasoning", self.buffer.rstrip())
        self.buffer = ""
        return out

    def _emit(self, out: list[tuple[str, str]], channel: str, text: str) -> None:
        if not self.emitted[channel]:
            text = text.lstrip()
        if text:
            self.emitted[channel] = True
            out.append((channel, text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class TextStream:
    """Token ids in, text pieces out; ends at a stop sequence."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], keep: dict[int, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.keep = keep or {}
        """Special tokens shown as text all the same (`<think>`/`</think>` where the tokenizer marks them special)."""
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that became final with this token ('' while held back)."""
        self.ids.append(token)
        text = self._decode()
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

    def _decode(self) -> str:
        if not self.keep:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)
        parts, start = [], 0
        for i, token in enumerate(self.ids):
            if token in self.keep:
                parts += [self.tokenizer.decode(self.ids[start:i], skip_special_tokens=True), self.keep[token]]
                start = i + 1
        parts.append(self.tokenizer.decode(self.ids[start:], skip_special_tokens=True))
        return "".join(parts)

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
             on_text: Callable[[str], None] | None = None, timeout_s: float | None = None,
             reasoning: bool = False, on_reasoning: Callable[[str], None] | None = None) -> Completion:
    """Generate until EOS, a stop sequence or max_new_tokens (runs in a worker thread).

    With `reasoning`, the text up to `</think>` goes to `on_reasoning` and `Completion.reasoning`,
    the rest to `on_text` and `Completion.text` (stop sequences apply to the whole generation)."""
    started = time.monotonic()
    deadline = started + timeout_s if timeout_s else None
    timed_out = [False]

    def stop_now() -> bool:
        if deadline is not None and time.monotonic() > deadline:
            timed_out[0] = True
            return True
        return should_stop()

    stream = TextStream(tokenizer, stops, think_tokens(tokenizer) if reasoning else None)
    parts: list[str] = []
    thoughts: list[str] = []
    splitter = ReasoningSplitter() if reasoning else None

    def emit(pieces: list[tuple[str, str]]) -> None:
        for channel, piece in pieces:
            into, callback = (thoughts, on_reasoning) if channel == "reasoning" else (parts, on_text)
            into.append(piece)
            if callback:
                callback(piece)

    def take(piece: str) -> None:
        emit(splitter.push(piece) if splitter else [("content", piece)])
    count, finish_reason, thinking = 0, "length", 0
    tokens = backend.generate(prompt_ids, sampling, stop_now)
    try:
        for token in tokens:
            count += 1
            if token in eos_ids:
                finish_reason = "stop"
                break
            piece = stream.push(token)
            if piece:
                take(piece)
            if splitter and splitter.phase != "content":
                thinking = count
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
        take(tail)
    if splitter:
        emit(splitter.finish())
    return Completion("".join(parts), finish_reason, len(prompt_ids), count, time.monotonic() - started,
                      reasoning="".join(thoughts) if splitter else None, reasoning_tokens=thinking)
