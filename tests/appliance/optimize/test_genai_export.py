"""onnxruntime-genai exports of the tiny LM (LoRA merged): the real builder, ONNX Runtime and og.Generator.

One module fixture builds genai-fp32 and genai-int4 once (the builder runs twice; both tests that read it are
slow-marked); the others are cheap.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.appliance.optimize.conftest import corpus_texts

DECODE_TOKENS = 8
NO_GPU = "" if Path("/dev/nvidia0").exists() else "needs an NVIDIA GPU and onnxruntime-genai-cuda (GPU bundles)"


@pytest.fixture(scope="module")
def genai_built(lora_merged_lm, lm_data, tmp_path_factory) -> dict[str, Any]:
    from appliance.optimize.genai_export import build_genai_model, save_checkpoint
    from appliance.optimize.genai_validate import (
        held_out_examples,
        ort_genai_session,
        session_perplexity,
        torch_perplexity,
        validate_genai_export,
    )
    from appliance.optimize.recipe import QuantRecipe
    from appliance.train.lm import encode_records

    model, tokenizer = lora_merged_lm["model"], lora_merged_lm["tokenizer"]
    work = tmp_path_factory.mktemp("genai")
    save_checkpoint(model, tokenizer, work / "checkpoint")
    examples = held_out_examples(encode_records(tokenizer, [{"text": t} for t in corpus_texts()[600:640]], 96, "q"))
    built: dict[str, Any] = {"work": work, "float_ppl": torch_perplexity(model, examples)}
    for variant in ("genai-fp32", "genai-int4"):
        export = build_genai_model(model, tokenizer, work, variant=variant, recipe=QuantRecipe(),
                                   checkpoint=work / "checkpoint")
        report = validate_genai_export(export, model, lm_data["prompts"], decode_tokens=DECODE_TOKENS,
                                       eos_ids=[tokenizer.eos_token_id])
        built[variant] = {"export": export, "report": report,
                          "perplexity": session_perplexity(ort_genai_session(export), examples)}
    return built


@pytest.mark.slow
def test_the_float_export_matches_pytorch_holds_the_adapter_and_decodes_a_batch_of_8(genai_built, lora_merged_lm):
    from appliance.optimize.errors import ExportError
    from appliance.optimize.genai_export import check_export_files
    from appliance.optimize.genai_validate import ort_genai_session, session_logits

    export, report = genai_built["genai-fp32"]["export"], genai_built["genai-fp32"]["report"]
    parity = report["parity"]
    print(f"\ngenai-fp32: max rel diff {parity['max_rel_diff']:.2g}, top-1 {parity['top1_agreement']:.3f}, "
          f"{report['generator']['decode_tokens_per_s']:.0f} tokens/s (batch 8)")
    # Measured: max rel diff 4e-7 (tolerance 1e-4), top-1 1.0, greedy equal on every prompt.
    assert report["ok"] and report["failures"] == [] and report["parity_judged"]
    assert parity["max_rel_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0 and parity["greedy_equal"]
    assert report["generator"]["batch"] == 8 and report["generator"]["steps"] >= 1
    # External data: the graph is small and the weights sit beside it (any size exports).
    assert (export.path / "model.onnx").stat().st_size < 1_000_000 < (export.path / "model.onnx.data").stat().st_size
    assert report["sha256"] == export.sha256 and set(report["files"]) == {"model.onnx", "model.onnx.data",
                                                                          "genai_config.json"}
    # The LoRA adapter is in the export: its logits are the PEFT model's (adapter unmerged) logits.
    probe = lora_merged_lm["probe"]
    logits = session_logits(ort_genai_session(export), probe.numpy())
    assert abs(logits - lora_merged_lm["peft_logits"].numpy()).max() < 1e-3
    # A file that is not the validated one is refused before the runtime reads it.
    check_export_files(export.path, report["files"])
    tampered = genai_built["work"] / "tampered"
    shutil.copytree(export.path, tampered)
    config = json.loads((tampered / "genai_config.json").read_text())
    config["model"]["context_length"] = 4
    (tampered / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"genai_config\.json is not the one its optimize report validated"):
        check_export_files(tampered, report["files"])


@pytest.mark.slow
def test_int4_is_smaller_within_the_quality_gate_and_serves_through_the_backend(genai_built, lm_data):
    from appliance.optimize.genai_validate import run_generator_batch
    from appliance.optimize.quality_gate import perplexity_gate
    from appliance.serve.backends import RunnerLMBackend, Sampling
    from appliance.serve.genai_backend import GenAILMBackend

    fp32, int4 = genai_built["genai-fp32"], genai_built["genai-int4"]
    gate = perplexity_gate(genai_built["float_ppl"], int4["perplexity"], max_increase=0.05)
    print(f"\nperplexity float {genai_built['float_ppl']:.4f}, genai-fp32 {fp32['perplexity']:.4f}, "
          f"genai-int4 {int4['perplexity']:.4f} ({gate['increase']:+.2%}); int4 {int4['report']['bytes']} bytes vs "
          f"fp32 {fp32['report']['bytes']}")
    # The fp32 export scores like PyTorch (same numbers to 1e-4); int4 RTN block 32 measured about +1% (gate +5%).
    assert fp32["perplexity"] == pytest.approx(genai_built["float_ppl"], rel=1e-4)
    assert gate["ok"] and -0.02 < gate["increase"] < 0.04
    assert int4["report"]["ok"] and not int4["report"]["parity_judged"]  # int4 is judged by the quality gate
    assert int4["report"]["bytes"] < 0.5 * fp32["report"]["bytes"]
    assert int4["report"]["builder"]["extra_options"][:2] == ["block_size=32", "algo_config=rtn"]

    backend = GenAILMBackend.load(int4["export"].path, variant="genai-int4")
    assert backend.kind == "genai-cpu" and backend.context_length == 2048
    prompt = lm_data["prompts"][0]
    greedy = Sampling(max_new_tokens=6, temperature=0.0)
    tokens = list(backend.generate(prompt, greedy, lambda: False))
    # The same runtime decoding a batch gives the same greedy row; the serve wrapper delegates to og.Generator.
    batch = run_generator_batch(int4["export"].path, [prompt] * 3, 6)
    assert len(tokens) == 6 and batch["rows"] == [tokens] * 3
    assert backend.generate_batch([prompt, prompt], greedy) == [tokens, tokens]
    wrapped = RunnerLMBackend(backend, (6, 2, 48))
    assert wrapped.kind == "genai-cpu" and list(wrapped.generate(prompt, greedy, lambda: False)) == tokens
    assert list(backend.generate(prompt, greedy, lambda: True)) == []
    seeded = Sampling(max_new_tokens=6, temperature=0.8, top_p=0.95, seed=7)
    assert list(backend.generate(prompt, seeded, lambda: False)) == list(backend.generate(prompt, seeded,
                                                                                          lambda: False))


def test_the_quality_gate_says_why_with_the_numbers():
    from appliance.optimize.quality_gate import classifier_gate, perplexity_gate

    assert perplexity_gate(2.0, 2.09, max_increase=0.05)["ok"]
    refused = perplexity_gate(2.0, 2.2, max_increase=0.05)
    assert not refused["ok"]
    assert refused["failure"] == "quality: perplexity 2.2 vs float 2 (+10.0%; the task allows +5.0%)"
    assert not perplexity_gate(2.0, float("nan"), max_increase=0.05)["ok"]
    ok = classifier_gate({"accuracy": 0.90, "roc_auc": 0.95}, {"accuracy": 0.895, "roc_auc": None}, max_drop=0.01)
    assert ok["ok"] and list(ok["measured"]) == ["accuracy"]  # no AUC measured: not judged
    bad = classifier_gate({"accuracy": 0.90, "roc_auc": 0.95}, {"accuracy": 0.90, "roc_auc": 0.93}, max_drop=0.01)
    assert not bad["ok"]
    assert bad["failure"] == "quality: roc_auc 0.9300 vs float 0.9500 (-2.0 pt); the task allows -1.0 pt"


def test_bad_recipes_families_and_checkpoints_are_one_line_each(tmp_path):
    from types import SimpleNamespace

    from appliance.optimize.errors import ExportError, OptimizeError
    from appliance.optimize.genai_export import build_genai_model, genai_refusal, scratch_dir
    from appliance.optimize.recipe import QuantRecipe

    with pytest.raises(OptimizeError, match="int4_block_size = 48 is not one of 16, 32, 64, 128, 256"):
        QuantRecipe(int4_block_size=48)
    with pytest.raises(OptimizeError, match="int4_algo = 'gptq' is not one of rtn, k_quant"):
        QuantRecipe(int4_algo="gptq")
    moe = SimpleNamespace(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    assert "DeepseekV3ForCausalLM is not a family the onnxruntime-genai builder covers" in genai_refusal(
        moe, "genai-int4")
    assert genai_refusal(SimpleNamespace(architectures=["Qwen2ForCausalLM"], model_type="qwen2"), "genai-int4") is None

    # A checkpoint whose weights are truncated: the builder fails, and the error is one line that names it.
    from appliance.base_models import resolve_base_model

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(resolve_base_model("tiny-deepseek-r1").path, checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    model = SimpleNamespace(config=SimpleNamespace(architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    with scratch_dir(tmp_path, "job") as work, pytest.raises(ExportError) as failed:
        build_genai_model(model, None, work, variant="genai-int4", recipe=QuantRecipe(), checkpoint=checkpoint)
    assert failed.value.message.startswith("the onnxruntime-genai builder failed on genai-int4: ")
    assert "\n" not in failed.value.message and failed.value.hint
    assert not (tmp_path / "scratch" / "job").exists()  # the scratch folder is gone, whatever happened


@pytest.mark.gpu
@pytest.mark.skipif(bool(NO_GPU), reason=NO_GPU or "ready")
def test_a_cuda_fp16_export_decodes_on_the_gpu(genai_built, lora_merged_lm, lm_data):
    """Needs an NVIDIA GPU and onnxruntime-genai-cuda (GPU bundles); skipped with the reason elsewhere."""
    import onnxruntime_genai as og

    if not og.is_cuda_available():
        pytest.skip("onnxruntime-genai has no CUDA here (the CPU wheel); GPU bundles ship onnxruntime-genai-cuda")
    from appliance.optimize.genai_export import build_genai_model
    from appliance.optimize.genai_validate import validate_genai_export
    from appliance.optimize.recipe import QuantRecipe

    model, tokenizer = lora_merged_lm["model"], lora_merged_lm["tokenizer"]
    export = build_genai_model(model, tokenizer, genai_built["work"], variant="genai-fp16-cuda", recipe=QuantRecipe(),
                               checkpoint=genai_built["work"] / "checkpoint")
    report = validate_genai_export(export, copy.deepcopy(model).half(), lm_data["prompts"], decode_tokens=DECODE_TOKENS)
    assert report["ok"], report["failures"]
