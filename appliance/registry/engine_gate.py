"""Gate 3 of a retrain, for tasks that deploy engines: does the quantized, exported candidate still answer like itself?

The retrain job runs the optimize stage on the candidate (appliance.optimize.jobs: PTQ or QAT per
the task's `engine_qat`, the `engine_variant` export, its ONNX checker / Q/DQ rules and parity with
the PyTorch model on ONNX Runtime over held-out inputs) and judges the measured numbers:

- the optimize stage's own validation must pass (its per-variant tolerances, accuracy, finite logits,
  greedy decoding for fp32 LMs);
- the task's `engine_max_rel_diff` / `engine_min_top1`, when set, must hold too (they can only tighten);
- the quality gate on what will serve (appliance.optimize.quality_gate, docs/adr/0016): the quantized model's
  perplexity (LMs) or accuracy and ROC AUC (classifiers) against the float candidate's, within the recipe's
  tolerance; its failure is one of the optimize validation's failures, so it rejects the candidate with the numbers.

A task may name an onnxruntime-genai export as its `engine_variant` (genai-int4, genai-int8, genai-fp32: the
LM production serves on the CPU, docs/adr/0016). The gate then builds that export from the candidate with the
task's `engine_recipe` (block size, method, quality tolerance), validates it (og.Generator decodes a batch;
the float export matches PyTorch), and judges its perplexity against the float candidate's: a retrain whose
served genai variant regresses beyond the tolerance is rejected with both numbers. Only the judged variant is
stored in the candidate's vault object, so it is exactly what the runtime chooser serves when the version is
promoted. No TensorRT engine is built from a genai export. For genai-int4 of a LoRA task what is judged and stored
is the adapter route (appliance.optimize.genai_jobs): the version's adapter file over the task's shared base graph,
built by the first retrain of a base/recipe/LoRA structure and reused by the next ones; the gate's `route` says
which route and how many bytes the retrain wrote, the version's artifact names the base object it needs.

When the gate passes, the exports are stored in the candidate run's vault object (as `airlock optimize`
stores them) and, where this job runs on a GPU that has TensorRT, the engine is built from the
validated export. Elsewhere the gate says so: the ONNX serves through ONNX Runtime, and parity was
measured there. A failing gate stores nothing and rejects the candidate; production is untouched.
"""

from __future__ import annotations

from typing import Any

from appliance.errors import AirlockError
from appliance.registry.gates import FAIL, NOT_APPLICABLE, PASS

NOT_EVALUATED = "not_evaluated"
RUNTIME = "ONNX Runtime (CPU)"
GENAI_RUNTIME = "onnxruntime-genai (CPU)"


def thresholds(task: Any, tolerance: dict[str, float] | None) -> dict[str, Any]:
    """The limits the gate applies: the task's where set, else the optimize stage's tolerance for the variant.

    `tolerance` None: the optimize stage does not judge the variant's parity (weight-only genai int4/int8 differ
    from the float model by design; the quality gate judges them), so only the task's own limits apply."""
    def tightest(own: float | None, stage: float | None, pick: Any) -> float | None:
        return stage if own is None else own if stage is None else pick(own, stage)

    return {"max_rel_diff": tightest(task.engine_max_rel_diff, tolerance and tolerance["max_rel_diff"], min),
            "min_top1_agreement": tightest(task.engine_min_top1, tolerance and tolerance["top1_agreement"], max),
            "source": "task policy" if task.engine_max_rel_diff is not None or task.engine_min_top1 is not None
            else "optimize stage defaults"}


def stage_tolerance(variant: str) -> dict[str, float] | None:
    """The optimize stage's parity tolerance for a variant (None: parity not judged, quality is)."""
    from appliance.optimize import genai_validate, validate
    from appliance.optimize.genai_export import is_genai

    return genai_validate.TOLERANCES.get(variant) if is_genai(variant) else validate.TOLERANCES[variant]


def judge(validation: dict[str, Any], task: Any) -> dict[str, Any]:
    """Gate 3 from one variant's validation report (appliance.optimize.validate). Pure: same numbers, same verdict."""
    from appliance.optimize.genai_export import is_genai

    variant = validation["variant"]
    limits = thresholds(task, stage_tolerance(variant))
    parity = validation.get("parity", {})
    measured = {k: parity[k] for k in ("max_abs_diff", "max_rel_diff", "top1_agreement", "samples", "prompts",
                                       "positions", "accuracy_pytorch", "accuracy_onnx", "greedy_equal")
                if k in parity}
    failures = [f"optimize validation: {f}" for f in validation.get("failures", [])]
    rel, top1 = parity.get("max_rel_diff"), parity.get("top1_agreement")
    if task.engine_max_rel_diff is not None and rel is not None and not rel <= task.engine_max_rel_diff:
        failures.append(f"max relative difference {rel:.3g} > {task.engine_max_rel_diff:g} (task policy)")
    if task.engine_min_top1 is not None and top1 is not None and top1 < task.engine_min_top1:
        failures.append(f"top-1 agreement {top1:.3f} < {task.engine_min_top1:g} (task policy)")
    runtime = GENAI_RUNTIME if is_genai(variant) else RUNTIME
    return {"status": FAIL if failures else PASS, "variant": variant, "runtime": runtime, "measured": measured,
            "thresholds": limits, "failures": failures, "onnx_sha256": validation.get("sha256"),
            "onnx_bytes": validation.get("bytes"), "quality": validation.get("quality")}


def not_measured(task: Any, why: str) -> dict[str, Any]:
    if not task.deploys_engines:
        return {"status": NOT_APPLICABLE, "reason": "the task does not deploy QAT/TensorRT engines"}
    return {"status": NOT_EVALUATED, "reason": why}


def reasons_of(gate: dict[str, Any]) -> list[str]:
    if gate.get("status") != FAIL:
        return []
    head = f"engine parity: {gate.get('variant', '?')} export on {gate.get('runtime', RUNTIME)}"
    return [f"{head}: {f}" for f in gate.get("failures", [])] or [f"{head}: failed"]


def measure(ctx: Any, keys: Any, run: Any, task: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(gate, artifacts to record on the version) for a finished candidate run (state may still be running).

    `run` must carry its artifact object (the trained weights are already stored there).
    """
    import hashlib

    from appliance.optimize.genai_export import is_genai, scratch_dir
    from appliance.optimize.jobs import (
        build_and_store_engine,
        engine_build_refusal,
        onnx_file,
        store_exports,
    )
    from appliance.optimize.recipe import QuantRecipe

    variant = task.engine_variant
    if is_genai(variant):
        # The builder writes the export as files: they must outlive `store_exports`, and go with the gate.
        with scratch_dir(ctx.home, f"engine-gate-{ctx.job.id}") as work:
            return _measure_genai(ctx, keys, run, task, work)
    quant = QuantRecipe(**{**task.engine_recipe, "qat": task.engine_qat})
    ctx.progress("engine parity: quantizing and exporting the candidate", variant=variant)
    outcome = _exports(ctx, keys, run, quant, variant, RUNTIME)
    if "status" in outcome:
        return outcome, {}
    report, exports = outcome["report"], outcome["exports"]
    gate = judge(report["variants"][variant], task)
    gate["quantization"] = None if variant != "int8" else ("qat" if task.engine_qat else "ptq")
    gate["metrics"] = {stage: _numbers(report.get(stage)) for stage in ("float", "ptq", "qat") if report.get(stage)}
    if gate["status"] != PASS:
        return gate, {}
    stored = store_exports(ctx, keys, run, report, exports)
    data = exports[variant]
    artifacts = {f"onnx_{variant}": {"object": stored["artifact"], "file": onnx_file(variant),
                                     "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                     "runtime": stored.get("runtime"),
                                     "quantization": gate["quantization"]}}
    refusal = engine_build_refusal(ctx.job.device) if ctx.job.device.startswith("cuda:") else AirlockError(
        "the retrain job runs on the CPU", hint="retrain with --device cuda:N to build the engine in the same job")
    if refusal is not None:
        gate["engine"] = {"built": False, "reason": f"{refusal.message} ({refusal.hint})",
                          "parity_measured_on": RUNTIME}
        return gate, artifacts
    try:
        details = build_and_store_engine(ctx, keys, run, report, variant, data, {}, {})
    except AirlockError as exc:
        gate.update(status=FAIL, failures=[*gate["failures"], f"TensorRT engine build failed: {exc.message}"])
        gate["engine"] = {"built": False, "reason": exc.message}
        return gate, artifacts
    gate["engine"] = {"built": True, "parity_measured_on": RUNTIME, **{k: details[k] for k in (
        "plan_sha256", "onnx_sha256", "sm", "gpu", "tensorrt", "plan_bytes")}}
    artifacts["engine"] = {"object": details["artifact"], "file": f"engine-{variant}.plan",
                           "sha256": details["plan_sha256"], "bytes": details["plan_bytes"], "variant": variant,
                           "sm": details["sm"], "tensorrt": details["tensorrt"]}
    return gate, artifacts


def _measure_genai(ctx: Any, keys: Any, run: Any, task: Any, work: Any
                   ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Gate 3 for a genai `engine_variant`: build it with the task's recipe, validate, gate on quality, store it."""
    from appliance.optimize.jobs import store_exports
    from appliance.optimize.recipe import QuantRecipe

    variant = task.engine_variant
    quant = QuantRecipe(**task.engine_recipe)
    ctx.progress(f"engine parity: building {variant} of the candidate with onnxruntime-genai", variant=variant)
    outcome = _exports(ctx, keys, run, quant, variant, GENAI_RUNTIME, work)
    if "status" in outcome:
        return outcome, {}
    report, exports = outcome["report"], outcome["exports"]
    gate = judge(report["variants"][variant], task)
    gate["quantization"] = GENAI_QUANTIZATION.get(variant)
    gate["recipe"] = {k: v for k, v in quant.to_dict().items()
                      if k.startswith("int4_") or k in ("quantize_lm_head", "max_perplexity_increase")}
    gate["metrics"] = {stage: _numbers(report.get(stage)) for stage in ("float",) if report.get(stage)}
    gate["engine"] = {"built": False, "reason": "a genai export serves through onnxruntime-genai, not TensorRT",
                      "parity_measured_on": GENAI_RUNTIME}
    summary = report["variants"][variant]
    gate["route"] = {"route": summary.get("route", "merged"), "reason": summary.get("route_reason"),
                     "bytes_written": summary.get("bytes_written", summary.get("bytes"))}
    if gate["status"] != PASS:
        return gate, {}
    stored = store_exports(ctx, keys, run, report, exports)
    artifacts = {variant.replace("-", "_"): {
        "object": stored["artifact"], "files": sorted(summary["file"]), "sha256": summary["sha256"],
        "bytes": summary["bytes"], "runtime": stored.get("runtime"), "quantization": gate["quantization"],
        "route": summary.get("route", "merged")}}
    if "base" in summary:  # the adapter route: the shared base is not the version's to shred (no "object" key)
        artifacts[variant.replace("-", "_")]["base"] = {k: summary["base"][k] for k in ("object", "sha256", "bytes")}
    return gate, artifacts


GENAI_QUANTIZATION = {"genai-int4": "weight-only int4", "genai-int8": "weight-only int8"}


def _numbers(metrics: Any) -> dict[str, float] | None:
    if not isinstance(metrics, dict):
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _exports(ctx: Any, keys: Any, run: Any, quant: Any, variant: str, runtime: str,
             work: Any = None) -> dict[str, Any]:
    """The optimize stage's measurement of one variant: {"report", "exports"}, or a failed gate when it failed."""
    from appliance.optimize.jobs import measure_exports

    try:
        outcome = measure_exports(ctx, keys, run, quant, [variant], work)
    except AirlockError as exc:
        return {"status": FAIL, "variant": variant, "runtime": runtime,
                "failures": [f"the optimize stage failed: {exc.message}"]}
    if outcome is None:
        raise AirlockError("the retrain was cancelled while measuring engine parity",
                           hint="start the retrain again (`airlock retrain TASK`)")
    return {"report": outcome[0], "exports": outcome[1]}
