"""The classifier path end to end on CPU: trained model -> PTQ -> QAT -> ONNX (fp32, fp16, Q/DQ int8) -> ORT parity."""

from __future__ import annotations

import onnx
import pytest

from appliance.optimize.errors import ExportError
from appliance.optimize.onnx_export import export_classifier_onnx
from appliance.optimize.validate import validate_classifier_export
from tests.appliance.optimize.conftest import IMAGE_SHAPE, load_trained_classifier


def test_ptq_and_qat_are_reported_against_the_float_model(quantized_classifier):
    report = quantized_classifier.report
    assert report["task"] == "classifier"
    assert report["float"]["accuracy"] > 0.8, "the trained float model must separate discs from squares"
    # INT8 (per-channel weights, per-tensor activations) costs this toy model next to nothing; a wrong scale,
    # axis or zero point would drop it towards chance (0.5).
    assert report["ptq"]["accuracy"] >= report["float"]["accuracy"] - 0.05
    assert report["qat"]["accuracy"] >= report["float"]["accuracy"] - 0.05
    assert report["qat_steps"] == 6 and report["qat_steps_done"] == 6   # 10% of 60 steps
    assert report["qat_lr"] == pytest.approx(3e-5)                        # 1% of 3e-3
    assert report["folded_batch_norms"] == 6 and report["quantized_layers"] == 7  # 6 convs + the head
    assert report["calibration_batches"] == 8


def test_exports_validate_against_pytorch_on_onnx_runtime(trained_classifier_state, quantized_classifier,
                                                          int8_classifier_onnx, classifier_data):
    import copy

    float_model = load_trained_classifier(trained_classifier_state)
    held_out = classifier_data["test"]
    fp32 = export_classifier_onnx(float_model, variant="fp32", image_shape=IMAGE_SHAPE)
    fp16 = export_classifier_onnx(float_model, variant="fp16", image_shape=IMAGE_SHAPE)

    r32 = validate_classifier_export(fp32, float_model, held_out, variant="fp32")
    r16 = validate_classifier_export(fp16, copy.deepcopy(float_model).half(), held_out, variant="fp16")
    r8 = validate_classifier_export(int8_classifier_onnx, quantized_classifier.model, held_out, variant="int8")
    for report in (r32, r16, r8):
        assert report["ok"] and report["checker"] == "ok" and report["opset"] == 17, report["failures"]
        assert report["parity"]["samples"] == 64
    assert r32["parity"]["max_abs_diff"] < 1e-4 and r32["parity"]["top1_agreement"] == 1.0
    assert r16["parity"]["top1_agreement"] >= 0.97
    assert r8["parity"]["top1_agreement"] >= 0.95
    assert r8["parity"]["accuracy_onnx"] >= r32["parity"]["accuracy_onnx"] - 0.05
    assert r32["qdq"] is None and r8["qdq"]["quantized_weighted_ops"] == r8["qdq"]["weighted_ops"] == 7
    # Weights are stored as INT8 initializers: smaller than FP16, let alone FP32.
    assert r8["bytes"] < r16["bytes"] < r32["bytes"]
    int8_initializers = [i for i in onnx.load_from_string(int8_classifier_onnx).graph.initializer if i.data_type == 3]
    assert len(int8_initializers) >= 7


def test_int8_graph_has_qdq_on_weighted_inputs_and_the_residual_branch(int8_classifier_onnx):
    graph = onnx.load_from_string(int8_classifier_onnx).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert [produced_by[name].op_type for name in node.input[:2]] == ["DequantizeLinear"] * 2, node.name
    adds = [node for node in graph.node if node.op_type == "Add"]
    assert len(adds) == 2 and all(any(produced_by[i].op_type == "DequantizeLinear" for i in add.input)
                                  for add in adds)
    assert [i.name for i in graph.input] == ["pixel_values"] and graph.input[0].type.tensor_type.elem_type == 1


def test_variant_must_match_the_model(trained_classifier_state, quantized_classifier):
    with pytest.raises(ExportError, match="needs a fake-quantized model"):
        export_classifier_onnx(load_trained_classifier(trained_classifier_state), variant="int8",
                               image_shape=IMAGE_SHAPE)
    with pytest.raises(ExportError, match="bake the quantization error"):
        export_classifier_onnx(quantized_classifier.model, variant="fp32", image_shape=IMAGE_SHAPE)
    with pytest.raises(ExportError, match="unknown ONNX variant 'int4'"):
        export_classifier_onnx(quantized_classifier.model, variant="int4", image_shape=IMAGE_SHAPE)


def test_parity_failure_is_reported_and_raised(trained_classifier_state, classifier_data):
    from appliance.optimize.errors import ParityError

    model = load_trained_classifier(trained_classifier_state)
    exported = export_classifier_onnx(model, variant="fp32", image_shape=IMAGE_SHAPE)
    import torch

    with torch.no_grad():  # the model drifts after export: the ONNX no longer matches it
        model.classifier[1].bias.add_(torch.tensor([3.0, -3.0]))
    report = validate_classifier_export(exported, model, classifier_data["test"], variant="fp32", strict=False)
    assert not report["ok"] and any("relative difference" in f for f in report["failures"])
    with pytest.raises(ParityError, match="fp32 ONNX export differs from PyTorch"):
        validate_classifier_export(exported, model, classifier_data["test"], variant="fp32")
