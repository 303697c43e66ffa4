"""The rules TensorRT sets for an explicitly quantized (Q/DQ) ONNX graph, checked before any engine is built.

    summary = check_qdq_rules(onnx_bytes, float_allowed=("lm_head",))   # raises QdqRuleError naming the node

1. Every QuantizeLinear/DequantizeLinear has a constant, positive, finite scale (an initializer,
   not something computed at run time) and an explicit INT8 zero point that is 0 (symmetric).
2. Per-channel scales only on weights, along axis 0; activations are per tensor (one scale).
3. Every weighted op (Conv, ConvTranspose, Gemm, MatMul with a constant operand) reads both its
   activation and its weight through a DequantizeLinear: Q/DQ sits on the inputs of weighted ops, not
   on their outputs. Ops whose node names contain one of `float_allowed` (e.g. an LM head left in
   float) may stay entirely unquantized.
4. A QuantizeLinear feeds DequantizeLinear nodes only.

TensorRT would otherwise fail at build time with a message about a layer, or worse, build an
engine that silently runs that layer in float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.optimize.errors import QdqRuleError

WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
SHAPE_ONLY_OPS = {"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
"""Ops TensorRT moves Q/DQ across (a DequantizeLinear -> Transpose -> MatMul still quantizes the MatMul)."""
HINT = "re-export the model with `airlock optimize` (QAT/PTQ) instead of editing the ONNX by hand"


@dataclass(frozen=True)
class QdqSummary:
    quantize_nodes: int
    dequantize_nodes: int
    weighted_ops: int
    quantized_weighted_ops: int
    float_weighted_ops: list[str] = field(default_factory=list)
    """Weighted ops left in float because their names matched `float_allowed`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _node_name(node: Any, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


class _Graph:
    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.constants: dict[str, Any] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.index = {id(node): i for i, node in enumerate(self.nodes)}

    def name(self, node: Any) -> str:
        return _node_name(node, self.index[id(node)])

    def constant(self, tensor: str) -> Any:
        """The value of a constant tensor (through Identity), or None when it is computed at run time."""
        seen = 0
        while tensor not in self.constants and seen < 8:
            node = self.producer.get(tensor)
            if node is None or node.op_type != "Identity":
                return None
            tensor, seen = node.input[0], seen + 1
        return self.constants.get(tensor)

    def through_shape_ops(self, tensor: str) -> tuple[str, Any]:
        """Walk back over shape-only ops: (tensor name, producing node or None)."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in SHAPE_ONLY_OPS and tensor not in self.constants:
            tensor = node.input[0]
            node = self.producer.get(tensor)
        return tensor, node

    def reads_dequantized(self, tensor: str) -> bool:
        node = self.through_shape_ops(tensor)[1]
        return node is not None and node.op_type == "DequantizeLinear"

    def is_weight(self, tensor: str) -> bool:
        """Constant, possibly behind shape ops and Q/DQ (a weight stored as float or as INT8)."""
        for _ in range(6):
            tensor, node = self.through_shape_ops(tensor)
            if self.constant(tensor) is not None:
                return True
            if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
                return False
            tensor = node.input[0]
        return False


def _check_qdq_node(g: _Graph, node: Any) -> None:
    import numpy as np

    name = g.name(node)
    if len(node.input) < 3 or not node.input[2]:
        raise QdqRuleError(f"{node.op_type} node '{name}' has no zero point (ONNX then means uint8): TensorRT needs "
                           "an explicit INT8 zero point of 0", hint=HINT)
    scale = g.constant(node.input[1])
    if scale is None:
        producer = g.producer.get(node.input[1])
        made_by = f" (by the {producer.op_type} node '{g.name(producer)}')" if producer is not None else \
            " (it is a graph input)"
        raise QdqRuleError(f"{node.op_type} node '{name}': scale '{node.input[1]}' is computed at run time{made_by}; "
                           "TensorRT needs constant scales (initializers)", hint=HINT)
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise QdqRuleError(f"{node.op_type} node '{name}': scale '{node.input[1]}' has a value that is not "
                           f"positive and finite (min {float(np.min(scale)):g})", hint=HINT)
    zero = g.constant(node.input[2])
    if zero is None:
        raise QdqRuleError(f"{node.op_type} node '{name}': zero point '{node.input[2]}' is computed at run time; "
                           "TensorRT needs a constant zero point of 0", hint=HINT)
    if zero.dtype != np.int8:
        raise QdqRuleError(f"{node.op_type} node '{name}': zero point '{node.input[2]}' is {zero.dtype}, not int8 "
                           "(TensorRT's INT8 range is [-128, 127])", hint=HINT)
    if np.any(zero != 0):
        raise QdqRuleError(f"{node.op_type} node '{name}': zero point '{node.input[2]}' is "
                           f"{int(zero.flat[int(np.flatnonzero(zero)[0])])}, not 0; TensorRT needs symmetric "
                           "quantization", hint=HINT)
    if scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if axis != 0:
            raise QdqRuleError(f"{node.op_type} node '{name}': per-channel scales along axis {axis}; TensorRT "
                               "quantizes weights per output channel, axis 0", hint=HINT)
        if not g.is_weight(node.input[0]):
            raise QdqRuleError(f"{node.op_type} node '{name}': per-channel scales on an activation; TensorRT "
                               "needs one scale per activation tensor", hint=HINT)
    if node.op_type == "QuantizeLinear":
        others = [n.op_type for n in g.consumers.get(node.output[0], []) if n.op_type != "DequantizeLinear"]
        if others:
            raise QdqRuleError(f"QuantizeLinear node '{name}' feeds a {others[0]} node; a QuantizeLinear must be "
                               "followed by DequantizeLinear only", hint=HINT)


def check_qdq_rules(model: Any, *, float_allowed: Sequence[str] = ()) -> QdqSummary:
    """Check an INT8 ONNX model (bytes or ModelProto) against TensorRT's Q/DQ rules; raise on the first break."""
    import onnx

    if isinstance(model, bytes | bytearray):
        model = onnx.load_from_string(bytes(model))
    g = _Graph(model)
    q_nodes = [n for n in g.nodes if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in g.nodes if n.op_type == "DequantizeLinear"]
    if not dq_nodes:
        raise QdqRuleError("this model has no QuantizeLinear/DequantizeLinear nodes: it is not an INT8 (Q/DQ) model",
                           hint="export the int8 variant of a quantized model, or build the fp16/fp32 variant")
    for node in q_nodes + dq_nodes:
        _check_qdq_node(g, node)

    weighted, quantized, floating = 0, 0, []
    for node in g.nodes:
        if node.op_type not in WEIGHTED_OPS:
            continue
        operands = list(node.input[:2])
        if not any(g.is_weight(t) for t in operands):
            continue  # activation x activation (attention scores): no weights to quantize
        weighted += 1
        name = g.name(node)
        via_dq = [g.reads_dequantized(t) for t in operands]
        if all(via_dq):
            quantized += 1
            continue
        if not any(via_dq) and any(f"/{pattern}/" in f"/{name}/" for pattern in float_allowed):
            floating.append(name)
            continue
        missing = via_dq.index(False)
        role = "weight" if g.is_weight(operands[missing]) else "activation"
        output_q = any(c.op_type == "QuantizeLinear" for out in node.output for c in g.consumers.get(out, []))
        where = " (Q/DQ sits on its output instead of its inputs)" if output_q else ""
        raise QdqRuleError(f"{node.op_type} node '{name}': input {missing} ({role} '{operands[missing]}') is not "
                           f"read through a DequantizeLinear{where}; TensorRT needs Q/DQ on every input of a "
                           "weighted op", hint=HINT)
    return QdqSummary(len(q_nodes), len(dq_nodes), weighted, quantized, floating)
