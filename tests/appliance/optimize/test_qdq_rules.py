"""TensorRT's Q/DQ rules: the real INT8 export passes; hand-broken copies fail with the node named."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from appliance.optimize.errors import QdqRuleError
from appliance.optimize.qdq_rules import check_qdq_rules


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


@pytest.fixture
def int8_model(int8_classifier_onnx) -> onnx.ModelProto:
    return onnx.load_from_string(int8_classifier_onnx)


def test_the_real_int8_export_passes(int8_model):
    summary = check_qdq_rules(int8_model)
    assert summary.weighted_ops == summary.quantized_weighted_ops == 7 and summary.float_weighted_ops == []
    assert summary.quantize_nodes >= 8 and summary.dequantize_nodes >= 15  # activations (+ residuals) and weights


def test_non_zero_zero_point_is_rejected_naming_the_node(int8_model):
    node = _nodes(int8_model, "QuantizeLinear")[0]
    int8_model.graph.initializer.append(numpy_helper.from_array(np.array(3, dtype=np.int8), "broken_zero_point"))
    node.input[2] = "broken_zero_point"
    with pytest.raises(QdqRuleError, match=rf"QuantizeLinear node '{node.name}': zero point 'broken_zero_point' is 3, "
                                           r"not 0; TensorRT needs symmetric quantization"):
        check_qdq_rules(int8_model)


def test_scale_computed_at_run_time_is_rejected(int8_model):
    node = _nodes(int8_model, "DequantizeLinear")[0]
    int8_model.graph.node.append(helper.make_node("Abs", [node.input[1]], ["computed_scale"], name="make_scale"))
    node.input[1] = "computed_scale"
    with pytest.raises(QdqRuleError, match=rf"DequantizeLinear node '{node.name}': scale 'computed_scale' is "
                                           r"computed at run time \(by the Abs node 'make_scale'\); TensorRT needs "
                                           r"constant scales"):
        check_qdq_rules(int8_model)


def test_scale_fed_as_graph_input_is_rejected(int8_model):
    node = _nodes(int8_model, "QuantizeLinear")[0]
    int8_model.graph.input.append(helper.make_tensor_value_info("scale_from_outside", onnx.TensorProto.FLOAT, []))
    node.input[1] = "scale_from_outside"
    with pytest.raises(QdqRuleError, match="is computed at run time \\(it is a graph input\\)"):
        check_qdq_rules(int8_model)


def test_negative_scale_and_missing_zero_point_are_rejected(int8_model):
    node = _nodes(int8_model, "DequantizeLinear")[-1]
    int8_model.graph.initializer.append(numpy_helper.from_array(np.array(-0.5, dtype=np.float32), "negative_scale"))
    node.input[1] = "negative_scale"
    with pytest.raises(QdqRuleError, match="not positive and finite"):
        check_qdq_rules(int8_model)
    del node.input[1:]
    node.input.append("negative_scale")
    with pytest.raises(QdqRuleError, match="has no zero point \\(ONNX then means uint8\\)"):
        check_qdq_rules(int8_model)


def test_conv_reading_a_float_activation_is_rejected(int8_model):
    produced_by = {out: node for node in int8_model.graph.node for out in node.output}
    conv = _nodes(int8_model, "Conv")[1]
    dequantize = produced_by[conv.input[0]]
    conv.input[0] = produced_by[dequantize.input[0]].input[0]  # skip its Q/DQ pair: the float tensor
    with pytest.raises(QdqRuleError, match=rf"Conv node '{conv.name}': input 0 \(activation '.*'\) is not read through "
                                           r"a DequantizeLinear; TensorRT needs Q/DQ on every input of a weighted op"):
        check_qdq_rules(int8_model)


def test_per_channel_weights_on_the_wrong_axis_are_rejected(int8_model):
    produced_by = {out: node for node in int8_model.graph.node for out in node.output}
    weight_dq = produced_by[_nodes(int8_model, "Conv")[0].input[1]]
    next(a for a in weight_dq.attribute if a.name == "axis").i = 1
    with pytest.raises(QdqRuleError, match=rf"'{weight_dq.name}': per-channel scales along axis 1"):
        check_qdq_rules(int8_model)


def _tiny_conv_model(quantize_output: bool) -> onnx.ModelProto:
    """x -> Conv(w) -> (Q/DQ on the output, the classic mistake) -> y."""
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "z")
    weight = numpy_helper.from_array(np.ones((2, 1, 3, 3), dtype=np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    if quantize_output:
        nodes += [helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"], name="q_out"),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq_out")]
    else:
        nodes += [helper.make_node("Identity", ["c"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 5, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [scale, zero, weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_qdq_on_outputs_instead_of_inputs_is_named_as_such():
    with pytest.raises(QdqRuleError, match=r"Conv node 'conv': input 0 .* \(Q/DQ sits on its output instead of its "
                                           r"inputs\)"):
        check_qdq_rules(_tiny_conv_model(quantize_output=True))


def test_a_float_model_is_not_an_int8_model():
    with pytest.raises(QdqRuleError, match="has no QuantizeLinear/DequantizeLinear nodes"):
        check_qdq_rules(_tiny_conv_model(quantize_output=False).SerializeToString())
