"""The TensorRT 10 / 11 differences the engine builder touches, in one place, chosen at run time.

TensorRT 11 removed weak typing: BuilderFlag.FP16/INT8/BF16, calibrators and the precision-constraint
flags are gone. Every network is strongly typed (the STRONGLY_TYPED creation flag is still accepted,
deprecated and ignored): INT8 comes only from Q/DQ nodes and FP16 only from an ONNX already in FP16.
TensorRT 10.x has both worlds. We build strongly typed on 10.x as well, so one ONNX variant means
the same engine precision on both; the 10.x-only `weak_fp16` option lets TensorRT pick FP16
kernels for an FP32 (or Q/DQ) ONNX, the old way, for sites that stay on 10.x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.optimize.errors import EngineError

SUPPORTED_MAJORS = (10, 11)


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError("TensorRT is not installed on this machine",
                          hint="models are served through ONNX Runtime here; for engines, install the GPU bundle "
                               "that ships TensorRT wheels for this CUDA version") from exc
    return tensorrt


@dataclass(frozen=True)
class TensorRTApi:
    version: str
    major: int

    def network_flags(self, trt: Any, *, weak_fp16: bool) -> int:
        """Flags for `Builder.create_network`."""
        if self.major >= 11:
            return 0  # strongly typed always; the flag is deprecated there
        if weak_fp16:
            return 0  # weakly typed, so that BuilderFlag.FP16 may choose FP16 kernels
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def precision_flags(self, trt: Any, *, variant: str, weak_fp16: bool) -> list[Any]:
        """Builder flags that choose precisions; none on a strongly typed network (the ONNX decides)."""
        if not weak_fp16:
            return []
        if self.major >= 11:
            raise EngineError(f"TensorRT {self.version} has no FP16 builder flag (strongly typed networks only)",
                              hint="export the fp16 variant of the model and build that instead")
        if variant == "fp16":
            return []  # already FP16 in the graph
        flags = [trt.BuilderFlag.FP16]
        if variant == "int8":
            flags.append(trt.BuilderFlag.INT8)  # weakly typed Q/DQ networks on 10.x need INT8 enabled
        return flags

    def hardware_compatibility(self, trt: Any, level: str) -> Any:
        names = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
        value = getattr(trt.HardwareCompatibilityLevel, names[level], None)
        if value is None:
            raise EngineError(f"TensorRT {self.version} has no hardware compatibility level {level!r}",
                              hint="use hardware_compatibility = \"ampere_plus\" or \"none\"")
        return value


def tensorrt_api(trt: Any) -> TensorRTApi:
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major not in SUPPORTED_MAJORS:
        raise EngineError(f"TensorRT {version} is not supported (10.x and 11.x are)",
                          hint="install the TensorRT wheels from an Airlock GPU bundle")
    return TensorRTApi(version, major)
