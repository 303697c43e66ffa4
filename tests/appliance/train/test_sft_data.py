"""Tokenization for SFT: exact ids, assistant-only loss, and packing that never mixes examples."""

from __future__ import annotations

import pytest

from appliance.base_models import load_causal_lm, resolve_base_model
from appliance.train.sft_data import IGNORE, REPLY_SLOT, RecordError, encode_record, packed_batches, padded_batches

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


# --- The official DeepSeek-R1-Distill chat template (models/templates/deepseek-r1-distill.jinja) ---
# It strips the reasoning from *every* assistant turn, the last one included; the tiny model's
# template hides that with `not loop.last`. These tests run the official text on the tiny tokenizer
# (same special tokens, so the ids are exact and small).

OFFICIAL_R1_TEMPLATE = (resolve_base_model("tiny-deepseek-r1").path.parent / "templates"
                        / "deepseek-r1-distill.jinja")


@pytest.fixture(scope="module")
def official_r1():
    tokenizer = _tokenizer("tiny-deepseek-r1")
    tokenizer.chat_template = OFFICIAL_R1_TEMPLATE.read_text(encoding="utf-8")
    return tokenizer


def test_the_official_template_alone_drops_the_reasoning_of_the_last_reply(official_r1):
    rendered = official_r1.apply_chat_template(R1_CONVERSATION["messages"], tokenize=False)
    assert "worn seal" not in rendered  # what a naive encoder would train on: the answer only
    assert rendered.endswith("<｜Assistant｜>\n\nCheck the seal.<｜end▁of▁sentence｜>")


def test_official_template_reasoning_and_answer_carry_loss_exact_ids(official_r1):
    example = encode_record(official_r1, R1_CONVERSATION, max_length=4096)
    # <bos> <User> "Check oven 9?" <Assistant> <think> "\nworn seal\n" </think> "\n\nCheck the seal." <eos>
    assert list(example.input_ids) == [0, 3, 490, 781, 227, 31, 37, 4, 5, 205, 93, 372, 453, 205, 6, 205, 205,
                                       490, 271, 453, 20, 1]
    assert list(example.labels) == [IGNORE] * 8 + list(example.input_ids[8:])
    reasoning = [i for i, t in enumerate(example.input_ids) if 9 <= i <= 13]  # "\nworn seal\n"
    assert official_r1.decode([example.input_ids[i] for i in reasoning]) == "\nworn seal\n"
    assert all(example.labels[i] != IGNORE for i in reasoning)
    # The text trained on is what the model generates after the template's generation prompt.
    prompt = official_r1.apply_chat_template(R1_CONVERSATION["messages"][:1], tokenize=False,
                                             add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    assert official_r1.decode(example.input_ids) == prompt[:-len("<think>\n")] + R1_CONVERSATION["messages"][1][
        "content"] + "<｜end▁of▁sentence｜>"


def test_official_template_history_keeps_answers_only_exact_ids(official_r1):
    record = {"messages": [
        {"role": "user", "content": "Say Hello"},
        {"role": "assistant", "content": "<think>\nx\n</think>\n\nHello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "<think>\ny\n</think>\n\nBye now"}]}
    example = encode_record(official_r1, record, max_length=4096)
    assert official_r1.decode(example.input_ids) == (
        "<｜begin▁of▁sentence｜><｜User｜>Say Hello<｜Assistant｜>\n\nHello<｜end▁of▁sentence｜>"
        "<｜User｜>Bye<｜Assistant｜><think>\ny\n</think>\n\nBye now<｜end▁of▁sentence｜>")
    # <bos> <User> "Say Hello" <Assistant> "\n\n" ["Hello" <eos>] <User> "Bye" <Assistant> [<think> "\ny\n" </think>
    # "\n\nBye now" <eos>]; brackets: the targets
    assert list(example.input_ids) == [0, 3, 57, 477, 227, 46, 516, 85, 4, 205, 205, 46, 516, 85, 1, 3, 40, 95, 75, 4,
                                       5, 205, 95, 205, 6, 205, 205, 40, 95, 75, 415, 299, 1]
    assert [i for i, label in enumerate(example.labels) if label != IGNORE] == [*range(11, 15), *range(20, 33)]
    assert _target_text(official_r1, example) == (
        "Hello<｜end▁of▁sentence｜><think>\ny\n</think>\n\nBye now<｜end▁of▁sentence｜>")


def test_a_long_example_drops_its_oldest_turn_then_the_start_of_its_prompt_never_its_answer(official_r1):
    old = [{"role": "user", "content": "Check oven 1? " * 30},
           {"role": "assistant", "content": "<think>\nold\n</think>\n\nOld answer."}]
    last = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Which press failed on line 2 after the night shift? " * 6},
            {"role": "assistant", "content": "<think>\nthe log names press 4\n</think>\n\nPress 4 failed."}]
    record = {"messages": [last[0], *old, *last[1:]]}
    full = encode_record(official_r1, record, max_length=4096)
    without_old = encode_record(official_r1, {"messages": last}, max_length=4096)
    assert not full.truncated and len(without_old.input_ids) < len(full.input_ids)

    dropped = encode_record(official_r1, record, max_length=len(without_old.input_ids))
    assert dropped.truncated and dropped.input_ids == without_old.input_ids  # the oldest exchange went first
    assert dropped.labels[1:] == without_old.labels[1:]

    cut = encode_record(official_r1, record, max_length=len(without_old.input_ids) - 20)
    assert cut.truncated and len(cut.input_ids) == len(without_old.input_ids) - 20
    assert cut.input_ids[0] == official_r1.bos_token_id  # the BOS stays, the start of the prompt goes
    assert cut.input_ids[1:] == without_old.input_ids[21:]
    assert _target_text(official_r1, cut) == _target_text(official_r1, without_old) == (
        "<think>\nthe log names press 4\n</think>\n\nPress 4 failed.<｜end▁of▁sentence｜>")

    tiny = encode_record(official_r1, record, max_length=16)  # shorter than the reply: its start goes, not its end
    assert len(tiny.input_ids) == 16 and official_r1.decode(tiny.input_ids[1:]).endswith(
        "Press 4 failed.<｜end▁of▁sentence｜>")
    assert tiny.labels[1] == IGNORE and all(label != IGNORE for label in tiny.labels[2:])


def test_a_record_holding_the_reply_placeholder_is_refused(official_r1):
    record = {"messages": [{"role": "user", "content": f"a{REPLY_SLOT}b"}, {"role": "assistant", "content": "c"}]}
    with pytest.raises(RecordError, match="record 3: contains the trainer's reply placeholder"):
        encode_record(official_r1, record, 4096, where="record 3")


def test_recipe_default_max_length_fits_r1_traces():
    from appliance.train.recipe import LoraRecipe

    assert LoraRecipe().max_length >= 4096
