"""Runtime selection says what it chose and why; the Triton repository entry is what Triton reads."""

from __future__ import annotations

import dataclasses
import importlib.util
import stat

import numpy as np
import onnxruntime as ort
import pytest

from appliance.optimize.engine_sidecar import MachineInfo
from appliance.optimize.errors import EngineError, OptimizeError
from appliance.optimize.runners import OrtRunner, ort_session
from appliance.optimize.runtime_select import select_runtime
from appliance.optimize.triton import write_triton_model
from tests.appliance.optimize.conftest import A100, PLAN, sidecar_for

NO_GPU = MachineInfo(None, None, None, None, None)
needs_cpu_only_stack = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None or "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="this machine has a GPU runtime; these cases describe a CPU-only appliance")


@needs_cpu_only_stack
def test_cpu_only_machine_serves_onnx_on_ort_cpu_and_says_why(int8_classifier_onnx, classifier_data):
    choice = select_runtime(onnx_bytes=int8_classifier_onnx, engine_plan=PLAN, engine_sidecar=sidecar_for(A100),
                            machine=NO_GPU)
    assert choice.kind == "ort-cpu" and choice.runner.providers == ["CPUExecutionProvider"]
    assert choice.skipped == ["TensorRT engine: TensorRT is not installed",
                              "ONNX Runtime CUDA: this onnxruntime build has no CUDA provider (onnxruntime, not "
                              "onnxruntime-gpu)"]
    assert choice.reason.startswith("ONNX Runtime on the CPU because TensorRT engine: TensorRT is not installed; ")
    pixels = classifier_data["test"][0][:4].float().numpy()
    direct = OrtRunner(ort_session(int8_classifier_onnx)).run({"pixel_values": pixels})["logits"]
    assert np.array_equal(choice.runner.run({"pixel_values": pixels})["logits"], direct)
    assert choice.to_dict()["kind"] == "ort-cpu"


@needs_cpu_only_stack
def test_the_cpu_gets_its_own_onnx_when_given(int8_classifier_onnx, trained_classifier_state):
    from appliance.optimize.onnx_export import export_classifier_onnx
    from tests.appliance.optimize.conftest import IMAGE_SHAPE, load_trained_classifier

    fp32 = export_classifier_onnx(load_trained_classifier(trained_classifier_state), variant="fp32",
                                  image_shape=IMAGE_SHAPE)
    choice = select_runtime(onnx_bytes=int8_classifier_onnx, cpu_onnx_bytes=fp32, machine=NO_GPU)
    assert choice.kind == "ort-cpu"
    inputs = {"pixel_values": np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)}
    served = choice.runner.run(inputs)["logits"]
    assert np.array_equal(served, OrtRunner(ort_session(fp32)).run(inputs)["logits"])
    assert not np.array_equal(served, OrtRunner(ort_session(int8_classifier_onnx)).run(inputs)["logits"])


@needs_cpu_only_stack
def test_gpu_required_but_none_usable_is_an_error_not_a_silent_cpu_fallback(int8_classifier_onnx):
    gpu_without_runtimes = dataclasses.replace(A100, tensorrt=None)
    with pytest.raises(EngineError, match=r"no runtime can serve this model: TensorRT engine: no engine was built for "
                                          r"this model; ONNX Runtime CUDA: this onnxruntime build has no CUDA "
                                          r"provider .*; ONNX Runtime CPU: serving on the CPU is not allowed"):
        select_runtime(onnx_bytes=int8_classifier_onnx, allow_cpu=False, machine=gpu_without_runtimes)


def test_pytorch_serves_what_has_no_export():
    choice = select_runtime(pytorch_runner=lambda: "the torch model", machine=NO_GPU)
    assert choice.kind == "pytorch" and choice.runner == "the torch model"
    assert "ONNX Runtime CPU: no ONNX export of this model" in choice.skipped
    with pytest.raises(EngineError, match="no runtime can serve this model"):
        select_runtime(machine=NO_GPU)


def test_triton_repository_for_the_int8_classifier(tmp_path, int8_classifier_onnx, classifier_data):
    model_dir = write_triton_model(tmp_path / "repo", "phantoms", onnx_bytes=int8_classifier_onnx, max_batch_size=32,
                                   gpu=False)
    config = (model_dir / "config.pbtxt").read_text()
    assert config == ('name: "phantoms"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 32\n'
                      'input [\n  { name: "pixel_values" data_type: TYPE_FP32 dims: [ 1, 32, 32 ] }\n]\n'
                      'output [\n  { name: "logits" data_type: TYPE_FP32 dims: [ 2 ] }\n]\n'
                      'instance_group [ { count: 1 kind: KIND_CPU } ]\ndynamic_batching { }\n')
    model_file = model_dir / "1" / "model.onnx"
    assert model_file.read_bytes() == int8_classifier_onnx
    assert stat.S_IMODE(model_file.stat().st_mode) == 0o640
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    assert session.run(None, {"pixel_values": classifier_data["test"][0][:2].float().numpy()})[0].shape == (2, 2)
    with pytest.raises(OptimizeError, match="already exists"):
        write_triton_model(tmp_path / "repo", "phantoms", onnx_bytes=int8_classifier_onnx)


def test_triton_repository_for_a_tensorrt_plan_and_bad_requests(tmp_path):
    sidecar = sidecar_for(A100)
    sidecar["io"].append({"name": "logits", "mode": "output", "dtype": "half", "shape": [-1, 2]})
    model_dir = write_triton_model(tmp_path, "engine", engine_plan=PLAN, engine_sidecar=sidecar, max_batch_size=0)
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 0" in config
    assert 'name: "logits" data_type: TYPE_FP16 dims: [ -1, 2 ]' in config and "KIND_GPU" in config
    assert (model_dir / "1" / "model.plan").read_bytes() == PLAN and (model_dir / "airlock-engine.json").is_file()
    with pytest.raises(OptimizeError, match="exactly one of an ONNX model or a TensorRT plan"):
        write_triton_model(tmp_path, "both", onnx_bytes=b"x", engine_plan=PLAN, engine_sidecar=sidecar)
    with pytest.raises(OptimizeError, match="not a plain name"):
        write_triton_model(tmp_path, "../escape", onnx_bytes=b"x")
    with pytest.raises(OptimizeError, match="goes to Triton with its sidecar"):
        write_triton_model(tmp_path, "plan", engine_plan=PLAN)
