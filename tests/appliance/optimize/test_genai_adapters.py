"""The LoRA adapter-file route on onnxruntime-genai (appliance/optimize/genai_adapters.py, docs/adr/0016).

The real builder builds the tiny model's fp32 base with a LoRA branch once (module fixture; with the test, ~12 s on
two quiet cores, so not slow-marked); ONNX Runtime and
og.Generator run it with the session fixture's adapter as an `.onnx_adapter` file, judged against the merged
float model by the same validation and perplexity the merged export gets. The layout test needs no builder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.appliance.optimize.conftest import corpus_texts


def test_adapter_tensors_compute_peft_lora_delta_and_unknown_layouts_are_refused(lora_merged_lm):
    import dataclasses

    import numpy as np
    import torch

    from appliance.optimize.errors import ExportError
    from appliance.optimize.genai_adapters import lora_graph_name, lora_tensors

    adapter, config = lora_merged_lm["adapter"], lora_merged_lm["lora_config"]
    tensors = lora_tensors(adapter, config)
    assert len(tensors) == len(adapter) == 6 * 7 * 2  # 6 layers, 7 projections, A and B
    key_a = next(k for k in adapter if ".layers.3.mlp.down_proj.lora_A" in k)
    key_b = key_a.replace("lora_A", "lora_B")
    name_a, node_a = lora_graph_name(key_a)
    assert (name_a, node_a) == ("model.layers.3.mlp.down_proj.lora_A.MatMul.weight",
                                "/model/layers.3/mlp/down_proj/lora_A/MatMul")
    x = torch.randn(4, adapter[key_a].shape[1], generator=torch.Generator().manual_seed(0))
    peft_delta = (x @ adapter[key_a].T @ adapter[key_b].T * (config.lora_alpha / config.r)).numpy()
    ours = x.numpy() @ tensors[name_a] @ tensors[lora_graph_name(key_b)[0]]
    assert np.abs(peft_delta).max() > 1e-3  # B is non-zero in the fixture: the check can fail
    np.testing.assert_allclose(ours, peft_delta, rtol=1e-5, atol=1e-6)

    with pytest.raises(ExportError, match=r"embed_tokens\.lora_embedding_A"):
        lora_graph_name("base_model.model.model.embed_tokens.lora_embedding_A")
    with pytest.raises(ExportError, match="DoRA"):
        lora_tensors(adapter, dataclasses.replace(config, use_dora=True))


@pytest.fixture(scope="module")
def lora_base(lora_merged_lm, tmp_path_factory) -> dict[str, Any]:
    from appliance.base_models import resolve_base_model
    from appliance.optimize.genai_adapters import build_genai_base, lora_tensors, write_onnx_adapter
    from appliance.optimize.recipe import QuantRecipe

    work = tmp_path_factory.mktemp("genai-lora")
    base = build_genai_base(lora_merged_lm["model"], lora_merged_lm["tokenizer"], lora_merged_lm["lora_config"],
                            lora_merged_lm["adapter"], work, variant="genai-fp32", recipe=QuantRecipe(),
                            checkpoint=resolve_base_model("tiny-deepseek-r1").path)
    tensors = lora_tensors(lora_merged_lm["adapter"], lora_merged_lm["lora_config"])
    adapter_file = work / "candidate.onnx_adapter"
    size = write_onnx_adapter(tensors, adapter_file, expected=_inputs(base.path))
    return {"base": base, "tensors": tensors, "file": adapter_file, "bytes": size}


def _inputs(folder: Path) -> dict[str, list[int]]:
    from appliance.optimize.genai_adapters import lora_inputs_of

    return lora_inputs_of(folder)


def test_base_plus_adapter_file_serves_the_merged_model_through_the_same_validation(lora_base, lora_merged_lm,
                                                                                     lm_data):
    import numpy as np

    from appliance.optimize.errors import ExportError
    from appliance.optimize.genai_adapters import write_onnx_adapter
    from appliance.optimize.genai_export import check_export_files
    from appliance.optimize.genai_validate import (
        held_out_examples,
        ort_genai_session,
        session_logits,
        session_perplexity,
        torch_perplexity,
        validate_genai_export,
    )
    from appliance.train.lm import encode_records

    base, tensors, model = lora_base["base"], lora_base["tensors"], lora_merged_lm["model"]
    assert set(base.files) == {"model.onnx", "model.onnx.data", "genai_config.json", "lora_inputs.json"}
    check_export_files(base.path, base.files)  # the rewritten graph is what the digests record
    assert base.options["lora_branch"] == {"inputs": 84, "rank": 8}
    total = sum(a.size for a in tensors.values()) * 4
    assert total <= lora_base["bytes"] < total + 64 * 1024  # the file is the adapter's weights, little else

    # og.Generator with the adapter file active, and ONNX Runtime fed its tensors: the merged float model's logits
    # and greedy tokens (measured max relative difference 7e-7 vs the tolerance 1e-4)
    report = validate_genai_export(base, model, lm_data["prompts"], decode_tokens=8,
                                   eos_ids=[lora_merged_lm["tokenizer"].eos_token_id], adapter_tensors=tensors,
                                   adapter_file=lora_base["file"])
    print(f"\nbase+adapter fp32: max rel diff {report['parity']['max_rel_diff']:.2g}, adapter "
          f"{lora_base['bytes']} bytes, base {base.bytes} bytes")
    assert report["ok"], report["failures"]
    assert report["parity"]["greedy_equal"] and report["generator"]["steps"] == 8

    # the quality gate's measure agrees with the merged float model's; the base alone does not (the adapter acts)
    tokenizer = lora_merged_lm["tokenizer"]
    examples = held_out_examples(encode_records(tokenizer, [{"text": t} for t in corpus_texts()[600:616]], 96, "q"))
    with_adapter = session_perplexity(ort_genai_session(base, adapter=tensors), examples)
    assert with_adapter == pytest.approx(torch_perplexity(model, examples), rel=1e-4)
    probe = lm_data["prompts"][:1]
    moved = np.abs(session_logits(ort_genai_session(base), probe)
                   - session_logits(ort_genai_session(base, adapter=tensors), probe)).max()
    assert moved > 0.05, moved  # measured ~0.3: without the adapter the same graph is the base model

    # an adapter of another LoRA structure is refused before any generator sees it, with the weight named
    name = sorted(tensors)[0]
    with pytest.raises(ExportError, match=r"is \[192, 4\], the base graph expects \[192, 8\]"):
        write_onnx_adapter({**tensors, name: np.zeros((tensors[name].shape[0], 4), np.float32)},
                           lora_base["file"].with_suffix(".bad"), expected=_inputs(base.path))
    with pytest.raises(ExportError, match=name.replace(".", r"\.")):
        write_onnx_adapter({k: v for k, v in tensors.items() if k != name}, lora_base["file"].with_suffix(".bad"),
                           expected=_inputs(base.path))
    assert not lora_base["file"].with_suffix(".bad").exists()
