"""Precision (bf16 base, fp32 LoRA), QLoRA's refusal on CPU, early stopping that ships the best
weights, and the RNG states of an exact resume. Real training steps on the tiny model."""

from __future__ import annotations

import json

import pytest

from appliance.base_models import resolve_base_model
from appliance.errors import AirlockError
from appliance.train.lm import (
    build_lora_model,
    encode_records,
    evaluate_loss,
    make_batches,
    precision_of,
    restore_rng,
    rng_states,
    train_lora,
)
from appliance.train.recipe import LoraRecipe, RecipeError
from tests.conftest import REPO


@pytest.fixture(scope="module")
def chats():
    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    chat = [r for r in (json.loads(line) for line in lines) if "messages" in r]
    return chat[:32], chat[64:68], chat[80:82]


def test_precision_per_machine():
    import torch

    cpu = precision_of(LoraRecipe(), cuda=False)
    assert (cpu.device, cpu.weights, cpu.autocast, cpu.grad_scaler) == ("cpu", "float32", None, False)
    cpu_bf16 = precision_of(LoraRecipe(precision="bf16"), cuda=False)
    assert (cpu_bf16.weights, cpu_bf16.autocast) == ("bfloat16", torch.bfloat16)
    ampere = precision_of(LoraRecipe(), cuda=True, bf16_supported=True)
    assert (ampere.weights, ampere.autocast, ampere.grad_scaler) == ("bfloat16", torch.bfloat16, False)
    turing = precision_of(LoraRecipe(), cuda=True, bf16_supported=False)  # fp16 needs loss scaling
    assert (turing.weights, turing.autocast, turing.grad_scaler) == ("float16", torch.float16, True)
    asked_fp32 = precision_of(LoraRecipe(precision="fp32"), cuda=True, bf16_supported=True)
    assert (asked_fp32.weights, asked_fp32.autocast) == ("float32", None)
    assert precision_of(LoraRecipe(quantization="nf4"), cuda=True, bf16_supported=True).nf4
    with pytest.raises(AirlockError, match="this GPU does not support bf16"):
        precision_of(LoraRecipe(precision="bf16"), cuda=True, bf16_supported=False)
    with pytest.raises(AirlockError, match="precision fp16 needs a GPU"):
        precision_of(LoraRecipe(precision="fp16"), cuda=False)
    with pytest.raises(RecipeError, match="nf4 computes in bf16 or fp16, not fp32"):
        LoraRecipe(precision="fp32", quantization="nf4")
    with pytest.raises(RecipeError, match="quantization 'int3' is not one of none, nf4"):
        LoraRecipe(quantization="int3")


def test_qlora_on_cpu_is_refused_with_one_line_before_anything_loads(chats):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for CPU-only machines")
    train, val, _ = chats
    # tiny-deepseek-coder has no weights: had anything tried to load, the error would say so instead.
    with pytest.raises(AirlockError) as caught:
        train_lora(resolve_base_model("tiny-deepseek-coder"), train, val, LoraRecipe(quantization="nf4", max_steps=1))
    assert caught.value.message == 'QLoRA (quantization = "nf4") needs a CUDA GPU; this machine has none'
    assert 'quantization = "none"' in caught.value.hint


def test_bf16_base_keeps_lora_weights_and_adamw_state_in_fp32(chats):
    import torch

    train, val, _ = chats
    recipe = LoraRecipe(precision="bf16", max_steps=2, eval_every=2, batch_size=2, max_length=64, lr=3e-3,
                        rank=4, seed=1)
    model, _ = build_lora_model(resolve_base_model("tiny-deepseek-r1"), recipe)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}

    result = train_lora(resolve_base_model("tiny-deepseek-r1"), train, val, recipe)
    assert result.steps == 2 and all(v.dtype == torch.float32 for v in result.adapter_state.values())
    assert result.memory_plan["fits"] and result.memory_plan["device"] == "cpu"  # admitted by its plan
    assert all(loss == loss and 0 < loss < 20 for loss in result.train_losses)  # finite, sane cross-entropy


@pytest.mark.slow  # ~25-40 s on two shared cores: three real steps, evaluations, test generation
def test_early_stopping_ships_the_best_validation_adapter_and_still_measures_test(chats):
    """Training on one repeated nonsense line makes the chat validation loss rise after a step or two."""
    _, val, test = chats
    train = [{"text": "zq xv zq xv zq xv zq xv"}] * 16
    recipe = LoraRecipe(max_steps=30, eval_every=1, early_stopping_patience=2, batch_size=1, max_length=64,
                        lr=1e-2, dropout=0.0, warmup_ratio=0.0, schedule="constant", rank=8, seed=2)
    base = resolve_base_model("tiny-deepseek-r1")
    result = train_lora(base, train, val, recipe, test_records=test)
    assert result.stopped_early and result.steps < 30
    last_val = result.val_losses[-1][1]
    # Measured: best 1.15 (step 1), last 7.5 (step 3); shipping the last weights would miss by far.
    assert last_val > result.best_val_loss + 0.5
    assert result.test is not None and result.test.label_tokens > 0  # measured although it stopped early

    from peft import set_peft_model_state_dict

    model, tokenizer = build_lora_model(base, recipe)
    set_peft_model_state_dict(model, result.adapter_state)
    batches = make_batches(encode_records(tokenizer, val, recipe.max_length, "val"), recipe,
                           tokenizer.pad_token_id, order_seed=None)
    assert evaluate_loss(model, batches, "cpu", None) == pytest.approx(result.best_val_loss, rel=1e-5)


def test_rng_states_round_trip_and_resume_state_on_cpu():
    import torch

    torch.manual_seed(11)
    saved = rng_states()
    assert set(saved) == ({"rng", "cuda_rng"} if torch.cuda.is_available() and torch.cuda.is_initialized()
                          else {"rng"})
    expected = torch.rand(3)
    torch.rand(5)
    restore_rng(saved)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_cuda_rng_is_saved_and_restored():
    import torch

    torch.cuda.manual_seed_all(5)
    torch.rand(1, device="cuda")
    saved = rng_states()
    assert len(saved["cuda_rng"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda")
    torch.rand(7, device="cuda")
    restore_rng(saved)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
