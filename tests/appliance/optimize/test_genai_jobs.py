"""`airlock optimize --variants genai-...` over a real trained run: the builder's exports stored encrypted, the
quality gate refusing a broken quantization with the numbers, and the server loading the genai export."""

from __future__ import annotations

import json

import pytest

from appliance.catalog import open_catalog
from tests.appliance.optimize.test_optimize_jobs import _audit, _one_line_error, lm_run  # noqa: F401 - fixture
from tests.appliance.train.conftest import (  # noqa: F401 - fixtures
    agents,
    cli_json,
    corpus_chats,
    fast_kdf,
    passphrase_file,
    unlock,
    unlocked,
    vault_init,
)
from tests.conftest import files_holding, run_cli

# PTQ with activations clipped at their 90th percentile: a tenth of every layer's inputs saturate, which is what a
# careless recipe does to an LM. Measured on the tiny run: int8 perplexity 5.84 vs float 3.31 (+76%; the gate allows
# +5%), genai-int4 3.34 (+0.7%), genai-fp32 equal to float.
BROKEN_INT8 = "calibration = \"percentile\"\npercentile = 90.0\ncalibration_batches = 4\n"


@pytest.mark.slow
def test_genai_exports_serve_and_a_broken_quantization_is_refused_with_the_numbers(
        lm_run, airlock_home, tmp_path):  # noqa: F811 - fixture imported above
    from appliance.optimize.jobs import runtime_for_run
    from appliance.serve.backends import Sampling
    from appliance.serve.models import RunSource, load_model
    from appliance.train.runs import get_run
    from appliance.vault.lifecycle import keys_for
    from appliance.vault.store import list_files

    run_id = lm_run["id"]
    recipe = tmp_path / "broken.toml"
    recipe.write_text(BROKEN_INT8, encoding="utf-8")
    # Two builder runs and their validation: minutes on two loaded cores, past run_cli's default 300 s limit.
    done = run_cli("optimize", run_id, "--variants", "genai-fp32,genai-int4,int8", "--recipe", str(recipe),
                   "--no-qat", "--wait", "--json", timeout=1200)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    job, report = out["job"], out["report"]
    assert job["state"] == "succeeded", (job["error"], job["hint"])
    variants = report["variants"]
    quality = {name: v.get("quality") for name, v in variants.items()}
    print("\n" + "; ".join(f"{n}: {q['variant']:.4f} vs {q['float']:.4f} ({q['increase']:+.2%})"
                           for n, q in quality.items()))

    # int8 (PTQ, clipped): beyond the +5% tolerance, so not stored, and the report says why with both numbers.
    int8 = variants["int8"]
    assert not int8["ok"] and not int8["stored"] and int8["file"] is None
    assert quality["int8"]["increase"] > 0.15 and quality["int8"]["max_increase"] == 0.05  # far past: 3x the limit
    reason = next(f for f in int8["failures"] if f.startswith("quality: "))
    assert reason == (f"quality: perplexity {quality['int8']['variant']:.4g} vs float {quality['int8']['float']:.4g} "
                      f"({quality['int8']['increase']:+.1%}; the task allows +5.0%)")
    # The genai exports passed: fp32 equals PyTorch, int4 within the gate; both stored, file by file.
    for name in ("genai-fp32", "genai-int4"):
        assert variants[name]["ok"] and variants[name]["stored"], variants[name]["failures"]
        assert sorted(variants[name]["file"]) == sorted(f"{name}.{f}" for f in variants[name]["files"])
        assert variants[name]["generator"]["batch"] == 8
    assert quality["genai-int4"]["ok"] and abs(quality["genai-fp32"]["increase"]) < 1e-4
    assert report["quality"]["split"] == "test" and report["quality"]["examples"] >= 1
    assert report["runtime"]["kind"] == "genai-cpu" and report["runtime"]["genai_variant"] in ("genai-int4",
                                                                                                "genai-fp32")
    text = run_cli("optimize", "show", run_id)
    shown = " ".join(text.stdout.split())  # the table wraps its last column
    assert text.returncode == 0 and f"int8 NOT stored ({' '.join(reason.split())}" in shown
    assert "onnxruntime-genai on the CPU" in shown

    # Only ciphertext at rest, and the builder's scratch folder is gone.
    assert files_holding(airlock_home, b"GroupQueryAttention", b"MatMulNBits", b"past_key_values") == []
    assert not any((airlock_home / "scratch").iterdir())
    db = open_catalog()
    stored = set(list_files(airlock_home, lm_run["artifact"]))
    # genai-int4 of a LoRA run: the adapter file here, the base graph in its own object (docs/adr/0016); fp32 merged.
    assert variants["genai-int4"]["route"] == "adapter" and variants["genai-fp32"]["route"] == "merged"
    assert "float LoRA branch" in variants["genai-fp32"]["route_reason"]
    base = variants["genai-int4"]["base"]
    assert {"genai-int4.adapter.onnx_adapter", "genai-fp32.model.onnx", "genai-fp32.model.onnx.data",
            "genai-fp32.genai_config.json"} <= stored and "onnx-int8.onnx" not in stored
    assert not any(name.startswith("genai-int4.model") for name in stored)
    assert {f"genai-int4.{f}" for f in base["files"]} | {"base.json", f"ref.{lm_run['artifact']}"} == set(
        list_files(airlock_home, base["object"]))
    finish = [d for action, _, d in _audit(db, run_id) if action == "optimize.finish"]
    assert finish[0]["runtime"] == "genai-cpu" and finish[0]["variants"]["int8"]["ok"] is False

    # The server loads what the report chose: og.Generator decodes, the decrypted files are removed at once.
    keys = keys_for(db, airlock_home)
    choice = runtime_for_run(db, keys, airlock_home, get_run(db, run_id))
    assert choice.kind == "genai-cpu" and choice.reason.startswith("onnxruntime-genai on the CPU: ")
    assert not any((airlock_home / "scratch").iterdir())
    served = load_model(db, keys, airlock_home, "qa", RunSource("qa", run_id).resolve(db))
    assert served.backend.kind == "genai-cpu" and "onnxruntime-genai" in served.backend_reason
    prompt = served.tokenizer("<｜begin▁of▁sentence｜>How do I", add_special_tokens=False)["input_ids"]
    tokens = list(served.backend.generate(prompt, Sampling(max_new_tokens=5, temperature=0.0), lambda: False))
    assert 1 <= len(tokens) <= 5
    # A server that batches (the default limits) loads the batch session only, no og.Model: same tokens.
    from appliance.serve.limits import ServeLimits

    batched = load_model(db, keys, airlock_home, "qa", RunSource("qa", run_id).resolve(db), limits=ServeLimits())
    assert batched.backend.inner.runner.model is None and batched.backend.slotted
    assert list(batched.backend.generate(prompt, Sampling(max_new_tokens=5, temperature=0.0), lambda: False)) == tokens

    # A genai variant for an image classifier, or an unknown one, is refused before any job starts.
    assert "genai-int3 is not one of fp32, fp16, int8, genai-fp32" in _one_line_error(
        run_cli("optimize", run_id, "--variants", "genai-int3"))
    bad = tmp_path / "bad.toml"
    bad.write_text("int4_block_size = 1024\n", encoding="utf-8")
    assert "int4_block_size = 1024 is not one of 16, 32, 64, 128, 256" in _one_line_error(
        run_cli("optimize", run_id, "--recipe", str(bad)))
    assert json.loads(json.dumps(report))  # the report is plain JSON
