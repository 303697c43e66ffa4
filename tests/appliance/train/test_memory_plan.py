"""The memory plan: pure arithmetic from a config, checked before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.base_models import resolve_base_model
from appliance.train.memory_plan import (
    GIB,
    R1_DISTILL_QWEN_1_5B,
    R1_DISTILL_QWEN_7B,
    MemoryPlanError,
    ModelShape,
    check_plan,
    plan_memory,
)
from appliance.train.recipe import LoraRecipe, RecipeError


def test_parameter_counts_match_the_published_models():
    assert R1_DISTILL_QWEN_1_5B.params == 1_777_088_000  # DeepSeek-R1-Distill-Qwen-1.5B (untied embeddings)
    assert R1_DISTILL_QWEN_7B.params == 7_615_616_512    # DeepSeek-R1-Distill-Qwen-7B (Qwen2.5-7B's shape)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
              "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": False}
    assert ModelShape.from_config(config) == R1_DISTILL_QWEN_1_5B


def test_7b_in_fp32_on_a_24_gb_gpu_is_refused_with_the_numbers_and_a_change_that_fits(tmp_path: Path):
    recipe = LoraRecipe(precision="fp32")
    plan = plan_memory(R1_DISTILL_QWEN_7B, recipe, device="cuda:0", available=24 * GIB)
    assert plan.weights == 7_615_616_512 * 4 and not plan.fits
    # 28.4 GiB of weights alone, plus fp32 logits and (checkpointed: auto turned it on) activations
    assert plan.checkpointing and plan.total > 40 * GIB
    assert "quantization = \"nf4\"" in plan.suggestion and plan.suggestion.startswith("would fit with")

    model = tmp_path / "r1-distill-qwen-7b"  # a config, no weights: nothing could be loaded
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "tie_word_embeddings": False}))
    with pytest.raises(MemoryPlanError) as caught:
        check_plan(resolve_base_model(str(model)), recipe, device="cuda:0", available=24 * GIB)
    message = caught.value.message
    assert message.startswith("r1-distill-qwen-7b with this recipe needs 41.0 GiB (weights 28.4 GiB")
    assert "cuda:0 has 24.0 GiB free" in message
    assert caught.value.hint == plan.suggestion


def test_what_fits_a_24_gb_gpu():
    def total(shape, **fields):
        plan = plan_memory(shape, LoraRecipe(**fields), device="cuda:0", available=24 * GIB)
        return plan.fits, plan.total / GIB

    # 1.5B in bf16 at 4096 tokens: too much without checkpointing (activations), fits with it; the
    # default (auto) turns it on because the activations outweigh everything else.
    assert total(R1_DISTILL_QWEN_1_5B, gradient_checkpointing=False) == (False, pytest.approx(28.4, abs=0.1))
    assert total(R1_DISTILL_QWEN_1_5B, gradient_checkpointing=True) == (True, pytest.approx(11.4, abs=0.1))
    assert total(R1_DISTILL_QWEN_1_5B) == (True, pytest.approx(11.4, abs=0.1))
    # 7B: bf16 weights alone are 14.2 GiB; with checkpointing just over 90% of 24 GiB; QLoRA fits.
    assert total(R1_DISTILL_QWEN_7B, gradient_checkpointing=True) == (False, pytest.approx(23.8, abs=0.1))
    assert total(R1_DISTILL_QWEN_7B, gradient_checkpointing=True, quantization="nf4") == (
        True, pytest.approx(14.7, abs=0.1))


def test_checkpointing_keeps_one_input_per_layer_and_logits_scale_with_the_vocabulary():
    recipe = LoraRecipe(batch_size=2, max_length=1024, gradient_checkpointing=False)
    plan = plan_memory(R1_DISTILL_QWEN_1_5B, recipe, device="cuda:0", available=80 * GIB)
    assert plan.tokens == 2048 and plan.fits
    assert plan.activations == plan.activations_without_checkpointing
    assert plan.activations_with_checkpointing < plan.activations_without_checkpointing / 10
    assert plan.logits == 2048 * 151936 * (2 + 8)  # bf16 logits, their fp32 upcast in the loss, its gradient
    assert plan.adapter == plan.optimizer == 8 * 28 * 16 * sum(a + b for a, b in
                                                               R1_DISTILL_QWEN_1_5B.linear_shapes().values())


def test_auto_checkpointing_follows_the_plan_and_can_be_forced():
    auto = plan_memory(R1_DISTILL_QWEN_1_5B, LoraRecipe(), device="cuda:0", available=80 * GIB)
    assert auto.checkpointing and auto.activations == auto.activations_with_checkpointing
    rest = auto.weights + auto.adapter + auto.optimizer + auto.logits + auto.overhead
    assert auto.activations_without_checkpointing > 1.5 * rest  # 18.0 vs 10.4 GiB: well clear of the line
    assert "with gradient checkpointing (this run)" in "\n".join(auto.lines())
    short = plan_memory(R1_DISTILL_QWEN_1_5B, LoraRecipe(max_length=256), device="cuda:0", available=80 * GIB)
    assert not short.checkpointing  # 256 tokens: 1.1 GiB of activations vs 4.9 GiB of the rest
    forced = plan_memory(R1_DISTILL_QWEN_1_5B, LoraRecipe(max_length=256, gradient_checkpointing="on"),
                         device="cuda:0", available=80 * GIB)
    assert forced.checkpointing and forced.to_dict()["gradient_checkpointing"] is True
    assert LoraRecipe(gradient_checkpointing="off").gradient_checkpointing is False
    with pytest.raises(RecipeError, match="gradient_checkpointing 'sometimes' is not true, false or"):
        LoraRecipe(gradient_checkpointing="sometimes")


def test_fsdp_shards_the_plan_and_refuses_what_it_cannot_shard():
    from appliance.errors import AirlockError
    from appliance.train.fsdp import check_supported

    # 7B, bf16, 4096 tokens on 16 GB GPUs: one GPU cannot hold it (23.8 GiB), four FSDP shards can (13.2).
    one = plan_memory(R1_DISTILL_QWEN_7B, LoraRecipe(), device="cuda:0", available=16 * GIB)
    four = plan_memory(R1_DISTILL_QWEN_7B, LoraRecipe(), device="cuda:0", available=16 * GIB, shards=4)
    assert not one.fits and four.fits and four.total / GIB == pytest.approx(13.2, abs=0.1)
    assert four.weights == one.weights // 4 + one.weights // 28  # this rank's quarter + one gathered layer
    assert four.adapter == four.optimizer == -(-one.adapter // 8 // 4) * 8  # LoRA parameters sharded too
    assert "nf4" not in plan_memory(R1_DISTILL_QWEN_7B, LoraRecipe(), device="cuda:0", available=16 * GIB,
                                    shards=2).suggestion  # QLoRA does not shard: never suggested with FSDP
    too_small = plan_memory(R1_DISTILL_QWEN_7B, LoraRecipe(quantization="nf4"), device="cuda:0", available=8 * GIB)
    assert 'strategy = "fsdp"' in too_small.suggestion
    refusals = (({"quantization": "nf4"}, r"QLoRA \(nf4\) with FSDP"), ({"ewc_lambda": 1.0}, "EWC with FSDP"))
    for fields, words in refusals:
        with pytest.raises(AirlockError, match=words):
            check_supported(LoraRecipe(strategy="fsdp", **fields))
    with pytest.raises(RecipeError, match="strategy 'zero3' is not one of ddp, fsdp"):
        LoraRecipe(strategy="zero3")


def test_the_tiny_model_fits_on_this_machine_and_moe_is_not_modelled():
    tiny = check_plan(resolve_base_model("tiny-deepseek-r1"), LoraRecipe(), device="cpu")
    assert tiny is not None and tiny.fits and tiny.available > 0
    assert not tiny.checkpointing  # the runtime's 1 GiB outweighs a 2.6M-parameter model's activations
    assert check_plan(resolve_base_model("tiny-deepseek-v3"), LoraRecipe(), device="cpu") is None


def test_airlock_train_lm_plan_prints_the_plan_and_exits_2_when_it_does_not_fit(tmp_path: Path, airlock_home):
    from tests.conftest import run_cli

    fits = run_cli("train", "lm", "--plan", "--base", "tiny-deepseek-r1", "--device", "cpu")
    assert fits.returncode == 0, fits.stderr
    assert "memory plan: tiny-deepseek-r1, 1 x 4096 tokens per micro-batch" in fits.stdout
    assert "  fits" in fits.stdout and "with gradient checkpointing" in fits.stdout
    assert "gradient checkpointing off (auto)" in fits.stdout
    assert "without gradient checkpointing (this run)" in fits.stdout
    forced = run_cli("train", "lm", "--plan", "--base", "tiny-deepseek-r1", "--device", "cpu",
                     "--gradient-checkpointing", "on", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["gradient_checkpointing"] is True

    model = tmp_path / "r1-distill-qwen-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064}))
    recipe = tmp_path / "r.toml"
    recipe.write_text("precision = \"fp32\"\nmax_length = 131072\nbatch_size = 1024\n")
    refused = run_cli("train", "lm", "--plan", "--base", str(model), "--recipe", str(recipe), "--device", "cpu",
                      "--json")
    assert refused.returncode == 2, refused.stderr
    plan = json.loads(refused.stdout)
    assert plan["fits"] is False and plan["weights"] == 7_615_616_512 * 4 and plan["tokens"] == 131072 * 1024
