"""Which modules get LoRA adapters, per model family.

- llama (deepseek-llm, deepseek-coder) and qwen2 (DeepSeek-R1-Distill-Qwen): attention
  q/k/v/o and the MLP gate/up/down projections.
- deepseek_v3 / deepseek_v2 (MLA + MoE): the MLA projections (q_a/q_b or q, kv_a, kv_b, o), the
  dense MLP layers and the shared experts. Never the router (`mlp.gate`): adapting it shifts
  expert load and destabilises training. The routed experts are fused 3-D parameters in
  transformers 5; they are adapted only when the recipe asks (`lora_routed_experts`), through
  peft's `target_parameters`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from appliance.train.recipe import LoraRecipe, RecipeError

DENSE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLA_SUFFIXES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
FAMILIES = {"llama": "dense", "qwen2": "dense", "deepseek_v3": "moe", "deepseek_v2": "moe"}
_ROUTER = re.compile(r"(^|\.)mlp\.gate$")


@dataclass(frozen=True)
class LoraTargets:
    modules: tuple[str, ...]
    """Full module names that get a LoRA adapter."""
    parameters: tuple[str, ...] = ()
    """Fused expert parameters adapted through peft `target_parameters` (MoE, on request)."""


def model_family(config: Any) -> str:
    model_type = getattr(config, "model_type", "")
    if model_type not in FAMILIES:
        raise RecipeError(f"model type {model_type!r} has no LoRA rules",
                          hint=f"supported: {', '.join(sorted(FAMILIES))}")
    return model_type


def select_targets(model: Any, recipe: LoraRecipe) -> LoraTargets:
    """Resolve the recipe's `target_modules` against this model's actual module names."""
    family = model_family(model.config)
    linear_names = [name for name, module in model.named_modules() if type(module).__name__ == "Linear"]
    if recipe.target_modules == "auto":
        if FAMILIES[family] == "dense":
            chosen = [n for n in linear_names if n.rsplit(".", 1)[-1] in DENSE_SUFFIXES and ".layers." in n]
        else:
            chosen = [n for n in linear_names if ".layers." in n and (
                (".self_attn." in n and n.rsplit(".", 1)[-1] in MLA_SUFFIXES)
                or re.search(r"\.mlp\.(shared_experts\.)?(gate|up|down)_proj$", n))]
    else:
        wanted = set(recipe.target_modules)
        routers = [t for t in wanted if t == "gate" or _ROUTER.search(t)]
        if routers and FAMILIES[family] == "moe":
            raise RecipeError("the MoE router (mlp.gate) is never a LoRA target",
                              hint="remove 'gate' from target_modules; use gate_proj for the MLP")
        chosen = [n for n in linear_names if n.rsplit(".", 1)[-1] in wanted or n in wanted]
        missing = sorted(t for t in wanted if not any(n == t or n.endswith("." + t) for n in chosen))
        if missing:
            raise RecipeError(f"target_modules {', '.join(missing)} match no linear layer of this model",
                              hint='use target_modules = "auto" or names such as q_proj, o_proj')
    chosen = [n for n in chosen if not _ROUTER.search(n)]
    if not chosen:
        raise RecipeError("no LoRA target modules found in this model", hint='use target_modules = "auto"')
    parameters: tuple[str, ...] = ()
    if recipe.lora_routed_experts:
        if FAMILIES[family] != "moe":
            raise RecipeError("lora_routed_experts applies to MoE models only",
                              hint="remove it from the recipe for llama/qwen2 models")
        parameters = tuple(name for name, _ in model.named_parameters()
                           if re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", name))
    return LoraTargets(tuple(chosen), parameters)
