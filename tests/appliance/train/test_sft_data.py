"""Tokenization for SFT: exact ids, assistant-only loss, and packing that never mixes examples."""

from __future__ import annotations

import pytest

from appliance.base_models import load_causal_lm, resolve_base_model
from appliance.train.sft_data import IGNORE, RecordError, encode_record, packed_batches, padded_batches

R1_CONVERSATION = {"messages": [
    {"role": "user", "content": "Check oven 9?"},
    {"role": "assistant", "content": "<think>\nworn seal\n</think>\n\nCheck the seal."}]}


@pytest.fixture(scope="module")
def r1():
    return load_causal_lm(resolve_base_model("tiny-deepseek-r1"))


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(name).path, local_files_only=True)


def _target_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])


def test_deepseek_r1_conversation_exact_ids():
    tokenizer = _tokenizer("tiny-deepseek-r1")
    example = encode_record(tokenizer, R1_CONVERSATION, max_length=512)
    # <bos> <User> "Check oven 9?" <Assistant> <think> "\nworn seal\n" </think> "\n\nCheck the seal." <eos>
    assert list(example.input_ids) == [0, 3, 490, 781, 227, 31, 37, 4, 5, 205, 93, 372, 453, 205, 6, 205, 205,
                                       490, 271, 453, 20, 1]
    assert list(example.labels) == [IGNORE] * 8 + list(example.input_ids[8:])
    assert _target_text(tokenizer, example) == "<think>\nworn seal\n</think>\n\nCheck the seal.<｜end▁of▁sentence｜>"


def test_earlier_turns_lose_their_reasoning_and_questions_are_never_targets():
    tokenizer = _tokenizer("tiny-deepseek-r1")
    record = {"messages": [
        {"role": "user", "content": "Say Hello"},
        {"role": "assistant", "content": "<think>\nx\n</think>\n\nHello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "<think>\ny\n</think>\n\nBye now"}]}
    example = encode_record(tokenizer, record, max_length=512)
    assert _target_text(tokenizer, example) == (
        "Hello<｜end▁of▁sentence｜><think>\ny\n</think>\n\nBye now<｜end▁of▁sentence｜>")


def test_deepseek_coder_conversation_exact_ids():
    tokenizer = _tokenizer("tiny-deepseek-coder")
    record = {"messages": [{"role": "user", "content": "Reset oven 9"},
                           {"role": "assistant", "content": "Lock it out first."}]}
    rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert rendered == ("<｜begin▁of▁sentence｜>You are an AI programming assistant.\n### Instruction:\nReset oven 9\n"
                        "### Response:\nLock it out first.\n<|EOT|>\n")
    example = encode_record(tokenizer, record, max_length=512)
    assert list(example.input_ids) == [
        0, 63, 494, 464, 272, 84, 343, 47, 284, 88, 587, 83, 83, 282, 434, 89, 279, 90, 604, 20, 205,  # system
        9, 9, 9, 323, 84, 327, 88, 91, 318, 32, 205, 281, 89, 797, 781, 778, 205,  # ### Instruction:\n...
        9, 9, 9, 298, 89, 86, 267, 89, 75, 32, 205,  # ### Response:\n
        50, 85, 329, 497, 446, 407, 20, 205, 998, 205]  # reply, \n, <|EOT|>, \n
    assert tokenizer.convert_ids_to_tokens(998) == "<|EOT|>"
    assert [i for i, label in enumerate(example.labels) if label != IGNORE] == list(range(49, 58))
    assert _target_text(tokenizer, example) == "Lock it out first.\n<|EOT|>"


def test_plain_text_trains_on_every_token_but_the_first():
    tokenizer = _tokenizer("tiny-deepseek-r1")
    example = encode_record(tokenizer, {"text": "Maintenance log."}, max_length=512)
    assert example.input_ids[0] == tokenizer.bos_token_id and example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[0] == IGNORE and list(example.labels[1:]) == list(example.input_ids[1:])


def test_truncation_is_counted_and_bad_records_name_themselves():
    tokenizer = _tokenizer("tiny-deepseek-r1")
    long = encode_record(tokenizer, {"text": "press line 2 " * 200}, max_length=32)
    assert long.truncated and len(long.input_ids) == 32
    with pytest.raises(RecordError, match="record 7: a chat record needs at least one assistant message"):
        encode_record(tokenizer, {"messages": [{"role": "user", "content": "hi"}]}, 512, where="record 7")
    with pytest.raises(RecordError, match="record 8: neither 'messages' nor 'text'"):
        encode_record(tokenizer, {"prompt": "x"}, 512, where="record 8")


def test_packed_row_gives_each_example_the_logits_it_gets_alone(r1):
    import torch

    lm, tokenizer = r1
    a = encode_record(tokenizer, R1_CONVERSATION, 512)
    b = encode_record(tokenizer, {"text": "Report. Examination: CT of the head. Findings: No acute abnormality."}, 512)
    (batch,) = list(packed_batches([a, b], token_budget=512))
    assert batch.attention_mask is None and batch.position_ids[0] == list(range(len(a.input_ids))) + list(
        range(len(b.input_ids)))
    with torch.no_grad():
        packed = lm(**{k: v for k, v in batch.tensors().items() if k != "labels"}, use_cache=False).logits[0]
        alone = lm(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits[0]
    torch.testing.assert_close(packed[len(a.input_ids):], alone, atol=1e-4, rtol=1e-4)


def test_padded_and_packed_batches_count_the_same_targets(r1):
    _, tokenizer = r1
    examples = [encode_record(tokenizer, {"text": f"Maintenance log. Machine: oven {i}."}, 64) for i in range(7)]
    packed = list(packed_batches(examples, token_budget=40))
    padded = list(padded_batches(examples, batch_size=3, pad_id=tokenizer.pad_token_id))
    assert sum(b.label_tokens for b in packed) == sum(b.label_tokens for b in padded) == sum(
        e.label_tokens for e in examples)
    assert all(len(b.input_ids[0]) <= 40 for b in packed)
    assert [len(b.input_ids) for b in padded] == [3, 3, 1]
