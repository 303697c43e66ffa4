"""The adapter route wired end to end (appliance/optimize/genai_jobs.py, docs/adr/0016): two LoRA versions of one base
optimized to genai-int4 store ONE base graph in its own vault object and one adapter file each; what serves is base +
the version's adapter, checked file by file against the report; a refused LoRA variant falls back to the merged export.

Real builder (the tiny model's int4 base, built once), real vault (in-process keys), real og.Generator and ONNX
Runtime; the optimize job's own functions (measure_genai_variants, store_genai_export, load_genai_backend) over a
real job row. The two "runs" are Run records whose vault objects these functions create: the training that the CLI
tests cover is not repeated here (test_genai_jobs.py runs the route through `airlock optimize`). The first test takes
14 s on two quiet cores (76 s when other suites loaded them), so it is not slow-marked.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.appliance.optimize.conftest import corpus_texts

PASSPHRASE = "adapter route pass phrase"
NEW_TOKENS = 8


@pytest.fixture
def vault(airlock_home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, Path]:
    """(db, keys, home): an initialized vault whose root key this process holds (the job's KeyOps)."""
    from appliance.catalog import open_catalog
    from appliance.vault.keys import LocalKeys
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import Credential, init_vault, open_root

    monkeypatch.setenv("AIRLOCK_KDF_PROFILE", "test")  # test-only KDF cost
    db = open_catalog()
    init_vault(db, PASSPHRASE, passphrase_kdf())
    _, root = open_root(db, Credential.passphrase(PASSPHRASE))
    return db, LocalKeys(root), airlock_home


def _second_version(lora_merged_lm: dict[str, Any]) -> dict[str, Any]:
    """Version 2: the same LoRA structure (rank 8 on every projection), other weights (B drawn with another seed)."""
    import torch
    from peft import get_peft_model_state_dict

    from appliance.base_models import resolve_base_model
    from appliance.optimize.quantize import load_merged_causal_lm
    from appliance.train.lm import build_lora_model
    from appliance.train.recipe import LoraRecipe

    base, recipe = resolve_base_model("tiny-deepseek-r1"), LoraRecipe(rank=8, alpha=16, dropout=0.0, seed=0)
    peft_model, _ = build_lora_model(base, recipe)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1000 + len(name)))
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    merged, _ = load_merged_causal_lm(base, adapter, recipe)
    return {"model": merged, "adapter": adapter, "lora_config": peft_model.peft_config["default"]}


def _run(run_id: str, job: Any, base_hash: str) -> Any:
    from appliance.train.artifacts import artifact_object_id
    from appliance.train.runs import Run

    return Run(id=run_id, kind="lm", task="qa", job_id=job.id, base_model="tiny-deepseek-r1", base_hash=base_hash,
               dataset_id="ds", dataset_name="qa", dataset_version=1, dataset_hash="0" * 64, recipe={},
               recipe_hash="0" * 64, state="succeeded", metrics={}, lineage={}, artifact=artifact_object_id(run_id),
               error=None, created_at="2026-12-06T00:00:00Z", started_at=None, finished_at=None, actor="test")


def _vault_bytes(home: Path) -> dict[str, int]:
    """Ciphertext bytes on disk per vault object."""
    root = home / "vault" / "objects"
    return {d.name: sum(f.stat().st_size for f in d.iterdir()) for d in root.iterdir() if d.is_dir()}


def _ort_greedy(session: Any, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens from validation's ONNX Runtime session (the graph fed the adapter's tensors), no KV cache."""
    from appliance.optimize.genai_validate import session_logits

    tokens: list[int] = []
    for _ in range(steps):
        tokens.append(int(session_logits(session, [prompt + tokens])[0, -1].argmax()))
    return tokens


def test_two_versions_share_one_stored_base_serve_their_own_adapter_and_tampering_refuses(
        vault, lora_merged_lm, lm_data):
    import time

    import numpy as np
    import torch

    from appliance.base_models import resolve_base_model
    from appliance.jobs import records
    from appliance.jobs.runner import JobContext
    from appliance.optimize.errors import ExportError
    from appliance.optimize.genai_adapters import ADAPTER_FILE, read_onnx_adapter
    from appliance.optimize.genai_export import scratch_dir, vault_name
    from appliance.optimize.genai_jobs import (
        LoraSource,
        base_object_for,
        fetch_base,
        genai_summary,
        load_genai_backend,
        measure_genai_variants,
        store_genai_export,
        stored_base,
    )
    from appliance.optimize.genai_validate import held_out_examples, ort_genai_session, torch_perplexity
    from appliance.optimize.recipe import QuantRecipe
    from appliance.serve.backends import Sampling
    from appliance.train.fingerprints import base_model_hash
    from appliance.train.lm import encode_records
    from appliance.vault.errors import ObjectError
    from appliance.vault.store import delete_object, list_files, write_bytes

    db, keys, home = vault
    tokenizer = lora_merged_lm["tokenizer"]
    checkpoint = resolve_base_model("tiny-deepseek-r1").path
    base_hash = base_model_hash(checkpoint)
    examples = held_out_examples(encode_records(tokenizer, [{"text": t} for t in corpus_texts()[600:608]], 96, "q"))
    job = records.create_job(db, "optimize", {}, actor="test")
    ctx = JobContext(db, job, home)
    versions = [lora_merged_lm, _second_version(lora_merged_lm)]
    runs = [_run("v1", job, base_hash), _run("v2", job, base_hash)]
    reports, timings, written = [], [], []
    for version, run in zip(versions, runs, strict=True):
        before = _vault_bytes(home) if (home / "vault" / "objects").is_dir() else {}
        started = time.perf_counter()
        with scratch_dir(home, f"test-{run.id}") as work:
            lora = LoraSource(version["adapter"], version["lora_config"], checkpoint, "tiny-deepseek-r1", base_hash,
                              keys)
            validated, exports = measure_genai_variants(
                ctx, version["model"], tokenizer, ["genai-int4"], QuantRecipe(), lm_data["prompts"], examples,
                torch_perplexity(version["model"], examples), work, eos_ids=[tokenizer.eos_token_id],
                decode_tokens=NEW_TOKENS, lora=lora)
            assert validated["genai-int4"]["ok"], validated["genai-int4"]["failures"]
            store_genai_export(db, keys, home, run, exports["genai-int4"])
        timings.append(time.perf_counter() - started)
        after = _vault_bytes(home)
        written.append(sum(after.values()) - sum(before.values()))
        reports.append({"variants": {"genai-int4": genai_summary(validated["genai-int4"])}})

    first, second = (r["variants"]["genai-int4"] for r in reports)
    print(f"\nv1 (base built): {timings[0]:.1f} s, {written[0]} bytes of ciphertext; v2 (base reused): "
          f"{timings[1]:.1f} s, {written[1]} bytes; base {first['base']['bytes']} bytes, adapter {first['bytes']} "
          f"bytes; int4 perplexity +{first['quality']['increase']:.2%} / +{second['quality']['increase']:.2%}")
    # Both took the adapter route; one base key, one base object; the first built it, the second did not.
    assert first["route"] == second["route"] == "adapter"
    assert first["base"]["built"] is True and second["base"]["built"] is False
    assert first["base"]["object"] == second["base"]["object"] and first["base"]["sha256"] == second["base"]["sha256"]
    base_object = first["base"]["object"]
    objects = sorted(_vault_bytes(home))
    assert [o for o in objects if o.startswith("genai-base-")] == [base_object]
    assert set(first["base"]["files"]) == {"model.onnx", "model.onnx.data", "genai_config.json", "lora_inputs.json"}
    # What each version stored: its adapter file in its own object, the base's files once, a reference per version.
    assert list_files(home, "run-v1") == list_files(home, "run-v2") == [vault_name("genai-int4", ADAPTER_FILE)]
    assert sorted(list_files(home, base_object)) == sorted(
        ["base.json", "ref.run-v1", "ref.run-v2", *(vault_name("genai-int4", f) for f in first["base"]["files"])])
    assert first["bytes_written"] == first["bytes"] + first["base"]["bytes"] and second["bytes_written"] == \
        second["bytes"]
    # On disk (ciphertext): the second optimize wrote about its adapter (plus headers and the empty reference),
    # nowhere near the base (tiny model: adapter ~0.3 MB, base several MB).
    assert written[1] < second["bytes"] + 64 * 1024 < first["base"]["bytes"] <= written[0]
    assert first["files"] != second["files"]  # two versions, two adapters

    # Serving: base + the version's adapter, og.Generator with it active; greedy tokens = validation's ONNX Runtime
    # session over the same graph fed the same adapter; version 1 says something else.
    prompt = list(lm_data["prompts"][0])
    served, backends = [], []
    for run, report in zip(runs, reports, strict=True):
        backend = load_genai_backend(db, keys, home, run, report, "genai-int4")
        # og.Adapters for og.Generator; the batch session holds the version's LoRA tensors as its initializers
        assert backend.adapters is not None and set(backend.session.airlock_initializers) == set(
            first["base"]["fields"]["lora"]["inputs"])
        served.append(list(backend.generate(prompt, Sampling(max_new_tokens=NEW_TOKENS, temperature=0.0),
                                            lambda: False)))
        backends.append(backend)
    assert not any((home / "scratch").iterdir())  # the decrypted files went at once
    with scratch_dir(home, "reference") as folder:
        base = fetch_base(db, keys, home, base_object, stored_base(db, keys, home, base_object), folder)
        with scratch_dir(home, "adapter") as adapter_folder:
            (adapter_folder / "a.onnx_adapter").write_bytes(
                _read(db, keys, home, "run-v2", vault_name("genai-int4", ADAPTER_FILE)))
            tensors_v2 = read_onnx_adapter(adapter_folder / "a.onnx_adapter")
        session = ort_genai_session(base, adapter=tensors_v2)
        expected = _ort_greedy(session, prompt, NEW_TOKENS)
        bare = torch.from_numpy(np.asarray(_last_logits(ort_genai_session(base), prompt)))  # the base model alone
    print(f"served v1 {served[0]}, v2 {served[1]}, validation session v2 {expected}")
    assert served[1] == expected and served[0] != served[1]
    # What the server runs by default: the scheduler's batch, its KV cache in place (KVSlots), the adapter bound
    # once per batch; two requests of version 2 decoded together give validation's tokens each.
    from appliance.serve.backends import RunnerLMBackend
    from appliance.serve.batching import BatchingLMBackend

    batched = BatchingLMBackend(RunnerLMBackend(backends[1], backends[1].kv_shape), 4)
    assert batched.slotted
    greedy = Sampling(max_new_tokens=NEW_TOKENS, temperature=0.0)
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda _: list(batched.generate(prompt, greedy, lambda: False)), range(2)))
    assert together == [expected, expected]
    # The server's batch paths (an ORT session over the same graph with the version's LoRA tensors as its
    # initializers): forward_batch and the scheduler's in-place cache (KVSlots, IO-bound) give the version's prefill
    # logits, not the base model's (measured max difference ~1e-6 vs ~0.7).
    ids = torch.tensor([prompt])
    mask, positions = torch.ones_like(ids), torch.arange(len(prompt))[None]
    logits, _ = backends[1].forward_batch(ids, mask, positions, None)
    slotted = torch.from_numpy(np.asarray(backends[1].kv_slots().prefill(0, prompt))).reshape(-1)
    reference = torch.from_numpy(np.asarray(_last_logits(session, prompt)))
    assert (bare - reference).abs().max() > 0.05  # the adapter changes this prompt's logits: the checks can fail
    for batch_logits in (logits[0], slotted):
        assert torch.allclose(batch_logits, reference, atol=1e-3), (batch_logits - reference).abs().max()
    del backends, session

    # Fail closed, one line each: a base file that is not the validated one (rewritten through the vault: it
    # decrypts, its digest differs), an adapter file damaged on disk (fails authentication).
    adapter_path = home / "vault" / "objects" / "run-v1" / (vault_name("genai-int4", ADAPTER_FILE) + ".alv")
    data = bytearray(adapter_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    adapter_path.write_bytes(bytes(data))
    with pytest.raises(ExportError) as refused:
        load_genai_backend(db, keys, home, runs[0], reports[0], "genai-int4")
    print(refused.value.message)
    assert refused.value.message.startswith("the genai-int4 adapter of run v1: adapter.onnx_adapter cannot be read")
    assert "\n" not in refused.value.message and "airlock optimize" in refused.value.hint
    config = vault_name("genai-int4", "genai_config.json")
    write_bytes(db, keys, home, base_object, config, _read(db, keys, home, base_object, config) + b" ",
                overwrite=True)
    with pytest.raises(ExportError) as refused:
        load_genai_backend(db, keys, home, runs[1], reports[1], "genai-int4")
    print(refused.value.message)
    assert refused.value.message == (f"the genai-int4 base {base_object} of run v2: the genai export file "
                                     "genai_config.json is not the one its optimize report validated")
    assert not any((home / "scratch").iterdir())

    # The shared base is shredded only when no version's object needs it any more.
    with pytest.raises(ObjectError, match=f"object {base_object} is still needed by run-v1, run-v2"):
        delete_object(db, home, base_object)
    delete_object(db, home, "run-v1")
    with pytest.raises(ObjectError, match=r"still needed by run-v2$"):
        delete_object(db, home, base_object)
    delete_object(db, home, "run-v2")
    assert delete_object(db, home, base_object) > 0
    # A shredded object's id stays taken: the same key's next base is the next generation of it.
    assert base_object_for(db, first["base"]["key"]) == f"{base_object}-2"


def _read(db: Any, keys: Any, home: Path, object_id: str, name: str) -> bytes:
    from appliance.vault.store import read_bytes

    return read_bytes(db, keys, home, object_id, name)


def _last_logits(session: Any, prompt: list[int]) -> Any:
    from appliance.optimize.genai_validate import session_logits

    return session_logits(session, [prompt])[0, -1]


def test_a_lora_variant_without_an_adapter_route_ships_merged_with_the_reason(vault, lora_merged_lm, lm_data):
    from appliance.base_models import resolve_base_model
    from appliance.jobs import records
    from appliance.jobs.runner import JobContext
    from appliance.optimize.genai_export import scratch_dir
    from appliance.optimize.genai_jobs import LoraSource, measure_genai_variants
    from appliance.optimize.genai_validate import held_out_examples, torch_perplexity
    from appliance.optimize.recipe import QuantRecipe
    from appliance.train.lm import encode_records

    db, keys, home = vault
    tokenizer, model = lora_merged_lm["tokenizer"], lora_merged_lm["model"]
    examples = held_out_examples(encode_records(tokenizer, [{"text": t} for t in corpus_texts()[600:604]], 96, "q"))
    ctx = JobContext(db, records.create_job(db, "optimize", {}, actor="test"), home)
    dora = dataclasses.replace(lora_merged_lm["lora_config"], use_dora=True)
    with scratch_dir(home, "test-dora") as work:
        lora = LoraSource(lora_merged_lm["adapter"], dora, resolve_base_model("tiny-deepseek-r1").path,
                          "tiny-deepseek-r1", "0" * 64, keys)
        validated, _ = measure_genai_variants(
            ctx, model, tokenizer, ["genai-int4"], QuantRecipe(), lm_data["prompts"], examples,
            torch_perplexity(model, examples), work, eos_ids=[tokenizer.eos_token_id], decode_tokens=4, lora=lora)
    report = validated["genai-int4"]
    assert report["ok"], report["failures"]
    assert report["route"] == "merged" and "base" not in report
    assert report["route_reason"] == ("this LoRA variant (DoRA, rsLoRA or per-module rank/alpha) has no "
                                      "adapter-file route")
    assert set(report["files"]) == {"model.onnx", "model.onnx.data", "genai_config.json"}
    assert report["bytes_written"] == report["bytes"] > 1_000_000  # a whole export per version
    assert not (home / "vault" / "objects").is_dir() or not any(
        d.name.startswith("genai-base-") for d in (home / "vault" / "objects").iterdir())
