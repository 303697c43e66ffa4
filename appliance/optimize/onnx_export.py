"""Export to ONNX, in memory: image classifiers (dynamic batch) and causal LMs with a flat KV cache.

    onnx_bytes = export_classifier_onnx(model, variant="int8", image_shape=(1, 32, 32))
    onnx_bytes = export_causal_lm_onnx(model, variant="fp16")

Variants: "fp32"; "fp16" (weights and compute in FP16, FP32 logits and pixel inputs, so TensorRT 11
builds it strongly typed without any precision flag); "int8" (a fake-quantized model from
`quantize`, exported as QuantizeLinear/DequantizeLinear with constant scales, weights stored as
INT8 initializers: about 4x smaller than FP32).

The result is bytes, never a file: a fine-tuned model is customer data and the caller encrypts it
into the vault. The legacy TorchScript exporter (`dynamo=False`, opset 17) is used on purpose: it
maps `torch.fake_quantize_*` to Q/DQ and folds constants, so scales end up as initializers.
A single in-memory ONNX file is capped by protobuf at 2 GiB; bigger models are refused here.
Exporting leaves the caller's model in eval mode with gradients off (what tracing needs); the fp16
variant is exported from a half-precision copy.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Iterator
from typing import Any

from appliance.optimize.errors import ExportError, ExportRefusedError

VARIANTS = ("fp32", "fp16", "int8")
OPSET = 17
MAX_ONNX_BYTES = 2 * 1024**3 - 64 * 1024**2
"""protobuf's 2 GiB limit on one serialized message, less room for the graph itself."""
MOE_MODEL_TYPES = {"deepseek_v3", "deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe"}


def architecture(config: Any) -> str:
    names = getattr(config, "architectures", None) or []
    return names[0] if names else type(config).__name__.removesuffix("Config")


def check_exportable(config: Any) -> None:
    """Refuse models whose ONNX export cannot work, before any time is spent on them."""
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_local_experts", None) or 0
    if getattr(config, "model_type", "") in MOE_MODEL_TYPES or experts:
        raise ExportRefusedError(
            f"{architecture(config)} is a mixture-of-experts model: its routing (top-k expert selection, "
            "aten::histc/aten::diff) does not export to ONNX, so there is no ONNX or TensorRT engine for it",
            hint="serve it with PyTorch (the appliance does this automatically); quantize a dense model for TensorRT")


def kv_cache_layout(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a causal LM's KV cache."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads, head_dim


def _check_variant(model: Any, variant: str) -> None:
    from appliance.optimize.fake_quant import is_fake_quantized

    if variant not in VARIANTS:
        raise ExportError(f"unknown ONNX variant {variant!r}", hint=f"use one of {', '.join(VARIANTS)}")
    quantized = is_fake_quantized(model)
    if variant == "int8" and not quantized:
        raise ExportError("the int8 variant needs a fake-quantized model (PTQ or QAT) and this one is float",
                          hint="run quantize_classifier / quantize_causal_lm first, or export fp32 or fp16")
    if variant != "int8" and quantized:
        raise ExportError(f"this model is fake-quantized; exporting it as {variant} would bake the quantization "
                          "error into a float model", hint="export it as int8, or export the float model")
    size = sum(p.numel() * (2 if variant == "fp16" else p.element_size()) for p in model.parameters())
    if size > MAX_ONNX_BYTES:
        raise ExportRefusedError(f"{architecture(model.config)} has {size / 1024**3:.1f} GiB of weights; an in-memory "
                                 "ONNX model holds at most 2 GiB", hint="serve this model with PyTorch")


def _prepared(model: Any, variant: str) -> Any:
    model.eval().requires_grad_(False)
    if variant == "fp16":
        return copy.deepcopy(model).half()  # the caller's model stays FP32
    return model


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    import torch

    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (see the module docstring); tracing warnings
        # about Python values in transformers' code are expected and say nothing to an operator.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _export(graph: Any, args: tuple[Any, ...], *, name: str, input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]]) -> bytes:
    import torch

    buffer = io.BytesIO()
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(graph, args, buffer, dynamo=False, opset_version=OPSET, do_constant_folding=True,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        raise ExportRefusedError(f"{name} uses an operator ONNX opset {OPSET} lacks: {str(exc).splitlines()[0]}",
                                 hint="serve this model with PyTorch") from exc
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"ONNX export of {name} failed: {first}",
                          hint="run with --debug for the traceback; serve this model with PyTorch meanwhile") from exc
    return buffer.getvalue()


def export_classifier_onnx(model: Any, *, variant: str, image_shape: tuple[int, int, int]) -> bytes:
    """pixel_values [batch, C, H, W] float32 -> logits [batch, classes] float32, batch dynamic."""
    import torch

    from appliance.optimize.export_graphs import ClassifierGraph

    _check_variant(model, variant)
    graph = ClassifierGraph(_prepared(model, variant))
    example = torch.rand(2, *image_shape)
    data = _export(graph, (example,), name=architecture(model.config), input_names=["pixel_values"],
                   output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    return fold_weight_quantizers(data) if variant == "int8" else data


def export_causal_lm_onnx(model: Any, *, variant: str) -> bytes:
    """A causal LM with a flat KV cache (see `export_graphs.FlatKVCausalLM`); batch, sequence and past are dynamic."""
    import torch

    from appliance.optimize.export_graphs import FlatKVCausalLM, causal_lm_io_names

    check_exportable(model.config)
    _check_variant(model, variant)
    graph = FlatKVCausalLM(_prepared(model, variant))
    layers, kv_heads, head_dim = kv_cache_layout(model.config)
    dtype = torch.float16 if variant == "fp16" else torch.float32
    # Distinct sizes (batch 2, sequence 3, past 5) so that no dynamic axis is mistaken for another while tracing.
    batch, sequence, past = 2, 3, 5
    vocab = model.config.get_text_config(decoder=True).vocab_size
    args = (torch.randint(0, vocab, (batch, sequence)), torch.ones(batch, past + sequence, dtype=torch.int64),
            torch.arange(past, past + sequence).expand(batch, -1).contiguous(),
            *[torch.zeros(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * layers)])
    input_names, output_names = causal_lm_io_names(layers)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past"} for name in input_names[3:]})
    axes.update({name: {0: "batch", 2: "total"} for name in output_names[1:]})
    data = _export(graph, args, name=architecture(model.config), input_names=input_names, output_names=output_names,
                   dynamic_axes=axes)
    return fold_weight_quantizers(data) if variant == "int8" else data


def fold_weight_quantizers(onnx_bytes: bytes) -> bytes:
    """QuantizeLinear on a constant weight -> an INT8 initializer read by the DequantizeLinear.

    Same numbers (ONNX and torch both round half to even), a quarter of the size, and the form
    TensorRT documents for quantized weights. Float weights nothing else reads are dropped.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    _inline_constant_identities(graph)
    initializers = {init.name: init for init in graph.initializer}
    renamed: dict[str, str] = {}
    kept_nodes = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) == 3 and all(n in initializers for n in node.input):
            weight, scale, zero = (numpy_helper.to_array(initializers[n]) for n in node.input)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and scale.size > 1:
                shape = [1] * weight.ndim
                shape[axis] = scale.size
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            quantized = np.clip(np.rint(weight / scale) + zero.astype(np.int32), -128, 127).astype(np.int8)
            name = f"{node.input[0]}_int8"
            graph.initializer.append(numpy_helper.from_array(quantized, name))
            renamed[node.output[0]] = name
            continue
        kept_nodes.append(node)
    for node in kept_nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return model.SerializeToString()


def _inline_constant_identities(graph: Any) -> None:
    """The exporter shares equal constants (e.g. all-zero zero points) through Identity nodes: read them directly."""
    initializers = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {node.output[0]: node.input[0] for node in graph.node
             if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs}
    kept = [node for node in graph.node if not (node.op_type == "Identity" and node.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(kept)
