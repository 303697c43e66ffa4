"""Errors of the optimize stage. All are `AirlockError`s: one line that names the model, node or engine, and a hint.

    OptimizeError            quantization or export cannot go on (bad recipe, data never reached a layer)
      ExportRefusedError     this model cannot be exported to ONNX at all (MoE, over 2 GiB); PyTorch serves it
      ExportError            the exporter or the ONNX checker failed on this model
      QdqRuleError           an INT8 graph breaks a TensorRT Q/DQ rule; the message names the node
      ParityError            the ONNX model's outputs differ from PyTorch's by more than the tolerance
      EngineError            TensorRT is missing, or the build or the load failed
        EngineMismatchError  an engine was built for another GPU, TensorRT or CUDA than this machine's
"""

from __future__ import annotations

from appliance.errors import AirlockError


class OptimizeError(AirlockError):
    """Quantization or export cannot go on."""


class ExportRefusedError(OptimizeError):
    """The model cannot be exported to ONNX; it is served by PyTorch instead."""


class ExportError(OptimizeError):
    """torch.onnx.export or the ONNX checker failed."""


class QdqRuleError(OptimizeError):
    """A quantized ONNX graph breaks a rule TensorRT needs (symmetric, constant scales, Q/DQ on weighted inputs)."""


class ParityError(OptimizeError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the variant's tolerance."""


class EngineError(OptimizeError):
    """TensorRT is missing, or building or loading an engine failed."""


class EngineMismatchError(EngineError):
    """An engine does not fit this machine (GPU compute capability, TensorRT or CUDA version)."""
