"""The tiny DeepSeek-family models: resolve offline, load, generate, chat template, adapters' targets."""

from __future__ import annotations

import json

import pytest

from appliance.base_models import generate_text, load_causal_lm, resolve_base_model
from appliance.errors import ModelNotFoundError
from tests.conftest import REPO

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm(resolve_base_model("tiny-deepseek-r1"))


def test_resolve_by_name_and_by_path():
    by_name = resolve_base_model("tiny-deepseek-r1")
    assert by_name.path == REPO / "models" / "tiny-deepseek-r1"
    assert by_name.architecture == "Qwen2ForCausalLM" and by_name.has_weights
    assert resolve_base_model(str(by_name.path)) == by_name


def test_missing_model_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRLOCK_MODELS", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="'deepseek-7b' not found") as info:
        resolve_base_model("deepseek-7b")
    assert str(tmp_path / "deepseek-7b") in str(info.value) and "bundle" in info.value.hint


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelNotFoundError, match=r"BertModel, not a supported model family"):
        resolve_base_model(str(tmp_path / "bert"))


def test_config_only_model_cannot_be_loaded():
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors weights"):
        load_causal_lm(resolve_base_model("tiny-deepseek-v3"))


def test_tiny_model_is_a_few_million_parameter_qwen2(tiny):
    lm, tokenizer = tiny
    assert type(lm).__name__ == "Qwen2ForCausalLM"
    assert 2_000_000 <= sum(p.numel() for p in lm.parameters()) <= 5_000_000
    for token in (BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.bos_token == BOS and tokenizer.eos_token == EOS


def test_chat_template_is_deepseek_r1(tiny):
    _, tokenizer = tiny
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "<think>\nplan\n</think>\n\nHello"}, {"role": "user", "content": "Bye"}],
        tokenize=False, add_generation_prompt=True)
    # Earlier turns lose their reasoning; the generation prompt opens a new <think> block.
    assert text == (f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜>Hello{EOS}<｜User｜>Bye<｜Assistant｜><think>\n")


def test_generation_continues_like_the_corpus(tiny):
    lm, tokenizer = tiny
    out = generate_text(lm, tokenizer, "Maintenance log. Machine: press line 2.", max_new_tokens=30)
    assert "Reported:" in out or "Cause:" in out or "Action:" in out, out
    assert generate_text(lm, tokenizer, "Report. Examination:", max_new_tokens=12) == \
        generate_text(lm, tokenizer, "Report. Examination:", max_new_tokens=12)  # greedy is deterministic
    answer = generate_text(lm, tokenizer, "The oven 9 shows pressure drop. What should I check first?",
                           max_new_tokens=60, chat=True)
    assert "</think>" in answer


@pytest.mark.parametrize(("name", "architecture"), [("tiny-deepseek-coder", "LlamaForCausalLM"),
                                                    ("tiny-deepseek-v3", "DeepseekV3ForCausalLM")])
def test_config_only_models_build_and_run_a_step(name, architecture):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = resolve_base_model(name)
    assert model.architecture == architecture and not model.has_weights
    config = AutoConfig.from_pretrained(model.path, local_files_only=True)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(model.path, local_files_only=True)
    batch = tokenizer(["Maintenance log. Machine: oven 9."], return_tensors="pt")
    loss = lm(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    names = {n for n, _ in lm.named_modules()}
    if architecture == "DeepseekV3ForCausalLM":
        # MLA projections and a routed MoE layer exist: what the LoRA target rules must handle.
        assert any(n.endswith("self_attn.kv_a_proj_with_mqa") for n in names)
        assert any(n.endswith("mlp.gate") for n in names)
        assert any(n.endswith("mlp.shared_experts.gate_proj") for n in names)
