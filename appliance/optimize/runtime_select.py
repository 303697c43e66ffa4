"""Which runtime serves a model on this machine, and why: TensorRT -> ORT CUDA -> ORT CPU -> PyTorch.

    choice = select_runtime(onnx_bytes=onnx, engine_plan=plan, engine_sidecar=sidecar, pytorch_runner=load_torch)
    choice.kind      # "tensorrt" | "ort-cuda" | "ort-cpu" | "pytorch"
    choice.reason    # "ONNX Runtime on the CPU: TensorRT engine: TensorRT is not installed; ..."
    choice.runner.run({"pixel_values": ...})

Each faster runtime that was passed over gets one line in `choice.skipped`, so the UI can say
why a model is slower than it could be. ONNX Runtime quietly falls back to the CPU when its CUDA
provider cannot start (missing CUDA or cuDNN libraries); this module checks the session's actual
providers and calls that what it is instead of "GPU".
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import AirlockError
from appliance.optimize.engine_sidecar import MachineInfo, current_machine
from appliance.optimize.errors import EngineError

CUDA_PROVIDER = "CUDAExecutionProvider"
LABELS = {"tensorrt": "TensorRT engine", "ort-cuda": "ONNX Runtime on the GPU (CUDA)",
          "ort-cpu": "ONNX Runtime on the CPU", "pytorch": "PyTorch"}


@dataclass
class RuntimeChoice:
    kind: str
    reason: str
    runner: Any
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "skipped": self.skipped, "warnings": self.warnings}


def _try_tensorrt(plan: bytes | None, sidecar: dict[str, Any] | None, machine: MachineInfo,
                  warnings: list[str]) -> tuple[Any, str]:
    from appliance.optimize.engine_sidecar import check_sidecar
    from appliance.optimize.tensorrt_engine import load_engine

    if plan is None or sidecar is None:
        return None, "no engine was built for this model"
    if importlib.util.find_spec("tensorrt") is None or machine.tensorrt is None:
        return None, "TensorRT is not installed"
    if machine.sm is None:
        return None, "this machine has no usable NVIDIA GPU"
    try:
        warnings += check_sidecar(sidecar, machine, plan_bytes=plan)
        return load_engine(plan, sidecar, machine=machine), ""
    except AirlockError as exc:
        return None, exc.message


def _try_ort_cuda(onnx_bytes: bytes | None, machine: MachineInfo, device: int) -> tuple[Any, str]:
    import onnxruntime as ort

    from appliance.optimize.runners import OrtRunner, ort_session

    if onnx_bytes is None:
        return None, "no ONNX export of this model"
    if CUDA_PROVIDER not in ort.get_available_providers():
        return None, "this onnxruntime build has no CUDA provider (onnxruntime, not onnxruntime-gpu)"
    if machine.sm is None:
        return None, "this machine has no usable NVIDIA GPU"
    try:
        session = ort_session(onnx_bytes, providers=[(CUDA_PROVIDER, {"device_id": device}), "CPUExecutionProvider"])
    except EngineError as exc:
        return None, exc.message
    if CUDA_PROVIDER not in session.get_providers():
        return None, ("the CUDA provider did not start (CUDA or cuDNN libraries missing or mismatched), so the "
                      "session would have run on the CPU")
    return OrtRunner(session), ""


def select_runtime(*, onnx_bytes: bytes | None = None, engine_plan: bytes | None = None,
                   engine_sidecar: dict[str, Any] | None = None, cpu_onnx_bytes: bytes | None = None,
                   pytorch_runner: Callable[[], Any] | None = None, allow_cpu: bool = True, device: int = 0,
                   machine: MachineInfo | None = None) -> RuntimeChoice:
    """The fastest runtime that works here, with the reason; `allow_cpu=False` refuses to serve ONNX on the CPU.

    `onnx_bytes` is what ORT runs on the GPU (the Q/DQ INT8 or FP16 export); `cpu_onnx_bytes` (default:
    the same) what it runs on the CPU. Give the FP32 export there: ORT's CPU kernels run INT8 only in
    DQ -> op -> Q units, so TensorRT-style Q/DQ runs as fake quantization, about 0.7x of FP32's speed.
    """
    from appliance.optimize.runners import OrtRunner, ort_session

    machine = machine or current_machine(device)
    skipped: list[str] = []
    warnings: list[str] = []

    def choose(kind: str, runner: Any) -> RuntimeChoice:
        detail = ""
        if kind == "tensorrt":
            detail = f" (SM {machine.sm}, TensorRT {machine.tensorrt})"
        elif kind == "ort-cuda":
            detail = f" ({machine.gpu})"
        reason = LABELS[kind] + detail
        if skipped:
            reason += " because " + "; ".join(skipped)
        return RuntimeChoice(kind, reason, runner, skipped, warnings)

    runner, why = _try_tensorrt(engine_plan, engine_sidecar, machine, warnings)
    if runner is not None:
        return choose("tensorrt", runner)
    skipped.append(f"TensorRT engine: {why}")
    runner, why = _try_ort_cuda(onnx_bytes, machine, device)
    if runner is not None:
        return choose("ort-cuda", runner)
    skipped.append(f"ONNX Runtime CUDA: {why}")
    cpu_onnx = cpu_onnx_bytes if cpu_onnx_bytes is not None else onnx_bytes
    if not allow_cpu:
        why = "serving on the CPU is not allowed for this model"
    elif cpu_onnx is None:
        why = "no ONNX export of this model"
    else:
        try:
            return choose("ort-cpu", OrtRunner(ort_session(cpu_onnx)))
        except EngineError as exc:
            why = exc.message
    skipped.append(f"ONNX Runtime CPU: {why}")
    if pytorch_runner is not None:
        return choose("pytorch", pytorch_runner())
    raise EngineError(f"no runtime can serve this model: {'; '.join(skipped)}",
                      hint="export the model to ONNX (`airlock optimize`), or allow CPU serving")
