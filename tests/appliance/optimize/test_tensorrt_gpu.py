"""TensorRT on a real GPU: build INT8/FP16 engines from our exports, load them through the sidecar check, and
compare with ONNX Runtime / PyTorch. Skipped, with the reason, where TensorRT or a GPU is absent (CI)."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest

from tests.appliance.optimize.conftest import IMAGE_SHAPE


def _missing() -> str:
    if importlib.util.find_spec("tensorrt") is None:
        return "needs TensorRT (not installed: engines are built on GPU appliances only)"
    import torch

    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU (torch sees none)"
    return ""


MISSING = _missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(MISSING), reason=MISSING or "ready")]


def test_int8_classifier_engine_builds_loads_and_matches_onnx_runtime(tmp_path, int8_classifier_onnx,
                                                                      quantized_classifier, classifier_data):
    from appliance.optimize.engine_sidecar import current_machine
    from appliance.optimize.runners import OrtRunner, ort_session
    from appliance.optimize.runtime_select import select_runtime
    from appliance.optimize.tensorrt_engine import (
        EngineBuildOptions,
        build_engine,
        classifier_profiles,
        load_engine,
    )

    options = EngineBuildOptions(builder_optimization_level=2, timing_cache_dir=str(tmp_path))
    build = build_engine(int8_classifier_onnx, variant="int8", profiles=classifier_profiles(IMAGE_SHAPE, max_batch=64),
                         options=options, quant_recipe=quantized_classifier.report["recipe"])
    machine = current_machine()
    assert build.sidecar["sm"] == machine.sm and build.sidecar["tensorrt"] == machine.tensorrt
    assert [t["name"] for t in build.sidecar["io"]] == ["pixel_values", "logits"]
    assert len(list(tmp_path.glob("timing-*.cache"))) == 1  # persisted for the next build

    pixels = classifier_data["test"][0].float().numpy()
    engine_logits = load_engine(build.plan, build.sidecar).run({"pixel_values": pixels})["logits"]
    ort_logits = OrtRunner(ort_session(int8_classifier_onnx)).run({"pixel_values": pixels})["logits"]
    assert (engine_logits.argmax(1) == ort_logits.argmax(1)).mean() >= 0.95
    assert float(np.abs(engine_logits - ort_logits).max()) < 0.1 * max(1.0, float(np.abs(ort_logits).max()))

    choice = select_runtime(onnx_bytes=int8_classifier_onnx, engine_plan=build.plan, engine_sidecar=build.sidecar)
    assert choice.kind == "tensorrt", choice.reason


def test_fp16_lm_engine_decodes_through_its_kv_cache(tmp_path, lora_merged_lm, lm_data):
    from appliance.optimize.onnx_export import export_causal_lm_onnx, kv_cache_layout
    from appliance.optimize.runners import greedy_decode
    from appliance.optimize.tensorrt_engine import EngineBuildOptions, build_engine, causal_lm_profiles, load_engine
    from appliance.optimize.validate import torch_greedy

    model = lora_merged_lm["model"]
    onnx_bytes = export_causal_lm_onnx(model, variant="fp16")
    build = build_engine(onnx_bytes, variant="fp16",
                         profiles=causal_lm_profiles(model.config, max_batch=1, max_sequence=32, max_past=64),
                         options=EngineBuildOptions(builder_optimization_level=1, timing_cache_dir=str(tmp_path)))
    runner = load_engine(build.plan, build.sidecar)
    prompt = lm_data["prompts"][0]
    ours = greedy_decode(runner, prompt, max_new_tokens=8, layout=kv_cache_layout(model.config))
    reference = torch_greedy(copy.deepcopy(model).float(), prompt, 8)
    assert sum(a == b for a, b in zip(ours, reference, strict=True)) >= 6  # fp16 may swap near-tied logits


def test_lm_engine_serves_concurrent_threads_each_on_its_own_context(tmp_path, lora_merged_lm, lm_data):
    """Four threads decode four prompts at once on one engine: each gets what it gets alone (one shared
    execution context, or two contexts on one profile, would mix their shapes and buffers); two contexts, each on
    its own copy of the profile, serve the four threads in turn."""
    from concurrent.futures import ThreadPoolExecutor

    from appliance.optimize.onnx_export import export_causal_lm_onnx, kv_cache_layout
    from appliance.optimize.runners import greedy_decode
    from appliance.optimize.tensorrt_engine import (
        EngineBuildOptions,
        build_engine,
        causal_lm_profiles,
        check_lm_profile,
        load_engine,
    )

    model = lora_merged_lm["model"]
    build = build_engine(export_causal_lm_onnx(model, variant="fp16"), variant="fp16",
                         profiles=causal_lm_profiles(model.config, max_batch=1, max_sequence=32, max_past=64),
                         options=EngineBuildOptions(builder_optimization_level=1, timing_cache_dir=str(tmp_path)))
    runner = load_engine(build.plan, build.sidecar)
    check_lm_profile(runner.profiles, context=2048, max_prompt_tokens=32, max_new_tokens=34)  # from the sidecar
    layout = kv_cache_layout(model.config)
    prompts = [list(p) for p in lm_data["prompts"][:4]]
    alone = [greedy_decode(runner, p, max_new_tokens=16, layout=layout) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(lambda p: greedy_decode(runner, p, max_new_tokens=16, layout=layout), prompts))
            assert together == alone
    assert runner.contexts == 2 and 1 <= runner._pool.made <= 2  # the default: two contexts, two profile copies
    assert runner.engine.num_optimization_profiles == 2
