"""What a TensorRT engine is bound to, written beside it as JSON and checked before it is deserialized.

    sidecar = make_sidecar(machine=current_machine(), onnx_bytes=..., plan_bytes=..., ...)
    warnings = check_sidecar(sidecar, current_machine(), plan_bytes=plan)   # raises EngineMismatchError

An engine (a "plan") holds kernels compiled for one GPU architecture by one TensorRT version:
loading it elsewhere fails, or worse, runs. So the sidecar records the TensorRT version, CUDA,
driver, GPU name and compute capability (SM), the optimization profiles, the I/O dtypes, the
SHA-256 of the ONNX it came from and of the plan itself, and the quantization recipe; and the
check refuses a mismatch with one line that says what to do. Version-compatible engines may load
in a later TensorRT; hardware-compatible ones (Ampere+) on any SM >= 8.0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.optimize.errors import EngineError, EngineMismatchError

SIDECAR_FORMAT = "airlock-engine/v1"
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
REBUILD = "rebuild with `airlock engine build`"


@dataclass(frozen=True)
class MachineInfo:
    gpu: str | None
    """GPU name, e.g. "NVIDIA H100 80GB HBM3"; None without a usable NVIDIA GPU."""
    sm: str | None
    """Compute capability "major.minor", e.g. "9.0"."""
    tensorrt: str | None
    cuda: str | None
    """CUDA runtime version torch was built with, e.g. "12.8"."""
    driver: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        result = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def current_machine(device: int = 0) -> MachineInfo:
    """This machine's GPU (the one jobs use: `device`), TensorRT, CUDA and driver."""
    import torch

    tensorrt: str | None = None
    if importlib.util.find_spec("tensorrt") is not None:
        import tensorrt as trt  # the module's version: the wheel's name varies (tensorrt, tensorrt-cu12, ...)

        tensorrt = str(trt.__version__)
    if not torch.cuda.is_available():
        return MachineInfo(None, None, tensorrt, torch.version.cuda, _driver_version())
    major, minor = torch.cuda.get_device_capability(device)
    return MachineInfo(torch.cuda.get_device_name(device), f"{major}.{minor}", tensorrt, torch.version.cuda,
                       _driver_version())


def make_sidecar(*, machine: MachineInfo, onnx_bytes: bytes, plan_bytes: bytes, variant: str,
                 profiles: list[dict[str, list[list[int]]]], io: list[dict[str, Any]], options: dict[str, Any],
                 quant_recipe: dict[str, Any] | None) -> dict[str, Any]:
    return {"format": SIDECAR_FORMAT, "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tensorrt": machine.tensorrt, "cuda": machine.cuda, "driver": machine.driver, "gpu": machine.gpu,
            "sm": machine.sm, "variant": variant, "profiles": profiles, "io": io, "options": options,
            "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(), "plan_bytes": len(plan_bytes),
            "quant_recipe": quant_recipe}


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _sm_tuple(sm: str) -> tuple[int, int]:
    major, _, minor = sm.partition(".")
    return int(major), int(minor or 0)


def check_sidecar(sidecar: dict[str, Any], machine: MachineInfo, *, plan_bytes: bytes | None = None) -> list[str]:
    """Refuse an engine that this machine cannot (or should not) run; return warnings for what may merely differ."""
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise EngineError("the engine's sidecar is missing or not an Airlock engine description",
                          hint=f"engines are loaded only with the sidecar written when they were built; {REBUILD}")
    missing = [key for key in ("tensorrt", "sm", "plan_sha256", "options") if not sidecar.get(key)]
    if missing:
        raise EngineError(f"the engine's sidecar lacks {', '.join(missing)}", hint=REBUILD)
    if plan_bytes is not None and hashlib.sha256(plan_bytes).hexdigest() != sidecar["plan_sha256"]:
        raise EngineMismatchError("the engine file does not match its sidecar (SHA-256 differs)",
                                  hint=f"the plan was replaced or damaged; {REBUILD}")
    built = f"SM {sidecar['sm']}/TRT {sidecar['tensorrt']}"
    here = f"SM {machine.sm or '-'}/TRT {machine.tensorrt or '-'}"
    head = f"engine built for {built}, this is {here} — {REBUILD}"
    if machine.sm is None:
        raise EngineMismatchError(f"engine built for {built}, this machine has no usable NVIDIA GPU",
                                  hint="serve the model's ONNX export through ONNX Runtime instead")
    if machine.tensorrt is None:
        raise EngineMismatchError(f"engine built for {built}, this machine has no TensorRT",
                                  hint="serve the model's ONNX export through ONNX Runtime, or install TensorRT")
    options = sidecar["options"]
    level = options.get("hardware_compatibility", "none")
    if level == "ampere_plus":
        if _sm_tuple(machine.sm) < (8, 0):
            raise EngineMismatchError(head, hint="this engine runs on Ampere (SM 8.0) or newer GPUs only")
    elif _sm_tuple(machine.sm) != _sm_tuple(sidecar["sm"]):
        raise EngineMismatchError(head, hint="an engine holds kernels for one GPU architecture (compute capability)")
    built_version, version = _version_tuple(sidecar["tensorrt"]), _version_tuple(machine.tensorrt)
    if options.get("version_compatible"):
        if version < built_version:
            raise EngineMismatchError(head, hint="a version-compatible engine loads only in the same or a later "
                                                 "TensorRT")
    elif version != built_version:
        raise EngineMismatchError(head, hint="a plan loads only in the TensorRT version that built it (build with "
                                             "version_compatible to relax this)")
    if sidecar.get("cuda") and machine.cuda and sidecar["cuda"].split(".")[0] != machine.cuda.split(".")[0]:
        raise EngineMismatchError(f"engine built with CUDA {sidecar['cuda']}, this is CUDA {machine.cuda} — {REBUILD}",
                                  hint="TensorRT wheels are per CUDA major version")
    warnings = []
    if sidecar.get("gpu") and machine.gpu and sidecar["gpu"] != machine.gpu:
        warnings.append(f"built on {sidecar['gpu']}, running on {machine.gpu} (both SM {machine.sm}): "
                        "kernel timings were tuned for the other GPU")
    return warnings
