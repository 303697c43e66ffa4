"""Gate 3 on the genai variant production serves: a task whose engine variant is genai-int4 gets each retrain built by
onnxruntime-genai's builder with the task's own quantization recipe, validated, and judged on held-out perplexity
against the float candidate. A recipe that breaks the int4 model rejects the retrain with both numbers and stores
nothing; the default recipe passes, stores that one export, and it is what the runtime chooser serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.catalog import open_catalog
from tests.appliance.registry.conftest import chats, cli_json, write_jsonl
from tests.conftest import fix_site_secret, run_cli

SHORT_RECIPE = "max_steps = 6\neval_every = 6\nbatch_size = 2\nmax_length = 96\nlr = 3e-3\nseed = 3\n"
# int4 with the LM head (tied to the embeddings) quantized too, under a task that allows no perplexity increase at
# all. The tiny model barely notices int4, so what breaks the gate here is the task's zero tolerance. Measured with
# the fixed site secret: held-out perplexity 2.1461 vs float 2.1379, +0.39%, against +0.0% allowed (kernel rounding
# moves such a number by ~1e-5); the coarser block 256 gave only +8.9e-5 and block 128 +0.10%, too close to call.
# The default recipe on the next retrain: 2.2245 vs 2.2169, +0.34%, 4.7 points inside the default +5%.
BROKEN_INT4 = "int4_block_size = 16\nquantize_lm_head = true\nmax_perplexity_increase = 0.0\n"
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
                    str(broken), "--max-forgetting", "1", "--new-data-tolerance", "1", "--json")["task"]
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
    assert quality["increase"] > quality["max_increase"] == 0.0  # measured +0.39%: see BROKEN_INT4
    line = (f"engine parity: genai-int4 export on onnxruntime-genai (CPU): optimize validation: quality: perplexity "
            f"{quality['variant']:.4g} vs float {quality['float']:.4g} ({quality['increase']:+.1%}; the task allows "
            f"+0.0%)")
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
    cli_json("models", "policy", "maint-qa", "--engine-recipe", str(good), "--json")
    source = write_jsonl(tmp_path / "c", "maint2.jsonl", maintenance[60:100])
    assert run_cli("data", "import", str(source), "--name", "maint", "--near-dup", "off").returncode == 0
    done = run_cli("retrain", "maint-qa", "--replay", "0.5", "--wait", "--json", timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    v3 = json.loads(done.stdout)["version"]
    gate = v3["gates"]["engine_parity"]
    print(f"default recipe: genai-int4 perplexity {gate['quality']['variant']:.4f} vs float "
          f"{gate['quality']['float']:.4f} ({gate['quality']['increase']:+.2%})")
    assert v3["state"] == "candidate" and gate["status"] == "pass", v3["reasons"]
    assert gate["quality"]["increase"] <= 0.05  # measured +0.34%
    export = v3["artifacts"]["genai_int4"]
    run3 = get_run(db, v3["run_id"])
    report = stored_report(db, keys, airlock_home, run3)
    assert export["sha256"] == report["variants"]["genai-int4"]["sha256"] == gate["onnx_sha256"]
    assert set(report["variants"]) == {"genai-int4"} and report["runtime"]["genai_variant"] == "genai-int4"
    assert set(export["files"]) <= set(list_files(airlock_home, run3.artifact))
    choice = runtime_for_run(db, keys, airlock_home, run3)
    assert choice.kind == "genai-cpu" and choice.reason.startswith("onnxruntime-genai on the CPU: genai-int4")
    card = run_cli("models", "card", v3["id"]).stdout
    assert "engine parity gate: pass, genai-int4 export measured on onnxruntime-genai (CPU)" in card
    db.close()
