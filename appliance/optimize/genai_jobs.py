"""The genai variants inside the optimize job: build, validate, gate, store, and load one to serve.

    validated, exports = measure_genai_variants(ctx, model, tokenizer, ["genai-int4"], recipe, prompts,
                                                examples, float_ppl, work, lora=LoraSource(...))
    store_genai_export(ctx, keys, run, exports["genai-int4"])      # encrypted into run-<id> (and the base object)
    backend = load_genai_backend(db, keys, home, run, report, "genai-int4")   # og.Model, the scratch copy removed

Two routes (docs/adr/0016), recorded per variant in the report as `route`:

- "merged": the LoRA adapter merged into the weights, one graph per version. Vault layout, in the run's object
  beside the Q/DQ exports: `genai-fp32.model.onnx`, `genai-fp32.model.onnx.data`, `genai-fp32.genai_config.json`;
  the report records each file's SHA-256 and their manifest digest. fp32, int8, CUDA variants, and LoRA variants
  the adapter format cannot express (DoRA, rsLoRA, rank patterns: `route_reason` says which).
- "adapter" (genai-int4 of a LoRA run): the version's weights as an ONNX Runtime adapter file,
  `genai-int4.adapter.onnx_adapter` in the run's object, over a base graph stored ONCE in its own object
  `genai-base-<key>` (`genai_adapters.base_key`: base model hash, builder options, LoRA structure, versions):
  `genai-int4.model.onnx`, `.model.onnx.data`, `.genai_config.json`, `.lora_inputs.json`, then `base.json` (its
  manifest, written last: a base without it is incomplete and is rewritten) and one empty `ref.<run object>` per
  version that uses it (`vault.store.delete_object` refuses to shred it while such an object exists). A later
  optimize with the same key decrypts the stored base instead of running the builder. The report's `base` names
  the object, its files' SHA-256 and manifest digest; `files` / `sha256` / `bytes` are the adapter file's;
  `bytes_written` counts what storing it writes (the adapter, plus the base when this run built it; a variant
  that fails validation or a gate stores nothing).

Serving decrypts the files (base + adapter for the adapter route) into a private scratch folder, checks every
digest against the report, loads `og.Model` (and `og.Adapters`; ONNX Runtime reads the weights into memory) and
removes the folder at once.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.optimize.genai_export import GENAI_VARIANTS, GenAIExport, manifest_sha256, vault_name

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.jobs.runner import JobContext
    from appliance.optimize.recipe import QuantRecipe
    from appliance.train.runs import Run
    from appliance.vault.keys import KeyOps

CPU_GENAI_ORDER = ("genai-int4", "genai-int8", "genai-fp32")
"""Ties in measured speed go to the smaller export."""
BASE_MANIFEST = "base.json"


@dataclass
class LoraSource:
    """What the adapter route needs of a LoRA run: its adapter (peft state dict, LoraConfig), the base model's
    Hugging Face folder (what the builder reads) and identity, and the keys to find or store a shared base."""

    adapter_state: dict[str, Any]
    lora_config: Any
    checkpoint: Path
    base_model: str
    base_hash: str
    keys: KeyOps


@dataclass
class AdapterExport:
    """A version's adapter file (plaintext, in scratch) over a base graph: built here, or decrypted from the vault."""

    variant: str
    base: GenAIExport
    base_object: str
    base_key: str
    base_fields: dict[str, Any]
    built: bool
    """True when this job ran the builder (the base is not stored yet)."""
    adapter: Path
    tensors: dict[str, Any] = field(repr=False, default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    """ADAPTER_FILE -> SHA-256: what the run's own object receives."""

    @property
    def path(self) -> Path:
        return self.adapter.parent

    @property
    def bytes(self) -> int:
        return self.adapter.stat().st_size

    @property
    def sha256(self) -> str:
        return manifest_sha256(self.files)

    def route(self) -> dict[str, Any]:
        """What the report records of the route."""
        return {"route": "adapter", "files": dict(self.files), "sha256": self.sha256, "bytes": self.bytes,
                "bytes_written": self.bytes + (self.base.bytes if self.built else 0),
                "base": {"object": self.base_object, "key": self.base_key, "files": dict(self.base.files),
                         "sha256": self.base.sha256, "bytes": self.base.bytes, "built": self.built,
                         "fields": self.base_fields}}


def measure_genai_variants(ctx: JobContext, model: Any, tokenizer: Any, variants: list[str], recipe: QuantRecipe,
                           prompts: list[list[int]], examples: list[tuple[list[int], list[int]]], float_ppl: float,
                           work: Path, *, eos_ids: list[int], decode_tokens: int, lora: LoraSource | None = None
                           ) -> tuple[dict[str, dict[str, Any]], dict[str, GenAIExport | AdapterExport]]:
    """Build each genai variant, validate what would serve, and gate it on perplexity against the float model.

    `model`: the merged float model (the reference, and what the merged route builds). With `lora`, genai-int4 takes
    the adapter route (module docstring): base + this version's adapter file is what validation and the gate judge."""
    from appliance.optimize.errors import OptimizeError
    from appliance.optimize.genai_adapters import adapter_route_refusal
    from appliance.optimize.genai_export import build_genai_model, save_checkpoint
    from appliance.optimize.genai_validate import ort_genai_session, session_perplexity, validate_genai_export
    from appliance.optimize.quality_gate import perplexity_gate

    validated: dict[str, dict[str, Any]] = {}
    exports: dict[str, GenAIExport | AdapterExport] = {}
    checkpoint = work / "checkpoint"
    for variant in variants:
        if ctx.should_stop():
            break
        why_merged = ("the run has no LoRA adapter" if lora is None
                      else adapter_route_refusal(variant, lora.lora_config, lora.adapter_state))
        route: dict[str, Any] = {"route": "merged", "route_reason": why_merged}
        try:
            if why_merged is None:
                export: GenAIExport | AdapterExport = adapter_export(ctx, lora, model, tokenizer, variant, recipe,
                                                                     work)
            else:
                if not checkpoint.is_dir():
                    ctx.progress("writing the merged checkpoint for the onnxruntime-genai builder")
                    save_checkpoint(model, tokenizer, checkpoint)
                ctx.progress(f"building {variant} with onnxruntime-genai ({why_merged})", variant=variant)
                export = build_genai_model(model, tokenizer, work, variant=variant, recipe=recipe,
                                           checkpoint=checkpoint, log=ctx.log)
        except OptimizeError as exc:
            validated[variant] = {"variant": variant, "ok": False, "failures": [exc.message], **route}
            continue
        route = export.route() if isinstance(export, AdapterExport) else {**route, "bytes_written": export.bytes}
        if GENAI_VARIANTS[variant][1] == "cuda":
            validated[variant] = {"variant": variant, "ok": False, "bytes": export.bytes, "sha256": export.sha256,
                                  "files": export.files, **route, "failures": [
                                      "built for CUDA; validated and served only on a GPU with onnxruntime-genai-cuda "
                                      "(run `airlock optimize` there)"]}
            continue
        graph = export.base if isinstance(export, AdapterExport) else export
        tensors = export.tensors if isinstance(export, AdapterExport) else None
        ctx.progress(f"validating {variant} (PyTorch parity, og.Generator batch of 8)", variant=variant)
        report = validate_genai_export(graph, model, prompts, decode_tokens=decode_tokens, eos_ids=eos_ids,
                                       adapter_tensors=tensors,
                                       adapter_file=export.adapter if isinstance(export, AdapterExport) else None)
        ctx.progress(f"measuring {variant} perplexity on {len(examples)} held-out examples", variant=variant)
        perplexity = session_perplexity(ort_genai_session(graph, adapter=tensors), examples)
        gate = perplexity_gate(float_ppl, perplexity, max_increase=recipe.max_perplexity_increase)
        report.update(route)
        report["quality"] = gate
        if not gate["ok"]:
            report["failures"].append(gate["failure"])
            report["ok"] = False
        validated[variant], exports[variant] = report, export
    return validated, exports


def adapter_export(ctx: JobContext, lora: LoraSource, model: Any, tokenizer: Any, variant: str, recipe: QuantRecipe,
                   work: Path) -> AdapterExport:
    """This version's adapter file over the base of its key: the stored base decrypted when there is one (no builder
    run), else built from the base model and a zero adapter of the same LoRA structure."""
    from appliance.optimize.genai_adapters import (
        ADAPTER_FILE,
        base_key,
        base_key_fields,
        build_genai_base,
        lora_inputs_of,
        lora_tensors,
        write_onnx_adapter,
    )
    from appliance.optimize.genai_export import _sha256_file

    fields = base_key_fields(base_model=lora.base_model, base_hash=lora.base_hash, variant=variant, recipe=recipe,
                             lora_config=lora.lora_config, adapter_state=lora.adapter_state)
    key = base_key(fields)
    object_id = base_object_for(ctx.db, key)
    stored = stored_base(ctx.db, lora.keys, ctx.home, object_id)
    if stored is not None:
        ctx.progress(f"{variant}: reusing the stored base {object_id} (no builder run)", variant=variant)
        base = fetch_base(ctx.db, lora.keys, ctx.home, object_id, stored, work / f"{variant}-base")
    else:
        ctx.progress(f"building the {variant} base for LoRA adapters with onnxruntime-genai (once per base model, "
                     "recipe and LoRA structure)", variant=variant)
        base = build_genai_base(model, tokenizer, lora.lora_config, lora.adapter_state, work, variant=variant,
                                recipe=recipe, checkpoint=lora.checkpoint, log=ctx.log)
    tensors = lora_tensors(lora.adapter_state, lora.lora_config)
    folder = work / f"{variant}-adapter"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    adapter = folder / ADAPTER_FILE
    write_onnx_adapter(tensors, adapter, expected=lora_inputs_of(base.path))
    return AdapterExport(variant, base, object_id, key, fields, stored is None, adapter, tensors,
                         {ADAPTER_FILE: _sha256_file(adapter)})


def base_object_for(db: sqlite_utils.Database, key: str) -> str:
    """The vault object of a base key: `genai-base-<key>`, or where that one was shredded (its last version deleted,
    then the base by hand: a shredded object's id stays taken) the next generation, `-2`, `-3`, ..."""
    from appliance.optimize.genai_adapters import base_object_id
    from appliance.vault import records
    from appliance.vault.errors import ObjectError

    first = base_object_id(key)
    for generation in range(1, 10_000):
        object_id = first if generation == 1 else f"{first}-{generation}"
        try:
            if records.dek(db, object_id).state == "shredded":
                continue
        except ObjectError:  # not in the vault: this generation is free
            pass
        return object_id
    raise AssertionError(f"{first}: 10,000 generations shredded")  # unreachable in practice


def stored_base(db: sqlite_utils.Database, keys: KeyOps, home: Path, object_id: str) -> dict[str, Any] | None:
    """The manifest of a complete stored base (its `base.json`, written last), or None."""
    from appliance.vault import records
    from appliance.vault.errors import ObjectError
    from appliance.vault.store import list_files, read_bytes

    try:
        if records.dek(db, object_id).state != "active":
            return None
    except ObjectError:
        return None
    if BASE_MANIFEST not in list_files(home, object_id):
        return None
    return json.loads(read_bytes(db, keys, home, object_id, BASE_MANIFEST))


def fetch_base(db: sqlite_utils.Database, keys: KeyOps, home: Path, object_id: str, manifest: dict[str, Any],
               folder: Path) -> GenAIExport:
    """Decrypt a stored base into `folder` (scratch), its files checked against its manifest."""
    from appliance.optimize.genai_export import check_export_files
    from appliance.vault.store import read_into

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    variant, files = manifest["variant"], manifest["files"]
    for name in files:
        with (folder / name).open("wb") as dst:
            read_into(db, keys, home, object_id, vault_name(variant, name), dst)
    check_export_files(folder, files)
    return GenAIExport(variant, folder, dict(files), dict(manifest.get("options", {})))


def store_genai_export(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run,
                       export: GenAIExport | AdapterExport) -> str:
    """Stream each file of a validated genai export into the run's vault object. Returns the object id.

    The adapter route writes the adapter file there, the base into its own object when this job built it (else
    the stored one must be the one validated), and the run's reference into the base object."""
    from appliance.train.artifacts import save_artifact
    from appliance.vault.store import REF_PREFIX, write_bytes, write_file

    object_id = save_artifact(db, keys, home, run.id, {})
    if isinstance(export, AdapterExport):
        store_base(db, keys, home, export)
        write_bytes(db, keys, home, export.base_object, f"{REF_PREFIX}{object_id}", b"", overwrite=True)
    for name in export.files:
        with (export.path / name).open("rb") as src:
            write_file(db, keys, home, object_id, vault_name(export.variant, name), src, overwrite=True)
    return object_id


def store_base(db: sqlite_utils.Database, keys: KeyOps, home: Path, export: AdapterExport) -> None:
    """The base graph into its own object, once: its files, then its manifest (what makes it reusable)."""
    from appliance.optimize.errors import OptimizeError
    from appliance.vault import records, store
    from appliance.vault.errors import ObjectError

    base = export.base
    stored = stored_base(db, keys, home, export.base_object)
    if stored is not None:
        if stored["sha256"] != base.sha256:  # another job stored a base of the same key first, other bytes
            raise OptimizeError(f"the stored base {export.base_object} is not the one this job validated the adapter "
                                "on", hint="run the optimize again: it reuses the stored base")
        return
    try:
        records.dek(db, export.base_object)  # a job that died after creating it: write again, same object
    except ObjectError:
        store.create_object(db, keys, export.base_object, "model")
    for name in base.files:
        with (base.path / name).open("rb") as src:
            store.write_file(db, keys, home, export.base_object, vault_name(base.variant, name), src, overwrite=True)
    manifest = {"format": export.base_fields["format"], "key": export.base_key, "fields": export.base_fields,
                "variant": base.variant, "files": base.files, "sha256": base.sha256, "bytes": base.bytes,
                "options": base.options}
    store.write_bytes(db, keys, home, export.base_object, BASE_MANIFEST,
                      json.dumps(manifest, sort_keys=True).encode(), overwrite=True)


def choose_genai_variant(report: dict[str, Any], usable: list[str], *, gpu: bool) -> str | None:
    """The stored genai variant to serve here: on the CPU the fastest measured decode (og.Generator, batch of 8)
    among those that passed validation and the quality gate; on a GPU with onnxruntime-genai-cuda a CUDA one."""
    if gpu:
        return next((v for v in ("genai-int4-cuda", "genai-fp16-cuda", "genai-bf16-cuda") if v in usable), None)
    candidates = [v for v in CPU_GENAI_ORDER if v in usable]
    if not candidates:
        return None

    def speed(variant: str) -> float:
        value = report["variants"][variant].get("generator", {}).get("decode_tokens_per_s")
        return float(value) if isinstance(value, int | float) else 0.0

    return max(candidates, key=lambda v: (speed(v), -CPU_GENAI_ORDER.index(v)))


def load_genai_backend(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, report: dict[str, Any],
                       variant: str, *, device: str = "cpu", batched_only: bool = False) -> Any:
    """Decrypt a stored genai export (base + adapter for the adapter route) into scratch, check every file against the
    report, load og.Model (and the version's adapter), remove the files. Fails closed with one line.
    `batched_only`: a CPU server that batches loads the batch session alone (GenAILMBackend.load)."""
    import secrets

    from appliance.optimize.genai_export import scratch_dir
    from appliance.serve.genai_backend import GenAILMBackend

    summary = report["variants"][variant]
    with scratch_dir(home, f"serve-{run.id}-{secrets.token_hex(4)}") as folder:
        adapter = None
        if summary.get("route") == "adapter":
            from appliance.optimize.genai_adapters import ADAPTER_FILE

            base = summary["base"]
            _decrypt(db, keys, home, base["object"], variant, base["files"], base["sha256"], folder,
                     f"the {variant} base {base['object']} of run {run.id}")
            adapter = folder / ADAPTER_FILE
        _decrypt(db, keys, home, run.artifact, variant, summary["files"], summary["sha256"], folder,
                 f"the {variant} {'adapter' if adapter else 'export'} of run {run.id}")
        return GenAILMBackend.load(folder, variant=variant, device=device, adapter=adapter, batched_only=batched_only)


def _decrypt(db: sqlite_utils.Database, keys: KeyOps, home: Path, object_id: str | None, variant: str,
             files: dict[str, str], manifest: str, folder: Path, what: str) -> None:
    """Files of one stored export into `folder`, each checked against its recorded SHA-256 (one-line errors)."""
    from appliance.errors import AirlockError
    from appliance.optimize.errors import ExportError
    from appliance.optimize.genai_export import check_export_files
    from appliance.vault.store import read_into

    hint = f"run `airlock optimize` on the run again (--variants {variant}); until then it is not served"
    if not object_id or manifest_sha256(files) != manifest:
        raise ExportError(f"{what} does not match its optimize report's manifest", hint=hint)
    for name in files:
        try:
            with (folder / name).open("wb") as dst:
                read_into(db, keys, home, object_id, vault_name(variant, name), dst)
        except AirlockError as exc:
            raise ExportError(f"{what}: {name} cannot be read from the vault ({exc.message})", hint=hint) from exc
    try:
        check_export_files(folder, files)
    except ExportError as exc:
        raise ExportError(f"{what}: {exc.message}", hint=hint) from exc


def genai_summary(validation: dict[str, Any]) -> dict[str, Any]:
    """What the report keeps of a genai validation (no token ids: they could quote held-out records)."""
    summary = json.loads(json.dumps(validation, default=str))
    with contextlib.suppress(KeyError, TypeError):
        summary["parity"]["greedy"] = [{k: g[k] for k in ("equal", "tokens", "first_difference") if k in g}
                                       for g in summary["parity"]["greedy"]]
    return summary
