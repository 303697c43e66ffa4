"""The genai variants inside the optimize job: build, validate, gate, store, and load one to serve.

    validated, exports = measure_genai_variants(ctx, model, tokenizer, ["genai-int4"], recipe, prompts,
                                                examples, float_ppl, work)
    store_genai_export(ctx, keys, run, exports["genai-int4"])      # each file encrypted into run-<id>
    backend = load_genai_backend(db, keys, home, run, report, "genai-int4")   # og.Model, the scratch copy removed

Vault layout, beside the Q/DQ exports: `genai-int4.model.onnx`, `genai-int4.model.onnx.data`,
`genai-int4.genai_config.json`; the report records each file's SHA-256 and their manifest digest.
Serving decrypts them into a private scratch folder, checks the digests, loads `og.Model` (ONNX Runtime reads
the weights into memory) and removes the folder at once.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.optimize.genai_export import GENAI_VARIANTS, GenAIExport, vault_name

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.jobs.runner import JobContext
    from appliance.optimize.recipe import QuantRecipe
    from appliance.train.runs import Run
    from appliance.vault.keys import KeyOps

CPU_GENAI_ORDER = ("genai-int4", "genai-int8", "genai-fp32")
"""Ties in measured speed go to the smaller export."""


def measure_genai_variants(ctx: JobContext, model: Any, tokenizer: Any, variants: list[str], recipe: QuantRecipe,
                           prompts: list[list[int]], examples: list[tuple[list[int], list[int]]], float_ppl: float,
                           work: Path, *, eos_ids: list[int], decode_tokens: int
                           ) -> tuple[dict[str, dict[str, Any]], dict[str, GenAIExport]]:
    """Build each genai variant from the merged float model, validate it, and gate it on perplexity."""
    from appliance.optimize.errors import OptimizeError
    from appliance.optimize.genai_export import build_genai_model, save_checkpoint
    from appliance.optimize.genai_validate import ort_genai_session, session_perplexity, validate_genai_export
    from appliance.optimize.quality_gate import perplexity_gate

    validated: dict[str, dict[str, Any]] = {}
    exports: dict[str, GenAIExport] = {}
    checkpoint = work / "checkpoint"
    ctx.progress("writing the merged checkpoint for the onnxruntime-genai builder")
    save_checkpoint(model, tokenizer, checkpoint)
    for variant in variants:
        if ctx.should_stop():
            break
        ctx.progress(f"building {variant} with onnxruntime-genai", variant=variant)
        try:
            export = build_genai_model(model, tokenizer, work, variant=variant, recipe=recipe,
                                       checkpoint=checkpoint, log=ctx.log)
        except OptimizeError as exc:
            validated[variant] = {"variant": variant, "ok": False, "failures": [exc.message]}
            continue
        if GENAI_VARIANTS[variant][1] == "cuda":
            validated[variant] = {"variant": variant, "ok": False, "bytes": export.bytes, "sha256": export.sha256,
                                  "files": export.files, "failures": [
                                      "built for CUDA; validated and served only on a GPU with onnxruntime-genai-cuda "
                                      "(run `airlock optimize` there)"]}
            continue
        ctx.progress(f"validating {variant} (PyTorch parity, og.Generator batch of 8)", variant=variant)
        report = validate_genai_export(export, model, prompts, decode_tokens=decode_tokens, eos_ids=eos_ids)
        ctx.progress(f"measuring {variant} perplexity on {len(examples)} held-out examples", variant=variant)
        perplexity = session_perplexity(ort_genai_session(export), examples)
        gate = perplexity_gate(float_ppl, perplexity, max_increase=recipe.max_perplexity_increase)
        report["quality"] = gate
        if not gate["ok"]:
            report["failures"].append(gate["failure"])
            report["ok"] = False
        validated[variant], exports[variant] = report, export
    return validated, exports


def store_genai_export(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, export: GenAIExport) -> str:
    """Stream each file of a validated genai export into the run's vault object. Returns the object id."""
    from appliance.train.artifacts import save_artifact
    from appliance.vault.store import write_file

    object_id = save_artifact(db, keys, home, run.id, {})
    for name in export.files:
        with (export.path / name).open("rb") as src:
            write_file(db, keys, home, object_id, vault_name(export.variant, name), src, overwrite=True)
    return object_id


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
                       variant: str, *, device: str = "cpu") -> Any:
    """Decrypt a stored genai export into scratch, check it against the report, load og.Model, remove the files."""
    import secrets

    from appliance.optimize.genai_export import check_export_files, scratch_dir
    from appliance.serve.genai_backend import GenAILMBackend
    from appliance.vault.store import read_into

    files = report["variants"][variant]["files"]
    with scratch_dir(home, f"serve-{run.id}-{secrets.token_hex(4)}") as folder:
        for name in files:
            with (folder / name).open("wb") as dst:
                read_into(db, keys, home, run.artifact, vault_name(variant, name), dst)
        check_export_files(folder, files)
        return GenAILMBackend.load(folder, variant=variant, device=device)


def genai_summary(validation: dict[str, Any]) -> dict[str, Any]:
    """What the report keeps of a genai validation (no token ids: they could quote held-out records)."""
    summary = json.loads(json.dumps(validation, default=str))
    with contextlib.suppress(KeyError, TypeError):
        summary["parity"]["greedy"] = [{k: g[k] for k in ("equal", "tokens", "first_difference") if k in g}
                                       for g in summary["parity"]["greedy"]]
    return summary
