"""Turn records into token ids for supervised fine-tuning, and pack them without padding.

A record is `{"messages": [{"role": ..., "content": ...}, ...]}` (chat) or `{"text": ...}`
(plain text). Chat records are rendered with the base model's own chat template; the loss is
on assistant tokens only (their content and the end-of-turn token that follows), found by
character offsets in the rendered text, so any template that copies the assistant's content
verbatim works.

Reasoning is kept. The official DeepSeek-R1(-Distill) template strips everything up to `</think>`
from *every* assistant turn, the last included (at inference the history carries no reasoning).
Rendered as is, an R1 trace would train only its final answer. So the last assistant reply is
rendered through a placeholder that the template copies verbatim and then put back whole:
earlier turns look exactly as they will at inference (answer only), the reply being trained on
keeps `<think>reasoning</think>answer`, which is what the model generates after the template's
generation prompt (the Assistant token, then `<think>` and a newline).

Truncation keeps the reply being trained on: the oldest turns are dropped first, then tokens
from the start of the prompt (after the BOS token); a reply is never cut from the right, so the
final answer and the end-of-turn token always stay. Plain text is cut from the right.

Packing concatenates examples into one row per micro-batch with `position_ids` restarting at
each example; transformers turns restarts into a block-diagonal causal mask when no
attention mask is given, so examples never attend to each other and no pad token is computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from appliance.errors import AirlockError

IGNORE = -100


class RecordError(AirlockError):
    """A training record cannot be turned into tokens."""


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool

    @property
    def label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass(frozen=True)
class MicroBatch:
    """Tensors-to-be for one forward pass. Packed: one row, `position_ids` restart per example."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]] | None
    attention_mask: list[list[int]] | None
    label_tokens: int
    real_tokens: int

    def tensors(self) -> dict[str, Any]:
        import torch

        out = {"input_ids": torch.tensor(self.input_ids), "labels": torch.tensor(self.labels)}
        if self.position_ids is not None:
            out["position_ids"] = torch.tensor(self.position_ids)
        if self.attention_mask is not None:
            out["attention_mask"] = torch.tensor(self.attention_mask)
        return out


REPLY_SLOT = "\ue000airlock-reply\ue001"
"""Stands in for the last reply while the template renders; Unicode private-use characters never
occur in imported records and contain no `</think>`, so any template copies them verbatim."""


def _assistant_spans(rendered: str, messages: list[dict[str, Any]], eos: str, where: str) -> list[tuple[int, int]]:
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        content = message.get("content") or ""
        if message.get("role") != "assistant":
            # Step over other turns so a reply is never matched inside the question before it.
            pos = rendered.find(content, cursor) if content else -1
            cursor = pos + len(content) if pos >= 0 else cursor
            continue
        candidates = [content]
        if "</think>" in content and index != last:  # templates drop earlier turns' reasoning
            candidates.append(content.split("</think>")[-1].lstrip())
        found = [(rendered.find(c, cursor), c) for c in candidates if c]
        found = [(pos, c) for pos, c in found if pos >= 0]
        if not found:
            raise RecordError(f"{where}: the chat template did not keep an assistant reply verbatim",
                              hint="check the base model's chat template, or convert the record to plain text")
        start, text = min(found)
        end = start + len(text)
        rest = rendered[end:]
        if eos and rest.lstrip(" \n").startswith(eos):  # learn to stop: the end-of-turn token is a target
            end += len(rest) - len(rest.lstrip(" \n")) + len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def _render_keeping_reply(tokenizer: Any, messages: list[dict[str, Any]], where: str) -> str:
    """The chat template's text, with the last assistant reply verbatim (its reasoning included)."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    if any(REPLY_SLOT in (m.get("content") or "") for m in messages):
        raise RecordError(f"{where}: contains the trainer's reply placeholder (U+E000 'airlock-reply' U+E001)",
                          hint="remove those private-use characters from the record and re-import the dataset")
    slotted = [dict(m) for m in messages]
    slotted[last]["content"] = REPLY_SLOT
    rendered = tokenizer.apply_chat_template(slotted, tokenize=False)
    if rendered.count(REPLY_SLOT) != 1:
        raise RecordError(f"{where}: the chat template did not keep the last assistant reply verbatim",
                          hint="check the base model's chat template, or convert the record to plain text")
    return rendered.replace(REPLY_SLOT, messages[last].get("content") or "")


def _encode_chat(tokenizer: Any, messages: list[dict[str, Any]], where: str) -> tuple[list[int], list[int]]:
    rendered = _render_keeping_reply(tokenizer, messages, where)
    spans = _assistant_spans(rendered, messages, tokenizer.eos_token or "", where)
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [token if any(s <= a < e for s, e in spans) else IGNORE
              for token, (a, _) in zip(ids, encoded["offset_mapping"], strict=True)]
    return ids, labels


def _without_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Drop the first exchange (system messages stay); None when only the last exchange is left."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    users = [i for i, m in enumerate(messages[:last]) if m.get("role") == "user"]
    if len(users) < 2:
        return None
    return [m for i, m in enumerate(messages) if m.get("role") == "system" or i >= users[1]]


def encode_record(tokenizer: Any, record: dict[str, Any], max_length: int, where: str = "record") -> Example:
    """Token ids and labels (assistant tokens only for chat; all tokens for text)."""
    truncated = False
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages)
                or not any(m.get("role") == "assistant" for m in messages)):
            raise RecordError(f"{where}: a chat record needs at least one assistant message",
                              hint="records are {'messages': [{'role': 'user', ...}, {'role': 'assistant', ...}]}")
        ids, labels = _encode_chat(tokenizer, messages, where)
        while len(ids) > max_length and (shorter := _without_oldest_turn(messages)) is not None:
            messages, truncated = shorter, True
            ids, labels = _encode_chat(tokenizer, messages, where)
        if len(ids) > max_length:  # cut the start of the prompt (then of the reply), never its end
            head = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
            keep = max_length - head
            ids, labels, truncated = ids[:head] + ids[-keep:], labels[:head] + labels[-keep:], True
            labels[head] = IGNORE  # its real context was cut away
    elif isinstance(record.get("text"), str):
        text = (tokenizer.bos_token or "") + record["text"] + (tokenizer.eos_token or "")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        labels = list(ids)
        truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
    else:
        raise RecordError(f"{where}: neither 'messages' nor 'text'", hint="re-import the dataset")
    if not ids:
        raise RecordError(f"{where}: empty after tokenization", hint="remove empty records")
    labels[0] = IGNORE  # nothing predicts the first token; in a packed row it would see the previous example
    return Example(tuple(ids), tuple(labels), truncated)


def packed_batches(examples: Iterable[Example], token_budget: int) -> Iterator[MicroBatch]:
    """Greedy, order-preserving packing into rows of at most `token_budget` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > token_budget:
            yield _packed(ids, labels, positions)
            ids, labels, positions = [], [], []
        ids.extend(example.input_ids)
        labels.extend(example.labels)
        positions.extend(range(len(example.input_ids)))
    if ids:
        yield _packed(ids, labels, positions)


def _packed(ids: list[int], labels: list[int], positions: list[int]) -> MicroBatch:
    return MicroBatch([ids], [labels], [positions], None, sum(1 for x in labels if x != IGNORE), len(ids))


def padded_batches(examples: Iterable[Example], batch_size: int, pad_id: int) -> Iterator[MicroBatch]:
    """The conventional layout (right padding + attention mask), for comparison and packing=false."""
    chunk: list[Example] = []
    for example in examples:
        chunk.append(example)
        if len(chunk) == batch_size:
            yield _padded(chunk, pad_id)
            chunk = []
    if chunk:
        yield _padded(chunk, pad_id)


def _padded(chunk: list[Example], pad_id: int) -> MicroBatch:
    width = max(len(e.input_ids) for e in chunk)
    ids = [list(e.input_ids) + [pad_id] * (width - len(e.input_ids)) for e in chunk]
    labels = [list(e.labels) + [IGNORE] * (width - len(e.labels)) for e in chunk]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk]
    return MicroBatch(ids, labels, None, mask, sum(e.label_tokens for e in chunk),
                      sum(len(e.input_ids) for e in chunk))
