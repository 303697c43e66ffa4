"""A Triton Inference Server model repository entry: serving beyond one box, with an engine Triton already runs.

    write_triton_model(repo, "chest-xray", onnx_bytes=onnx, max_batch_size=32)      # ONNX Runtime backend
    write_triton_model(repo, "chest-xray", engine_plan=plan, engine_sidecar=sidecar)  # TensorRT backend

    repo/chest-xray/config.pbtxt
    repo/chest-xray/1/model.onnx | model.plan
    repo/chest-xray/airlock-engine.json            (TensorRT only: what the plan is bound to)

Unlike everything else here this writes the model in plaintext, on purpose: the repository is
handed to a Triton server the site runs. The caller audits the export; files are group-readable
(0640), directories 0750, for the account Triton runs as. A TensorRT plan loads only in a Triton
whose TensorRT equals the one in the sidecar (and on the same GPU architecture).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from appliance.optimize.errors import OptimizeError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32", 3: "TYPE_INT8",
              2: "TYPE_UINT8", 9: "TYPE_BOOL", 16: "TYPE_BF16"}
ENGINE_TYPES = {"float": "TYPE_FP32", "half": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "bf16": "TYPE_BF16"}


def _onnx_io(onnx_bytes: bytes) -> list[dict[str, Any]]:
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    io = []
    for mode, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            io.append({"name": value.name, "mode": mode, "type": ONNX_TYPES.get(tensor.elem_type, "TYPE_INVALID"),
                       "dims": dims})
    return io


def _engine_io(sidecar: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": t["name"], "mode": t["mode"], "type": ENGINE_TYPES.get(t["dtype"], "TYPE_INVALID"),
             "dims": list(t["shape"])} for t in sidecar["io"]]


def triton_config(name: str, platform: str, io: list[dict[str, Any]], *, max_batch_size: int, instances: int,
                  gpu: bool) -> str:
    """config.pbtxt text. With max_batch_size > 0 Triton batches requests: dims then leave out the batch axis."""
    bad = [t["name"] for t in io if t["type"] == "TYPE_INVALID"]
    if bad:
        raise OptimizeError(f"tensor {bad[0]!r} has a type Triton cannot carry", hint="export fp32, fp16 or int8")
    if max_batch_size > 0:
        unbatched = [t["name"] for t in io if not t["dims"] or t["dims"][0] != -1]
        if unbatched:
            raise OptimizeError(f"tensor {unbatched[0]!r} has no dynamic batch axis, so Triton cannot batch it",
                                hint="use max_batch_size = 0 for this model")
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}"]
    for mode in ("input", "output"):
        entries = []
        for t in (t for t in io if t["mode"] == mode):
            dims = t["dims"][1:] if max_batch_size > 0 else t["dims"]
            entries.append(f'  {{ name: "{t["name"]}" data_type: {t["type"]} dims: [ {", ".join(map(str, dims))} ] }}')
        lines.append(f"{mode} [\n" + ",\n".join(entries) + "\n]")
    lines.append(f"instance_group [ {{ count: {instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]")
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_triton_model(repository: Path, name: str, *, onnx_bytes: bytes | None = None,
                       engine_plan: bytes | None = None, engine_sidecar: dict[str, Any] | None = None,
                       max_batch_size: int = 0, instances: int = 1, gpu: bool = True, version: int = 1,
                       overwrite: bool = False) -> Path:
    """Write `<repository>/<name>/config.pbtxt` and `<name>/<version>/model.onnx|model.plan`; returns the model dir."""
    if not _NAME.fullmatch(name):
        raise OptimizeError(f"Triton model name {name!r} is not a plain name", hint="use letters, digits, _ . -")
    if (onnx_bytes is None) == (engine_plan is None):
        raise OptimizeError("a Triton model needs exactly one of an ONNX model or a TensorRT plan",
                            hint="pass onnx_bytes, or engine_plan with its engine_sidecar")
    if engine_plan is not None and engine_sidecar is None:
        raise OptimizeError("a TensorRT plan goes to Triton with its sidecar (I/O and the TensorRT it needs)",
                            hint="pass the engine_sidecar written by build_engine")
    if not 1 <= version <= 1_000_000 or not 1 <= instances <= 64 or not 0 <= max_batch_size <= 65_536:
        raise OptimizeError("version, instances or max_batch_size out of range",
                            hint="version >= 1, instances 1-64, max_batch_size 0-65536")
    model_dir = Path(repository) / name
    if model_dir.exists() and not overwrite:
        raise OptimizeError(f"{model_dir} already exists", hint="choose another name, or overwrite it")
    if engine_plan is not None:
        io, platform, filename, payload = _engine_io(engine_sidecar), "tensorrt_plan", "model.plan", engine_plan
    else:
        io, platform, filename, payload = _onnx_io(onnx_bytes), "onnxruntime_onnx", "model.onnx", onnx_bytes
    config = triton_config(name, platform, io, max_batch_size=max_batch_size, instances=instances, gpu=gpu)
    (model_dir / str(version)).mkdir(mode=0o750, parents=True, exist_ok=True)
    _write(model_dir / str(version) / filename, payload)
    _write(model_dir / "config.pbtxt", config.encode())
    if engine_sidecar is not None:
        _write(model_dir / "airlock-engine.json", json.dumps(engine_sidecar, indent=2, sort_keys=True).encode())
    return model_dir
