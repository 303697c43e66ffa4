"""Gate 3 on the genai variant production serves: a task whose engine variant is genai-int4 gets each retrain built by
onnxruntime-genai's builder with the task's own quantization recipe, validated, and judged on held-out perplexity
against the float candidate and on the task's own limits. For a LoRA task that variant is the adapter route (the
version's adapter file over a base graph stored once, docs/adr/0016): the gate judges exactly that. A retrain whose
served variant is beyond the task's limits is rejected with the numbers and stores nothing; the default recipe passes,
stores the adapter file (and the base), and it is what the runtime chooser serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.catalog import open_catalog
from tests.appliance.registry.conftest import chats, cli_json, write_jsonl
from tests.conftest import fix_site_secret, run_cli

SHORT_RECIPE = "max_steps = 6\neval_every = 6\nbatch_size = 2\nmax_length = 96\nlr = 3e-3\nseed = 3\n"
# int4 with the LM head (tied to the embeddings) quantized too, under a task that allows no perplexity increase at
# all. On the merged route this broke the gate (+0.39% vs +0.0% allowed). The adapter route keeps the LoRA delta in
# float: measured with the fixed site secret, this recipe then gives -0.20% (2.1335 vs float 2.1379), and block 16
# asymmetric -0.85%, block 256 -0.10%, k_quant -0.32%: no allowed int4 recipe makes the tiny model's served variant
# worse than float. So the first retrain is rejected by the task's own parity limit on that served variant,
# --engine-max-rel-diff 0.01: measured max relative logit difference 0.113 (11x past it; any int4 export of this model
# is far beyond 1%).
BROKEN_INT4 = "int4_block_size = 16\nquantize_lm_head = true\nmax_perplexity_increase = 0.0\n"
TIGHT_REL_DIFF = "0.01"
GOOD_INT4 = "int4_block_size = 32\nint4_algo = \"rtn\"\n"


@pytest.mark.slow  # a LoRA run, two retrains and two builder runs on the tiny LM: minutes on two cores
def test_a_retrain_whose_served_genai_variant_regresses_is_rejected_and_a_good_one_serves(
        vault_init, unlock, tmp_path: Path, airlock_home: Path):
    from appliance.optimize.jobs import runtime_for_run, stored_report
    from appliance.train.runs import get_run
    from appliance.vault.lifecycle import keys_for
    from appliance.vault.store import list_files

    vault_init()
    unlock()
    fix_site_secret()  # the same splits, so the same losses and perplexities, on every run
    recipe = tmp_path / "short.toml"
    recipe.write_text(SHORT_RECIPE, encoding="utf-8")
    broken, good = tmp_path / "broken.toml", tmp_path / "good.toml"
    broken.write_text(BROKEN_INT4, encoding="utf-8")
    good.write_text(GOOD_INT4, encoding="utf-8")
    maintenance = chats("maintenance")
    source = write_jsonl(tmp_path / "a", "maint.jsonl", maintenance[:60])
    assert run_cli("data", "import", str(source), "--name", "maint", "--near-dup", "off").returncode == 0
    trained = run_cli("train", "lm", "--base", "tiny-deepseek-r1", "--data", "maint", "--recipe", str(recipe),
                      "--task", "maint-qa", "--wait", "--json", timeout=900)
    assert trained.returncode == 0, trained.stderr[-2000:]
    cli_json("models", "promote", "maint-qa-v1", "--json")
    # This test is about gate 3: gates 1-2 get room, so a 6-step model's noise does not decide it.
    task = cli_json("models", "policy", "maint-qa", "--engines", "--engine-variant", "genai-int4", "--engine-recipe",
                    str(broken), "--engine-max-rel-diff", TIGHT_REL_DIFF, "--max-forgetting", "1",
                    "--new-data-tolerance", "1", "--json")["task"]
    assert task["engine_variant"] == "genai-int4" and task["engine_recipe"]["int4_block_size"] == 16

    source = write_jsonl(tmp_path / "b", "radiology.jsonl", chats("radiology")[:40])
    assert run_cli("data", "import", str(source), "--name", "maint", "--near-dup", "off").returncode == 0
    done = run_cli("retrain", "maint-qa", "--replay", "0.5", "--wait", "--json", timeout=1800)
    assert done.returncode == 1, done.stderr[-2000:]  # --wait: exit 1 when the gates reject the result
    v2 = json.loads(done.stdout)["version"]
    gate = v2["gates"]["engine_parity"]
    print("\nbroken recipe, gate 3:", json.dumps({k: gate.get(k) for k in ("status", "failures", "quality", "recipe")}))
    quality = gate["quality"]
    print(f"\nbroken recipe: genai-int4 perplexity {quality['variant']:.4f} vs float {quality['float']:.4f} "
          f"({quality['increase']:+.2%})")
    assert v2["state"] == "rejected" and gate["status"] == "fail" and gate["runtime"] == "onnxruntime-genai (CPU)"
    # what was judged is what would serve: base + this version's adapter file (the base built by this retrain)
    assert gate["route"]["route"] == "adapter" and gate["route"]["reason"] is None
    assert quality["max_increase"] == 0.0 and quality["metric"] == "perplexity"  # measured, reported: -0.20%
    rel = gate["measured"]["max_rel_diff"]
    assert rel > 5 * float(TIGHT_REL_DIFF)  # measured 0.113: see BROKEN_INT4
    line = (f"engine parity: genai-int4 export on onnxruntime-genai (CPU): max relative difference {rel:.3g} > "
            f"{TIGHT_REL_DIFF} (task policy)")
    assert line in v2["reasons"]
    assert gate["recipe"]["int4_block_size"] == 16 and gate["engine"]["built"] is False
    assert not any(k.startswith("genai_") for k in v2["artifacts"])  # nothing stored for a rejected variant
    db = open_catalog()
    keys = keys_for(db, airlock_home)
    run2 = get_run(db, v2["run_id"])
    assert not any(name.startswith("genai-") for name in list_files(airlock_home, run2.artifact))
    assert not any((airlock_home / "scratch").iterdir())  # the builder's plaintext is gone
    production = [v["id"] for v in cli_json("models", "list", "--json")["versions"] if v["state"] == "production"]
    assert production == ["maint-qa-v1"]  # production untouched

    # The default recipe: the same retrain passes gate 3, and the one export it judged is what would serve.
    cli_json("models", "policy", "maint-qa", "--engine-recipe", str(good), "--engine-max-rel-diff", "10", "--json")
    source = write_jsonl(tmp_path / "c", "maint2.jsonl", maintenance[60:100])
    assert run_cli("data", "import", str(source), "--name", "maint", "--near-dup", "off").returncode == 0
    done = run_cli("retrain", "maint-qa", "--replay", "0.5", "--wait", "--json", timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    v3 = json.loads(done.stdout)["version"]
    gate = v3["gates"]["engine_parity"]
    print(f"default recipe: genai-int4 perplexity {gate['quality']['variant']:.4f} vs float "
          f"{gate['quality']['float']:.4f} ({gate['quality']['increase']:+.2%})")
    assert v3["state"] == "candidate" and gate["status"] == "pass", v3["reasons"]
    assert gate["quality"]["increase"] <= 0.05  # measured -0.00% (2.2168 vs 2.2169; the merged route gave +0.34%)
    export = v3["artifacts"]["genai_int4"]
    run3 = get_run(db, v3["run_id"])
    report = stored_report(db, keys, airlock_home, run3)
    assert export["sha256"] == report["variants"]["genai-int4"]["sha256"] == gate["onnx_sha256"]
    assert set(report["variants"]) == {"genai-int4"} and report["runtime"]["genai_variant"] == "genai-int4"
    assert set(export["files"]) == {"genai-int4.adapter.onnx_adapter"} <= set(list_files(airlock_home, run3.artifact))
    # the adapter route: the version's artifact names the base it needs (not as its own "object": never shredded with
    # the version), the base object holds the graph and this version's reference
    assert export["route"] == "adapter" and gate["route"]["bytes_written"] > export["bytes"]  # this retrain built it
    base = report["variants"]["genai-int4"]["base"]
    assert export["base"] == {k: base[k] for k in ("object", "sha256", "bytes")} and base["built"] is True
    assert {"base.json", f"ref.{run3.artifact}", "genai-int4.model.onnx.data"} <= set(
        list_files(airlock_home, base["object"]))
    choice = runtime_for_run(db, keys, airlock_home, run3)
    assert choice.kind == "genai-cpu" and choice.reason.startswith("onnxruntime-genai on the CPU: genai-int4")
    card = run_cli("models", "card", v3["id"]).stdout
    assert "engine parity gate: pass, genai-int4 export measured on onnxruntime-genai (CPU)" in card
    db.close()
