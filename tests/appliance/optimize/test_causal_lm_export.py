"""The LM path on CPU: LoRA merged -> ONNX with a flat KV cache -> greedy decoding on ORT equals PyTorch;
PTQ/QAT perplexity against the float model; the INT8 export passes the Q/DQ rules; MoE is refused clearly."""

from __future__ import annotations

import copy

import onnx
import pytest

from appliance.optimize.errors import ExportRefusedError
from appliance.optimize.onnx_export import check_exportable, export_causal_lm_onnx, export_classifier_onnx
from appliance.optimize.validate import validate_causal_lm_export


def test_merged_lora_model_computes_what_the_adapter_did(lora_merged_lm):
    import torch

    merged = lora_merged_lm["model"]
    assert not any("lora_" in name for name, _ in merged.named_modules())
    with torch.no_grad():
        logits = merged(input_ids=lora_merged_lm["probe"]).logits
    assert torch.allclose(logits, lora_merged_lm["peft_logits"], atol=1e-4)


def test_fp32_export_decodes_through_its_kv_cache_like_pytorch(lora_merged_lm, lm_data):
    model = lora_merged_lm["model"]
    exported = export_causal_lm_onnx(model, variant="fp32")
    report = validate_causal_lm_export(exported, model, lm_data["prompts"], variant="fp32", decode_tokens=8)
    parity = report["parity"]
    assert report["ok"], report["failures"]
    assert parity["greedy_equal"] and all(len(g["onnx"]) == 8 for g in parity["greedy"])
    assert parity["max_abs_diff"] < 1e-3 and parity["top1_agreement"] == 1.0
    graph = onnx.load_from_string(exported).graph
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3:5] == ["past_key_0", "past_value_0"]
    assert len(names) == 3 + 2 * model.config.num_hidden_layers
    past = graph.input[3].type.tensor_type.shape.dim
    assert past[0].dim_param == "batch" and past[2].dim_param == "past"  # dynamic batch and past
    assert [o.name for o in graph.output][:3] == ["logits", "present_key_0", "present_value_0"]


def test_ptq_and_qat_perplexity_against_float(quantized_lm):
    report = quantized_lm.report
    float_ppl, ptq_ppl, qat_ppl = (report[k]["perplexity"] for k in ("float", "ptq", "qat"))
    assert 1.0 < float_ppl < 50
    # 7 projections x 6 layers quantized, the LM head left in float (the recipe's default).
    assert report["quantized_layers"] == 42 and report["calibration_batches"] >= 4
    assert ptq_ppl < float_ppl * 1.1 and qat_ppl < float_ppl * 1.1
    assert report["qat_steps"] == 4 and report["qat_lr"] == pytest.approx(3e-5)


def test_int8_export_follows_the_qdq_rules_and_matches_the_fake_quant_model(quantized_lm, lm_data):
    exported = export_causal_lm_onnx(quantized_lm.model, variant="int8")
    report = validate_causal_lm_export(exported, quantized_lm.model, lm_data["prompts"], variant="int8",
                                       decode_tokens=4, float_allowed=("lm_head",))
    assert report["ok"], report["failures"]
    qdq = report["qdq"]
    assert qdq["quantized_weighted_ops"] == 42 and qdq["float_weighted_ops"] == ["/model/lm_head/MatMul"]
    assert report["parity"]["top1_agreement"] >= 0.95
    # Attention score MatMuls (activation x activation) carry no weights and need no Q/DQ.
    assert qdq["weighted_ops"] == 43


def test_fp16_export_is_half_the_size_and_close(lora_merged_lm, lm_data):
    model = lora_merged_lm["model"]
    exported = export_causal_lm_onnx(model, variant="fp16")
    report = validate_causal_lm_export(exported, copy.deepcopy(model).half(), lm_data["prompts"][:1],
                                       variant="fp16", decode_tokens=4)
    assert report["ok"], report["failures"]
    graph = onnx.load_from_string(exported).graph
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert types["input_ids"] == onnx.TensorProto.INT64 and types["past_key_0"] == onnx.TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # logits stay fp32 for sampling
    assert report["bytes"] < 0.6 * len(export_causal_lm_onnx(model, variant="fp32"))


def test_deepseek_v3_moe_is_refused_with_the_reason():
    from transformers import AutoConfig

    from appliance.base_models import resolve_base_model

    config = AutoConfig.from_pretrained(resolve_base_model("tiny-deepseek-v3").path, local_files_only=True)
    with pytest.raises(ExportRefusedError, match=r"DeepseekV3ForCausalLM is a mixture-of-experts model.*"
                                                 r"does not export to ONNX") as caught:
        check_exportable(config)
    assert "PyTorch" in caught.value.hint
    # The model itself (random weights from the config) is refused before any tracing or quantizing starts.
    from transformers import AutoModelForCausalLM

    from appliance.optimize.quantize import quantize_causal_lm
    from appliance.optimize.recipe import QuantRecipe

    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ExportRefusedError, match="DeepseekV3ForCausalLM is a mixture-of-experts model"):
        export_causal_lm_onnx(model, variant="fp32")
    with pytest.raises(ExportRefusedError, match="DeepseekV3ForCausalLM is a mixture-of-experts model"):
        quantize_causal_lm(model, calibration_batches=[], train_batches=[], eval_batches=[], recipe=QuantRecipe(),
                           original_steps=10, original_lr=1e-4)


def test_an_operator_onnx_lacks_becomes_one_clear_line(trained_classifier_state):
    import torch

    from tests.appliance.optimize.conftest import IMAGE_SHAPE, load_trained_classifier

    model = load_trained_classifier(trained_classifier_state)

    class Histogram(torch.nn.Module):  # the op that sinks MoE routing, in a model small enough to try
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.histc(x, bins=4).sum()

    model.resnet.embedder.pooler = torch.nn.Sequential(model.resnet.embedder.pooler, Histogram())
    with pytest.raises(ExportRefusedError, match=r"ResNetForImageClassification uses an operator ONNX opset 17 "
                                                 r"lacks: .*histc"):
        export_classifier_onnx(model, variant="fp32", image_shape=IMAGE_SHAPE)
