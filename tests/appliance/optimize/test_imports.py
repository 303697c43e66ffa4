"""Importing the optimize stage (as `airlock --help` or a job listing would) loads no ML stack: heavy imports
happen inside the functions that need them. fake_quant and export_graphs subclass torch.nn.Module and say so."""

from __future__ import annotations

import json
import subprocess
import sys

LIGHT = ["engine_sidecar", "errors", "genai_adapters", "genai_export", "genai_jobs", "genai_validate", "jobs",
         "onnx_export", "qdq_rules", "quality_gate", "quantize", "recipe", "runners", "runtime_select",
         "tensorrt_api", "tensorrt_engine", "triton", "validate"]
HEAVY = {"torch", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir", "tensorrt", "numpy"}


def test_optimize_modules_import_without_the_ml_stack():
    code = "\n".join(f"import appliance.optimize.{name}" for name in LIGHT)
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout.strip().splitlines()[-1])}
    assert loaded.isdisjoint(HEAVY), loaded & HEAVY
