"""Packed attention (train/packed_attention.py): a packed row's loss and gradients are the per-example ones.

The reference is transformers' own SDPA on each example alone (no packing at all), so a packed
row that let one example attend to another, or that dropped a token, would differ well beyond the
float tolerance (measured: loss difference 9e-8 against a tolerance of 1e-5, largest gradient
difference 1.3e-7 against 1e-6 + 1e-4 x |g| (gradients up to 0.39); the row read as one sequence,
examples attending to each other, moves the loss by 0.21 against the 1e-3 the check asks).
"""

from __future__ import annotations

import pytest

from appliance.base_models import resolve_base_model
from appliance.train.lm import build_lora_model
from appliance.train.packed_attention import NAME, example_bounds, use_packed_attention
from appliance.train.recipe import LoraRecipe
from appliance.train.sft_data import encode_record, packed_batches, padded_batches

RECORDS = [
    {"messages": [{"role": "user", "content": "Check oven 9?"},
                  {"role": "assistant", "content": "<think>\nworn seal\n</think>\n\nCheck the seal."}]},
    {"text": "Report. Examination: CT of the head. Findings: No acute abnormality."},
    {"text": "Ok."},
    {"messages": [{"role": "user", "content": "Torque for bolt M8 on line 3?"},
                  {"role": "assistant", "content": "<think>\nline 3 uses class 8.8\n</think>\n\n25 Nm."},
                  {"role": "user", "content": "And M10?"},
                  {"role": "assistant", "content": "<think>\nsame class\n</think>\n\n49 Nm."}]},
]


@pytest.fixture(scope="module")
def lora():
    """The tiny R1 model with fresh LoRA adapters (dropout off: both sides must see the same function);
    B is non-zero so the adapters' gradients depend on the attention pattern."""
    import torch

    model, tokenizer = build_lora_model(resolve_base_model("tiny-deepseek-r1"),
                                        LoraRecipe(dropout=0.0, max_length=256, seed=5))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    examples = [encode_record(tokenizer, record, 256) for record in RECORDS]
    return model, tokenizer, examples


def _loss_and_grads(model, inputs_list, weights):
    """sum(weight x loss) over forward passes, and the adapters' gradients of it."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for inputs, weight in zip(inputs_list, weights, strict=True):
        loss = model(**inputs, use_cache=False).loss * weight
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return total, grads


def test_packed_loss_and_gradients_equal_the_per_example_ones(lora):
    import torch

    model, _, examples = lora
    base = model.get_base_model()
    (batch,) = list(packed_batches(examples, token_budget=1024))
    assert len(batch.input_ids) == 1 and batch.attention_mask is None  # one row, no mask at all
    label_tokens = [e.label_tokens for e in examples]
    assert sum(label_tokens) == batch.label_tokens

    base.set_attn_implementation("sdpa")  # the reference: every example alone, transformers' own SDPA
    alone = [{"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels])} for e in examples]
    expected_loss, expected_grads = _loss_and_grads(model, alone, [n / sum(label_tokens) for n in label_tokens])

    base.set_attn_implementation(use_packed_attention())
    try:
        packed_loss, packed_grads = _loss_and_grads(model, [batch.tensors()], [1.0])
    finally:
        base.set_attn_implementation("sdpa")
    assert base.config._attn_implementation == "sdpa"
    assert packed_loss == pytest.approx(expected_loss, abs=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)

    # The check can fail: the masked SDPA over the whole row without the restarts (one long
    # sequence, examples attending to earlier ones) gives another loss.
    crossing = dict(batch.tensors())
    crossing["position_ids"] = torch.arange(crossing["input_ids"].shape[1]).unsqueeze(0)
    base.set_attn_implementation(use_packed_attention())
    try:
        with torch.no_grad():
            leaked = model(**crossing, use_cache=False).loss.item()
    finally:
        base.set_attn_implementation("sdpa")
    assert abs(leaked - expected_loss) > 1e-3


def test_padding_masks_and_generation_take_the_plain_sdpa_path(lora):
    import torch

    model, tokenizer, examples = lora
    base = model.get_base_model()
    (padded,) = list(padded_batches(examples, batch_size=4, pad_id=tokenizer.pad_token_id))
    prompt = tokenizer(tokenizer.bos_token + "Report. Examination:", return_tensors="pt", add_special_tokens=False)
    outputs = {}
    for implementation in ("sdpa", use_packed_attention()):
        base.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = (
                model(**padded.tensors(), use_cache=False).loss,
                model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id))
    base.set_attn_implementation("sdpa")
    torch.testing.assert_close(outputs[NAME][0], outputs["sdpa"][0])
    assert outputs[NAME][1].tolist() == outputs["sdpa"][1].tolist()


def test_example_bounds_follow_the_position_restarts():
    import torch

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert example_bounds(positions) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 8)]]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora):
    """Recomputing the layers in the backward pass (non-reentrant, as build_lora_model enables it) over
    a packed row changes nothing but memory: loss and adapter gradients as without (measured equal
    to ~1e-8; the tolerance is 1e-6)."""
    import torch

    model, _, examples = lora
    base = model.get_base_model()
    (batch,) = list(packed_batches(examples, token_budget=1024))
    base.set_attn_implementation(use_packed_attention())
    try:
        plain_loss, plain_grads = _loss_and_grads(model, [batch.tensors()], [1.0])
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
        checkpointed_loss, checkpointed_grads = _loss_and_grads(model, [batch.tensors()], [1.0])
    finally:
        model.gradient_checkpointing_disable()
        model.disable_input_require_grads()
        base.set_attn_implementation("sdpa")
    assert checkpointed_loss == pytest.approx(plain_loss, abs=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
