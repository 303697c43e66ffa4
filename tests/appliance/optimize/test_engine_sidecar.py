"""Engines are bound to GPU architecture, TensorRT and CUDA: the sidecar check, fed sidecars, no GPU needed.
Also the TensorRT 10/11 switch and the build options, which need no GPU either."""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import pytest

from appliance.optimize.engine_sidecar import MachineInfo, check_sidecar
from appliance.optimize.errors import EngineError, EngineMismatchError
from appliance.optimize.tensorrt_api import tensorrt_api
from appliance.optimize.tensorrt_engine import (
    EngineBuildOptions,
    build_engine,
    causal_lm_profiles,
    classifier_profiles,
    timing_cache_key,
)
from tests.appliance.optimize.conftest import A100, H100, PLAN, sidecar_for


def test_same_machine_loads_and_the_sidecar_records_everything():
    sidecar = sidecar_for(A100)
    assert check_sidecar(sidecar, A100, plan_bytes=PLAN) == []
    for key in ("tensorrt", "cuda", "driver", "gpu", "sm", "profiles", "io", "onnx_sha256", "plan_sha256",
                "quant_recipe", "built_at"):
        assert sidecar[key], key


def test_other_sm_and_tensorrt_is_refused_with_the_rebuild_line():
    with pytest.raises(EngineMismatchError) as caught:
        check_sidecar(sidecar_for(A100), H100, plan_bytes=PLAN)
    assert caught.value.message == ("engine built for SM 8.0/TRT 10.13.0.35, this is SM 9.0/TRT 11.1.0 — rebuild "
                                    "with `airlock engine build`")
    assert "one GPU architecture" in caught.value.hint


def test_tensorrt_version_must_match_unless_version_compatible():
    newer = dataclasses.replace(A100, tensorrt="10.14.1")
    with pytest.raises(EngineMismatchError, match=r"this is SM 8\.0/TRT 10\.14\.1") as caught:
        check_sidecar(sidecar_for(A100), newer)
    assert "only in the TensorRT version that built it" in caught.value.hint
    assert check_sidecar(sidecar_for(A100, version_compatible=True), newer) == []
    older = dataclasses.replace(A100, tensorrt="10.9.0")
    with pytest.raises(EngineMismatchError, match=r"this is SM 8\.0/TRT 10\.9\.0") as caught:
        check_sidecar(sidecar_for(A100, version_compatible=True), older)
    assert "same or a later TensorRT" in caught.value.hint


def test_hardware_compatible_engines_run_on_ampere_and_newer_only():
    hopper_same_trt = dataclasses.replace(H100, tensorrt=A100.tensorrt, cuda=A100.cuda)
    sidecar = sidecar_for(A100, hardware_compatibility="ampere_plus")
    assert check_sidecar(sidecar, hopper_same_trt) == [
        "built on NVIDIA A100-SXM4-80GB, running on NVIDIA H100 80GB HBM3 (both SM 9.0): kernel timings were tuned "
        "for the other GPU"]
    turing = dataclasses.replace(A100, gpu="Tesla T4", sm="7.5")
    with pytest.raises(EngineMismatchError, match=r"this is SM 7\.5/TRT 10\.13\.0\.35") as caught:
        check_sidecar(sidecar, turing)
    assert "Ampere (SM 8.0) or newer" in caught.value.hint


def test_same_sm_other_gpu_model_warns_only():
    a30 = dataclasses.replace(A100, gpu="NVIDIA A30")
    warnings = check_sidecar(sidecar_for(A100), a30)
    assert len(warnings) == 1 and "NVIDIA A30" in warnings[0]


def test_missing_gpu_tensorrt_cuda_major_or_tampered_plan_are_refused():
    with pytest.raises(EngineMismatchError, match="this machine has no usable NVIDIA GPU"):
        check_sidecar(sidecar_for(A100), MachineInfo(None, None, None, None, None))
    with pytest.raises(EngineMismatchError, match="this machine has no TensorRT"):
        check_sidecar(sidecar_for(A100), dataclasses.replace(A100, tensorrt=None))
    with pytest.raises(EngineMismatchError, match=r"engine built with CUDA 12\.8, this is CUDA 13\.0"):
        check_sidecar(sidecar_for(A100), dataclasses.replace(A100, cuda="13.0"))
    with pytest.raises(EngineMismatchError, match=r"does not match its sidecar \(SHA-256 differs\)"):
        check_sidecar(sidecar_for(A100), A100, plan_bytes=PLAN + b"!")
    with pytest.raises(EngineError, match="not an Airlock engine description"):
        check_sidecar({"format": "something else"}, A100)


# The TensorRT module itself is third-party; on machines without it these stand-ins carry only the names the
# version switch reads (enum members, __version__), so the switch's decisions are tested everywhere.
def _tensorrt_module(version: str) -> SimpleNamespace:
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
                           BuilderFlag=SimpleNamespace(FP16="FP16", INT8="INT8"),
                           HardwareCompatibilityLevel=SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS"))


def test_tensorrt_10_and_11_differences_are_chosen_at_run_time():
    trt10, trt11 = _tensorrt_module("10.13.0.35"), _tensorrt_module("11.1.0")
    api10, api11 = tensorrt_api(trt10), tensorrt_api(trt11)
    assert (api10.major, api11.major) == (10, 11)
    assert api10.network_flags(trt10, weak_fp16=False) == 1  # 1 << STRONGLY_TYPED
    assert api10.network_flags(trt10, weak_fp16=True) == 0
    assert api11.network_flags(trt11, weak_fp16=False) == 0  # always strongly typed
    assert api10.precision_flags(trt10, variant="int8", weak_fp16=False) == []
    assert api10.precision_flags(trt10, variant="int8", weak_fp16=True) == ["FP16", "INT8"]
    assert api10.precision_flags(trt10, variant="fp32", weak_fp16=True) == ["FP16"]
    with pytest.raises(EngineError, match=r"TensorRT 11\.1\.0 has no FP16 builder flag"):
        api11.precision_flags(trt11, variant="fp32", weak_fp16=True)
    with pytest.raises(EngineError, match="no hardware compatibility level 'same_compute_capability'"):
        api10.hardware_compatibility(trt10, "same_compute_capability")
    with pytest.raises(EngineError, match=r"TensorRT 8\.6\.1 is not supported \(10\.x and 11\.x are\)"):
        tensorrt_api(_tensorrt_module("8.6.1"))


def test_timing_cache_key_follows_gpu_tensorrt_and_flags():
    options = EngineBuildOptions()
    key = timing_cache_key(A100, "int8", options)
    assert key == timing_cache_key(A100, "int8", EngineBuildOptions(workspace_gib=8))  # not a kernel choice
    others = {timing_cache_key(H100, "int8", options), timing_cache_key(A100, "fp16", options),
              timing_cache_key(dataclasses.replace(A100, tensorrt="10.14.1"), "int8", options),
              timing_cache_key(A100, "int8", EngineBuildOptions(hardware_compatibility="ampere_plus"))}
    assert key not in others and len(others) == 4


def test_build_options_and_profiles():
    with pytest.raises(EngineError, match="builder_optimization_level = 7 is not 0-5"):
        EngineBuildOptions(builder_optimization_level=7)
    with pytest.raises(EngineError, match="hardware_compatibility = 'any'"):
        EngineBuildOptions(hardware_compatibility="any")
    with pytest.raises(EngineError, match=r"contexts = 0 is outside 1\.\.16") as caught:
        EngineBuildOptions(contexts=0)
    assert "server workers" in caught.value.hint
    assert classifier_profiles((1, 32, 32), max_batch=16, opt_batch=8) == [
        {"pixel_values": ((1, 1, 32, 32), (8, 1, 32, 32), (16, 1, 32, 32))}]
    from transformers import AutoConfig

    from appliance.base_models import resolve_base_model

    config = AutoConfig.from_pretrained(resolve_base_model("tiny-deepseek-r1").path, local_files_only=True)
    profile = causal_lm_profiles(config, max_batch=2, max_sequence=64, max_past=128)[0]
    assert len(profile) == 3 + 2 * 6
    assert profile["past_key_5"] == ((1, 2, 0, 48), (1, 2, 128, 48), (2, 2, 128, 48))  # past may be empty
    assert profile["attention_mask"][2] == (2, 192)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_building_without_tensorrt_says_what_to_do():
    with pytest.raises(EngineError, match="TensorRT is not installed on this machine") as caught:
        build_engine(b"onnx", variant="int8", profiles=[], options=EngineBuildOptions())
    assert "ONNX Runtime" in caught.value.hint
