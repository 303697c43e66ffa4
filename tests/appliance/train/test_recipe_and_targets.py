"""Recipes are validated with clear errors; LoRA targets follow each family's rules."""

from __future__ import annotations

import pytest

from appliance.base_models import resolve_base_model
from appliance.train.recipe import LoraRecipe, RecipeError, load_recipe
from appliance.train.targets import select_targets


def test_defaults_and_a_written_recipe(tmp_path):
    assert load_recipe(None) == LoraRecipe()
    path = tmp_path / "recipe.toml"
    path.write_text('rank = 8\nalpha = 16\ntarget_modules = ["q_proj", "v_proj"]\nmax_steps = 40\n')
    recipe = load_recipe(path)
    assert (recipe.rank, recipe.scaling, recipe.target_modules, recipe.max_steps) == (8, 2.0, ("q_proj", "v_proj"), 40)
    assert recipe.to_dict()["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(("text", "message"), [
    ("rank = 0", "rank = 0 is outside 1..256"),
    ("lr = 0.5", "lr = 0.5 is outside"),
    ("rank = 'big'", "rank = 'big' has the wrong type"),
    ("packing = true\nlearning_rate = 1e-4", "unknown field(s) learning_rate"),
    ("schedule = 'exponential'", "schedule 'exponential' is not one of"),
    ("precision = 'int4'", "precision 'int4' is not one of"),
    ("target_modules = 'all'", "must be \"auto\" or a list"),
    ("target_modules = ['q_proj; import os']", "plain module names"),
    ("rank = [", "is not valid TOML"),
])
def test_bad_recipes_name_the_file_and_the_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in info.value.message
    assert str(path) in info.value.message
    assert info.value.hint


def _model(name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_base_model(name).path, local_files_only=True)
    return AutoModelForCausalLM.from_config(config)


def test_dense_families_adapt_attention_and_mlp():
    for name in ("tiny-deepseek-r1", "tiny-deepseek-coder"):
        targets = select_targets(_model(name), LoraRecipe())
        suffixes = {t.rsplit(".", 1)[-1] for t in targets.modules}
        assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert not any("lm_head" in t or "embed" in t for t in targets.modules)


def test_deepseek_v3_targets_mla_and_shared_experts_never_the_router():
    model = _model("tiny-deepseek-v3")
    targets = select_targets(model, LoraRecipe())
    suffixes = {t.rsplit(".", 1)[-1] for t in targets.modules}
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} <= suffixes
    assert any(".mlp.shared_experts.gate_proj" in t for t in targets.modules)
    assert not any(t.endswith("mlp.gate") for t in targets.modules)
    assert targets.parameters == ()
    with pytest.raises(RecipeError, match="router"):
        select_targets(model, LoraRecipe(target_modules=("gate", "q_a_proj")))
    routed = select_targets(model, LoraRecipe(lora_routed_experts=True))
    assert routed.parameters and all(".mlp.experts." in p for p in routed.parameters)


def test_unknown_target_module_is_refused():
    with pytest.raises(RecipeError, match="query_key_value match no linear layer"):
        select_targets(_model("tiny-deepseek-r1"), LoraRecipe(target_modules=("query_key_value",)))
    with pytest.raises(RecipeError, match="MoE models only"):
        select_targets(_model("tiny-deepseek-r1"), LoraRecipe(lora_routed_experts=True))
