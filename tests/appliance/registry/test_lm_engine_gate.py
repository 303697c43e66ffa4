"""Gate 3 for a language model: a task that deploys int8 engines (PTQ here) gets its retrain quantized, exported
with the flat KV cache and checked against PyTorch on ONNX Runtime (prefill logits and greedy decoding); the
validated export is stored in the candidate's vault object and recorded on the version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from appliance.catalog import open_catalog
from tests.appliance.registry.conftest import chats, cli_json, write_jsonl
from tests.conftest import fix_site_secret, run_cli

SHORT_RECIPE = "max_steps = 6\neval_every = 6\nbatch_size = 2\nmax_length = 96\nlr = 3e-3\nseed = 3\n"


@pytest.mark.slow  # a LoRA run, a retrain and the optimize stage on the tiny LM: about 1.5 minutes on two cores
def test_lm_retrain_measures_engine_parity_and_records_the_export(vault_init, unlock, tmp_path: Path,
                                                                  airlock_home: Path):
    from appliance.vault.lifecycle import keys_for
    from appliance.vault.store import read_bytes

    vault_init()
    unlock()
    fix_site_secret()  # the same splits, so the same losses and parity, on every run
    recipe = tmp_path / "short.toml"
    recipe.write_text(SHORT_RECIPE, encoding="utf-8")
    source = write_jsonl(tmp_path / "a", "maint.jsonl", chats("maintenance")[:60])
    assert run_cli("data", "import", str(source), "--name", "maint", "--near-dup", "off").returncode == 0
    cli_json("train", "lm", "--base", "tiny-deepseek-r1", "--data", "maint", "--recipe", str(recipe), "--task",
             "maint-qa", "--wait", "--json")
    cli_json("models", "promote", "maint-qa-v1", "--json")
    # This test is about gate 3: gates 1-2 get room, so a 6-step model's noise does not decide it.
    task = cli_json("models", "policy", "maint-qa", "--engines", "--engine-ptq", "--max-forgetting", "1",
                    "--new-data-tolerance", "1", "--json")["task"]
    assert task["engine_qat"] is False and task["engine_variant"] == "int8"
    source = write_jsonl(tmp_path / "b", "radiology.jsonl", chats("radiology")[:40])
    assert run_cli("data", "import", str(source), "--name", "maint", "--near-dup", "off").returncode == 0

    out = cli_json("retrain", "maint-qa", "--replay", "0.5", "--wait", "--json")
    v2 = out["version"]
    assert v2["state"] == "candidate", v2["reasons"]
    gate = v2["gates"]["engine_parity"]
    # Measured with the fixed site secret: max relative difference 2.2e-7, five orders of magnitude below 0.05.
    assert gate["status"] == "pass" and gate["variant"] == "int8" and gate["quantization"] == "ptq"
    assert gate["measured"]["prompts"] >= 1 and gate["measured"]["max_rel_diff"] <= gate["thresholds"]["max_rel_diff"]
    assert gate["thresholds"] == {"max_rel_diff": 0.05, "min_top1_agreement": 0.95,
                                  "source": "optimize stage defaults"}
    assert "ptq" in gate["metrics"] and "qat" not in gate["metrics"]
    assert gate["engine"]["built"] is False
    onnx = v2["artifacts"]["onnx_int8"]
    db = open_catalog()
    keys = keys_for(db, airlock_home)
    data = read_bytes(db, keys, airlock_home, onnx["object"], onnx["file"])
    assert hashlib.sha256(data).hexdigest() == onnx["sha256"] == gate["onnx_sha256"]
    # The optimize stage's own report sits beside it, so `airlock optimize show` and serving see the same export.
    report = json.loads(read_bytes(db, keys, airlock_home, onnx["object"], "optimize-report.json"))
    assert report["variants"]["int8"]["sha256"] == onnx["sha256"] and report["ptq"] and report["qat"] is None
    shown = cli_json("optimize", "show", v2["run_id"], "--json")
    assert shown["report"]["variants"]["int8"]["stored"] is True
    card = run_cli("models", "card", v2["id"]).stdout
    assert "engine parity: int8, PTQ ONNX vs PyTorch" in card and "engine parity gate: pass" in card
    print(f"\nLM int8 (PTQ) parity on ORT: {gate['measured']}; relative loss changes: forgetting "
          f"{[f['relative_change'] for f in v2['gates']['forgetting']['splits']]}, new data "
          f"{v2['gates']['new_data']['relative_change']}")
