"""Job kinds `optimize` and `engine_build`, and which runtime serves a run: the optimize stage over the vault.

    airlock optimize RUN [--recipe quant.toml] [--variants fp32,fp16,int8,genai-int4] [--no-qat] --wait
    airlock engine build RUN --variant int8            (on the serving GPU, with TensorRT)
    choice = runtime_for_run(db, keys, home, run)      (the serving side: TensorRT -> ORT CUDA -> ORT CPU)

`run_optimize`, top to bottom: keys from the running agent; the run's trained weights out of the
vault (the base model's hash checked), LoRA merged for LMs; the pinned dataset's splits decrypted
into memory; fp32 and fp16 exported and validated first, because quantization changes the model in
place; then PTQ and QAT (about 10% of the run's steps at 1% of its learning rate), the int8 export
and its validation (Q/DQ rules, parity with the fake-quantized model on ONNX Runtime); the runtime
this machine would choose; everything encrypted into the run's vault object, the report last:

    vault object run-<run id> (beside the trained weights, see appliance.train.artifacts)
        onnx-fp32.onnx, onnx-fp16.onnx, onnx-int8.onnx    the exports that passed validation
        genai-<precision>.model.onnx[.data], .genai_config.json   onnxruntime-genai exports (LMs; genai_jobs.py)
        genai-int4.adapter.onnx_adapter                   a LoRA run's int4: its adapter file over a base graph
                                                          stored once in vault object genai-base-<key> (genai_jobs.py)
        optimize-report.json                              float / PTQ / QAT metrics, per-variant parity, quality
                                                          gate, runtime
        engine-<variant>.plan, engine-<variant>.sidecar.json   written by `airlock engine build`

Every quantized variant also passes the quality gate (quality_gate.py: perplexity or accuracy/AUC against
the float model on held-out data, within the recipe's tolerance) or it is not stored, so it never serves.
The report names each export's SHA-256; a file that does not match it (a job killed between
writes) or an engine built from an earlier export is never served. QAT has no checkpoint: a
cancel ends the job without storing anything, and `airlock jobs resume` starts it over.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import AirlockError
from appliance.jobs.runner import JobContext
from appliance.optimize.errors import EngineError, OptimizeError
from appliance.optimize.genai_export import GENAI_VARIANTS, is_genai
from appliance.optimize.onnx_export import VARIANTS
from appliance.train import runs
from appliance.train.runs import Run

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.jobs.records import Job
    from appliance.optimize.recipe import QuantRecipe
    from appliance.optimize.runtime_select import RuntimeChoice
    from appliance.vault.keys import KeyOps

OPTIMIZE_KIND = "optimize"
ENGINE_BUILD_KIND = "engine_build"
REPORT = "optimize-report.json"
REPORT_FORMAT = "airlock-optimize/v1"
GPU_ORDER = ("int8", "fp16", "fp32")
"""What a GPU serves first: TensorRT-style Q/DQ INT8, then FP16, then FP32."""
CPU_ORDER = ("fp32", "int8", "fp16")
"""What ONNX Runtime on the CPU serves first (docs/adr/0005: Q/DQ runs there as fake quantization)."""
ALL_VARIANTS = (*VARIANTS, *GENAI_VARIANTS)
"""Q/DQ exports (TorchScript, in memory, TensorRT-ready) and onnxruntime-genai exports (LMs, external data)."""
PARITY_PROMPTS = 4
PROMPT_TOKENS = 32
DECODE_TOKENS = 8
PROGRESS_EVERY_S = 1.0
NO_ENGINES = ("TensorRT engines need an NVIDIA GPU and the tensorrt wheels in the bundle; this machine serves the "
              "ONNX through ONNX Runtime")


def onnx_file(variant: str) -> str:
    return f"onnx-{variant}.onnx"


def engine_plan_file(variant: str) -> str:
    return f"engine-{variant}.plan"


def engine_sidecar_file(variant: str) -> str:
    return f"engine-{variant}.sidecar.json"


# --- starting jobs (CLI side: no torch) ---------------------------------------------------------------------------

def optimizable_run(db: sqlite_utils.Database, run_id: str) -> Run:
    """A succeeded run whose model can be exported (MoE models are refused here, before any job starts)."""
    from types import SimpleNamespace

    from appliance.base_models import resolve_base_model
    from appliance.optimize.onnx_export import check_exportable

    run = runs.get_run(db, run_id)
    if run.state != "succeeded" or not run.artifact:
        raise OptimizeError(f"run {run.id} is {run.state}; only a succeeded run has a model to optimize",
                            hint=f"see `airlock train show {run.id}`; finish it with `airlock train {run.kind} "
                                 f"--resume {run.id}`")
    base = resolve_base_model(run.base_model)
    config = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    check_exportable(SimpleNamespace(**config))
    return run


def parse_variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown or not variants:
        raise OptimizeError(f"--variants {text!r}: {', '.join(unknown) or 'nothing'} is not one of "
                            f"{', '.join(ALL_VARIANTS)}", hint="e.g. --variants fp32,fp16,int8 or genai-int4")
    return [v for v in ALL_VARIANTS if v in variants]


def _refuse_concurrent(db: sqlite_utils.Database, run_id: str) -> None:
    from appliance.jobs.records import list_jobs
    from appliance.jobs.runner import reconcile_jobs

    reconcile_jobs(db)
    for state in ("queued", "running"):
        for job in list_jobs(db, state=state, limit=10_000):
            if job.kind in (OPTIMIZE_KIND, ENGINE_BUILD_KIND) and job.params.get("run") == run_id:
                raise OptimizeError(f"job {job.id} ({job.kind}) is already {state} on run {run_id}",
                                    hint=f"wait for it (`airlock jobs show {job.id}`) or cancel it")


def start_optimize(db: sqlite_utils.Database, run_id: str, recipe: QuantRecipe, variants: list[str], *,
                   actor: str | None = None) -> Job:
    """Check the run and launch the `optimize` job (CPU: the quantization code runs there)."""
    from appliance.jobs.runner import start_job

    run = optimizable_run(db, run_id)
    genai = [v for v in variants if is_genai(v)]
    if genai and run.kind != "lm":
        raise OptimizeError(f"{', '.join(genai)}: onnxruntime-genai exports are for language models; run {run.id} "
                            "is an image classifier", hint="use --variants fp32,fp16,int8")
    _refuse_concurrent(db, run.id)
    return start_job(db, OPTIMIZE_KIND, {"run": run.id, "variants": variants, "recipe": recipe.to_dict()},
                     device="cpu", actor=actor)


def engine_build_refusal(device: str) -> AirlockError | None:
    """Why this machine cannot build TensorRT engines on `device`, decided without importing torch; None if it can."""
    index = device.split(":", 1)[1] if device.startswith("cuda:") else "0"
    missing = []
    if not Path(f"/dev/nvidia{index}").exists():
        missing.append(f"no NVIDIA GPU {index} (/dev/nvidia{index})")
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("no tensorrt module")
    if not missing:
        return None
    return EngineError(NO_ENGINES, hint=f"here: {' and '.join(missing)}; `airlock optimize show RUN` names the "
                                        "runtime that serves the model; build engines on the serving GPU")


def start_engine_build(db: sqlite_utils.Database, keys: KeyOps, home: Path, run_id: str, *, variant: str | None,
                       device: str, profile: dict[str, int], options: dict[str, Any],
                       actor: str | None = None) -> Job:
    """Launch the `engine_build` job on `device` (cuda:N, so it takes that GPU's lock)."""
    from appliance.jobs.runner import start_job
    from appliance.optimize.tensorrt_engine import EngineBuildOptions

    refusal = engine_build_refusal(device)
    if refusal is not None:
        raise refusal
    EngineBuildOptions(**options)  # bad options fail here, not in the job
    run = runs.get_run(db, run_id)
    report = stored_report(db, keys, home, run)
    variant = variant or next((v for v in GPU_ORDER if v in usable_variants(report)), "int8")
    if variant not in usable_variants(report):
        raise EngineError(f"run {run.id} has no validated {variant} export to build from "
                          f"(exported: {', '.join(usable_variants(report)) or 'none'})",
                          hint=f"export it with `airlock optimize {run.id} --variants {variant}`")
    _refuse_concurrent(db, run.id)
    return start_job(db, ENGINE_BUILD_KIND, {"run": run.id, "variant": variant, "profile": profile,
                                             "options": options}, device=device, actor=actor)


# --- reading what optimize stored -----------------------------------------------------------------------------------

def stored_report(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run) -> dict[str, Any]:
    """The run's optimize report, decrypted; an error with a hint when the run was never optimized."""
    from appliance.vault.store import list_files, read_bytes

    if not run.artifact or REPORT not in list_files(home, run.artifact):
        raise OptimizeError(f"run {run.id} has not been optimized (no ONNX export in the vault)",
                            hint=f"run `airlock optimize {run.id} --wait` first")
    return json.loads(read_bytes(db, keys, home, run.artifact, REPORT))


def usable_variants(report: dict[str, Any]) -> list[str]:
    """Variants whose export passed validation and was stored, in VARIANTS order."""
    found = report.get("variants", {})
    return [v for v in ALL_VARIANTS if found.get(v, {}).get("ok") and found[v].get("stored")]


def read_onnx(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, report: dict[str, Any],
              variant: str) -> bytes:
    """A stored export, checked against the SHA-256 its report recorded."""
    from appliance.vault.store import read_bytes

    data = read_bytes(db, keys, home, run.artifact, onnx_file(variant))
    if hashlib.sha256(data).hexdigest() != report["variants"][variant]["sha256"]:
        raise OptimizeError(f"the {variant} export of run {run.id} is not the one its optimize report validated",
                            hint=f"an optimize job was interrupted while writing; run `airlock optimize {run.id}` "
                                 "again")
    return data


def stored_engines(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run) -> dict[str, dict[str, Any]]:
    """variant -> sidecar of the engines stored for a run (sidecars only; plans stay encrypted)."""
    from appliance.vault.store import list_files, read_bytes

    names = list_files(home, run.artifact) if run.artifact else []
    return {v: json.loads(read_bytes(db, keys, home, run.artifact, engine_sidecar_file(v))) for v in GPU_ORDER
            if engine_sidecar_file(v) in names and engine_plan_file(v) in names}


def runtime_for_run(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, *, device: int = 0,
                    allow_cpu: bool = True, pytorch_runner: Any = None, machine: Any = None,
                    batched: bool = False) -> RuntimeChoice:
    """The runtime that serves `run` on this machine, with the reason (see `runtime_select.select_runtime`).
    `batched`: the server batches this model's requests (a CPU genai export then loads its batch session only).

    The GPU gets the best validated export (int8, fp16, fp32) and the best engine built from the export
    now stored; the CPU gets the FP32 export when there is one. An engine built from an earlier export,
    or an export that does not match its report, is passed over with a warning. A run never optimized
    has no ONNX: `pytorch_runner` serves it, if given.
    """
    from appliance.optimize.runtime_select import select_runtime
    from appliance.vault.store import read_bytes

    try:
        report = stored_report(db, keys, home, run)
    except OptimizeError:
        report = {"variants": {}}
    warnings: list[str] = []
    genai = _genai_runtime(db, keys, home, run, report, device=device, allow_cpu=allow_cpu, machine=machine,
                           warnings=warnings, batched=batched)
    if genai is not None:
        return genai
    exports: dict[str, bytes] = {}
    for variant in (v for v in usable_variants(report) if not is_genai(v)):
        try:
            exports[variant] = read_onnx(db, keys, home, run, report, variant)
        except OptimizeError as exc:
            warnings.append(exc.message)
    gpu = next((v for v in GPU_ORDER if v in exports), None)
    cpu = next((v for v in CPU_ORDER if v in exports), None)
    plan = sidecar = None
    for variant, found in stored_engines(db, keys, home, run).items():
        if variant not in exports or found.get("onnx_sha256") != report["variants"][variant]["sha256"]:
            warnings.append(f"the {variant} engine was built from an earlier export; rebuild it with "
                            f"`airlock engine build {run.id} --variant {variant}`")
            continue
        plan, sidecar = read_bytes(db, keys, home, run.artifact, engine_plan_file(variant)), found
        break
    choice = select_runtime(onnx_bytes=exports.get(gpu) if gpu else None, engine_plan=plan, engine_sidecar=sidecar,
                            cpu_onnx_bytes=exports.get(cpu) if cpu else None, pytorch_runner=pytorch_runner,
                            allow_cpu=allow_cpu, device=device, machine=machine)
    choice.warnings = [*warnings, *choice.warnings]
    return choice


def _genai_runtime(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, report: dict[str, Any], *,
                   device: int, allow_cpu: bool, machine: Any, warnings: list[str],
                   batched: bool = False) -> RuntimeChoice | None:
    """onnxruntime-genai serves an LM when a genai export passed validation and the quality gate: on the CPU the
    fastest measured one, on a GPU a CUDA one (else the TensorRT / ORT CUDA path below serves)."""
    from appliance.optimize.engine_sidecar import current_machine
    from appliance.optimize.genai_jobs import choose_genai_variant, load_genai_backend
    from appliance.optimize.runtime_select import RuntimeChoice

    usable = [v for v in usable_variants(report) if is_genai(v)]
    if not usable:
        return None
    on_gpu = (machine or current_machine(device)).sm is not None
    cuda = on_gpu and importlib.util.find_spec("onnxruntime_genai") is not None and _genai_has_cuda()
    variant = choose_genai_variant(report, usable, gpu=cuda)
    if variant is None or (not cuda and (on_gpu or not allow_cpu)):
        return None
    try:
        backend = load_genai_backend(db, keys, home, run, report, variant, device=f"cuda:{device}" if cuda else "cpu",
                                     batched_only=batched)  # GenAILMBackend.load ignores it on CUDA
    except AirlockError as exc:
        warnings.append(f"the {variant} export did not load: {exc.message}")
        return None
    speed = report["variants"][variant].get("generator", {}).get("decode_tokens_per_s")
    where = "the GPU (CUDA)" if cuda else "the CPU"
    reason = (f"onnxruntime-genai on {where}: {variant}"
              + (f", fastest measured decode within the quality gate ({speed:.0f} tokens/s, batch of 8)"
                 if isinstance(speed, int | float) else ""))
    return RuntimeChoice(backend.kind, reason, backend, [], warnings)


def _genai_has_cuda() -> bool:
    import onnxruntime_genai as og

    try:
        return bool(og.is_cuda_available())
    except Exception:  # an older or CPU-only build without the probe
        return False


# --- the optimize job -----------------------------------------------------------------------------------------------

class _Progress:
    """Library progress dicts into job events: stage changes always, QAT steps at most once a second."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx, self._last, self._stage = ctx, 0.0, None

    def __call__(self, event: dict[str, Any]) -> None:
        stage = event.get("stage", "")
        due = (stage != self._stage or event.get("step") in (1, event.get("total_steps"))
               or time.monotonic() - self._last >= PROGRESS_EVERY_S)
        self._stage = stage
        if due:
            self._last = time.monotonic()
            self.ctx.progress(stage, **runs.finite(event))


def run_optimize(ctx: JobContext) -> dict[str, Any]:
    """Handler of job kind `optimize` (registered in appliance.jobs.runner.HANDLERS)."""
    from appliance.audit import append_audit
    from appliance.catalog import transaction
    from appliance.optimize.genai_export import scratch_dir

    run = runs.get_run(ctx.db, ctx.job.params["run"])
    try:
        with scratch_dir(ctx.home, f"optimize-{ctx.job.id}") as work:
            return _optimize(ctx, run, work)
    except Exception as exc:
        message = exc.message if isinstance(exc, AirlockError) else f"internal error ({type(exc).__name__})"
        with contextlib.suppress(Exception), transaction(ctx.db):
            append_audit(ctx.db, "optimize.fail", run.id, {"job": ctx.job.id, "error": message}, actor=ctx.job.actor)
        raise


def _optimize(ctx: JobContext, run: Run, work: Path) -> dict[str, Any]:
    from appliance.optimize.recipe import QuantRecipe
    from appliance.vault.lifecycle import keys_for

    keys = keys_for(ctx.db, ctx.home)
    optimizable_run(ctx.db, run.id)
    recipe = QuantRecipe(**ctx.job.params["recipe"])
    outcome = measure_exports(ctx, keys, run, recipe, list(ctx.job.params["variants"]), work)
    if outcome is None:
        return {"run": run.id, "stopped": True, "stored": False}
    report, exports = outcome
    return store_exports(ctx, keys, run, report, exports)


def measure_exports(ctx: JobContext, keys: KeyOps, run: Run, recipe: QuantRecipe, variants: list[str],
                    work: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Quantize, export and validate `run`'s trained model in memory: (report, exports), or None when stopped.

    Nothing is stored: `store_exports` does that. Retraining's engine-parity gate calls this too. genai
    variants are built into `work` (a `genai_export.scratch_dir`, which must outlive `store_exports`); their
    entry in `exports` is a `GenAIExport` (a folder), the others' ONNX bytes.
    """
    original = {"original_steps": int(run.metrics.get("steps") or 1), "original_lr": float(run.recipe["lr"])}
    if any(is_genai(v) for v in variants) and work is None:
        raise OptimizeError("genai variants need a scratch folder for the builder", hint="report this as a bug")
    if run.kind == "lm":
        return _optimize_lm(ctx, keys, run, recipe, variants, original, work)
    return _optimize_classifier(ctx, keys, run, recipe, variants, original)


def _held_out_prompts(examples: list[Any]) -> list[list[int]]:
    """Up to PARITY_PROMPTS prompts: each example's unscored prefix (its prompt), else its first tokens."""
    from appliance.train.sft_data import IGNORE

    prompts = []
    for example in examples[:PARITY_PROMPTS]:
        prefix = 0
        while prefix < len(example.labels) and example.labels[prefix] == IGNORE:
            prefix += 1
        ids = list(example.input_ids[:prefix] if prefix >= 4 else example.input_ids)[:PROMPT_TOKENS]
        if ids:
            prompts.append(ids)
    return prompts


def split_oversized(model: Any, variants: list[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(variants that fit in one in-memory ONNX file, {refused variant: its validation-shaped entry}).

    Checked before any export or quantization work. INT8 counts as FP32: the exporter serializes the
    FP32 weights first and folds them to INT8 afterwards. genai variants write external data: no limit.
    Nothing fits: ExportRefusedError (PyTorch serves).
    """
    from appliance.optimize import onnx_export
    from appliance.optimize.errors import ExportRefusedError

    weights = sum(p.numel() for p in model.parameters())
    refused = {}
    for variant in (v for v in variants if not is_genai(v)):
        size = weights * (2 if variant == "fp16" else 4)
        if size > onnx_export.MAX_ONNX_BYTES:
            refused[variant] = {"variant": variant, "ok": False, "refused": True, "failures": [
                f"{size / 1024**3:.1f} GiB of weights; one in-memory ONNX model holds at most 2 GiB"]}
    kept = [v for v in variants if v not in refused]
    if not kept:
        raise ExportRefusedError(f"{onnx_export.architecture(model.config)} has {weights * 2 / 1024**3:.1f} GiB of "
                                 "weights even in FP16; one in-memory ONNX model holds at most 2 GiB",
                                 hint="it serves with PyTorch; for ONNX use --variants genai-int4,genai-fp32 "
                                      "(onnxruntime-genai writes external data: any size)")
    return kept, refused


def _optimize_lm(ctx: JobContext, keys: KeyOps, run: Run, recipe: QuantRecipe, variants: list[str],
                 original: dict[str, Any], work: Path | None) -> tuple[dict[str, Any], dict[str, Any]] | None:

    from appliance.base_models import resolve_base_model
    from appliance.optimize.genai_jobs import genai_summary, measure_genai_variants
    from appliance.optimize.genai_validate import held_out_examples, torch_perplexity
    from appliance.optimize.onnx_export import export_causal_lm_onnx
    from appliance.optimize.quality_gate import perplexity_gate
    from appliance.optimize.quantize import merge_lora, perplexity, quantize_causal_lm
    from appliance.optimize.validate import validate_causal_lm_export
    from appliance.train.artifacts import load_lm_adapter
    from appliance.train.fingerprints import tokenizer_hash
    from appliance.train.inputs import check_pinned, text_splits
    from appliance.train.lm import make_batches
    from appliance.train.recipe import recipe_from_dict
    from appliance.train.token_cache import VaultTokenCache, cache_object_id

    ctx.progress("loading the trained model")
    peft_model, tokenizer = load_lm_adapter(ctx.db, keys, ctx.home, run)
    lora_source = _lora_source(peft_model, run, keys) if any(is_genai(v) for v in variants) else None
    model = merge_lora(peft_model).eval()
    variants, refused = split_oversized(model, variants)
    lora = recipe_from_dict(run.recipe, f"run {run.id} recipe")
    pinned = check_pinned(ctx.db, run.dataset_id, run.dataset_name, run.dataset_version, run.dataset_hash)
    ctx.progress("decrypting the dataset")
    data = text_splits(ctx.db, keys, ctx.home, pinned)
    cache = VaultTokenCache(ctx.db, keys, ctx.home, cache_object_id(
        pinned.dataset.id, pinned.version_hashes, tokenizer_hash(resolve_base_model(run.base_model).path),
        lora.max_length))
    examples = {split: cache(tokenizer, records, lora.max_length, split) if records else []
                for split, records in data.items()}
    held_split = "test" if examples["test"] else "val"
    eval_split = "val" if examples["val"] else "test"
    if not examples[eval_split]:
        raise OptimizeError(f"dataset {run.dataset_name!r} has no validation or test records to measure "
                            "quantization on", hint="import more records, then retrain and optimize")
    pad = tokenizer.pad_token_id

    def batches(split: str, seed: int | None) -> list[dict[str, Any]]:
        return [b.tensors() for b in make_batches(examples[split], lora, pad, order_seed=seed)]

    eval_batches = batches(eval_split, None)
    prompts = _held_out_prompts(examples[held_split])
    float_allowed = () if recipe.quantize_lm_head else ("lm_head",)
    validated: dict[str, dict[str, Any]] = dict(refused)
    exports: dict[str, Any] = {}
    report: dict[str, Any] = {"task": "causal_lm", "recipe": recipe.to_dict(), "eval_split": eval_split,
                              "parity_split": held_split}
    quality_examples = held_out_examples(examples[held_split] or examples[eval_split])
    float_ppl = None
    if "int8" in variants or any(is_genai(v) for v in variants):
        ctx.progress(f"measuring the float model's perplexity on {len(quality_examples)} held-out examples")
        float_ppl = torch_perplexity(model, quality_examples)
        report["quality"] = {"split": held_split if examples[held_split] else eval_split,
                             "examples": len(quality_examples), "float_perplexity": float_ppl,
                             "max_perplexity_increase": recipe.max_perplexity_increase}

    def export_and_validate(variant: str, exported_model: Any, reference: Any) -> None:
        ctx.progress(f"exporting {variant}", variant=variant)
        data_bytes = export_causal_lm_onnx(exported_model, variant=variant)
        ctx.progress(f"validating {variant} on ONNX Runtime", variant=variant)
        validated[variant] = validate_causal_lm_export(data_bytes, reference, prompts, variant=variant,
                                                       decode_tokens=DECODE_TOKENS, strict=False,
                                                       float_allowed=float_allowed)
        exports[variant] = data_bytes

    # Float variants first: quantization below changes the model in place.
    if not _export_float_variants(ctx, model, variants, export_and_validate):
        return None
    genai = [v for v in variants if is_genai(v)]
    if genai:
        genai_reports, genai_exports = measure_genai_variants(
            ctx, model, tokenizer, genai, recipe, prompts, quality_examples, float_ppl, work,
            eos_ids=[tokenizer.eos_token_id], decode_tokens=DECODE_TOKENS, lora=lora_source)
        validated.update({v: genai_summary(r) for v, r in genai_reports.items()})
        exports.update(genai_exports)
        if ctx.should_stop():
            return None
    if "int8" in variants:
        result = quantize_causal_lm(model, calibration_batches=batches("train", recipe.seed),
                                    train_batches=batches("train", recipe.seed + 1), eval_batches=eval_batches,
                                    recipe=recipe, on_progress=_Progress(ctx), should_stop=ctx.should_stop,
                                    **original)
        if ctx.should_stop():
            return None
        report.update(result.report)
        export_and_validate("int8", result.model, result.model)
        ctx.progress("measuring int8 perplexity against the float model", variant="int8")
        gate = perplexity_gate(float_ppl, torch_perplexity(result.model, quality_examples),
                               max_increase=recipe.max_perplexity_increase)
        _apply_quality(validated["int8"], gate)
    else:
        ctx.progress("evaluating float")
        report["float"] = {"perplexity": perplexity(model, eval_batches)}
        report.update(ptq=None, qat=None)
    report["variants"] = {v: validated[v] if is_genai(v) else _summarize(validated[v])
                          for v in ALL_VARIANTS if v in validated}
    return report, exports


def _lora_source(peft_model: Any, run: Run, keys: KeyOps) -> Any:
    """What the genai adapter route needs of the run (before the merge): its adapter, LoRA config, base model."""
    from peft import get_peft_model_state_dict

    from appliance.base_models import resolve_base_model
    from appliance.optimize.genai_jobs import LoraSource

    config = getattr(peft_model, "peft_config", {}).get("default")
    if config is None or not run.base_hash:
        return None
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return LoraSource(state, config, resolve_base_model(run.base_model).path, run.base_model, run.base_hash, keys)


def _apply_quality(validation: dict[str, Any], gate: dict[str, Any]) -> None:
    """Record the quality gate on a variant's validation; a failing gate makes the variant not servable."""
    validation["quality"] = gate
    if not gate["ok"]:
        validation["failures"] = [*validation.get("failures", []), gate["failure"]]
        validation["ok"] = False


def _export_float_variants(ctx: JobContext, model: Any, variants: list[str], export_and_validate: Any) -> bool:
    """Export and validate fp32 / fp16 (each against a float model of its own precision); False on a stop."""
    import copy

    for variant in ("fp32", "fp16"):
        if variant in variants:
            reference = copy.deepcopy(model).half() if variant == "fp16" else model
            export_and_validate(variant, model, reference)
            del reference
        if ctx.should_stop():
            return False
    return True


def _optimize_classifier(ctx: JobContext, keys: KeyOps, run: Run, recipe: QuantRecipe, variants: list[str],
                         original: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]] | None:

    from appliance.optimize.onnx_export import export_classifier_onnx
    from appliance.optimize.quantize import classifier_probabilities, quantize_classifier
    from appliance.optimize.validate import validate_classifier_export
    from appliance.train.artifacts import load_classifier_weights
    from appliance.train.inputs import check_pinned, image_splits

    ctx.progress("loading the trained model")
    model, labels = load_classifier_weights(ctx.db, keys, ctx.home, run)
    variants, refused = split_oversized(model, variants)
    pinned = check_pinned(ctx.db, run.dataset_id, run.dataset_name, run.dataset_version, run.dataset_hash)
    ctx.progress("decrypting the dataset")
    splits = image_splits(ctx.db, keys, ctx.home, pinned).splits
    held_split = "test" if splits["test"][0].shape[0] else "val"
    held_out = splits[held_split]
    if held_out[0].shape[0] == 0:
        raise OptimizeError(f"dataset {run.dataset_name!r} has no validation or test images to validate the "
                            "exports on", hint="import more images, then retrain and optimize")
    images = splits["train"][0]
    image_shape = (int(model.config.num_channels), int(images.shape[2]), int(images.shape[3]))
    validated: dict[str, dict[str, Any]] = dict(refused)
    exports: dict[str, bytes] = {}
    report: dict[str, Any] = {"task": "classifier", "recipe": recipe.to_dict(), "labels": labels,
                              "image_shape": list(image_shape), "parity_split": held_split}

    def export_and_validate(variant: str, exported_model: Any, reference: Any) -> None:
        ctx.progress(f"exporting {variant}", variant=variant)
        data_bytes = export_classifier_onnx(exported_model, variant=variant, image_shape=image_shape)
        ctx.progress(f"validating {variant} on ONNX Runtime", variant=variant)
        validated[variant] = validate_classifier_export(data_bytes, reference, held_out, variant=variant,
                                                        strict=False)
        exports[variant] = data_bytes

    if not _export_float_variants(ctx, model, variants, export_and_validate):
        return None
    if "int8" in variants:
        batch_size = int(run.recipe.get("batch_size", 16))
        result = quantize_classifier(model, train=splits["train"], val=splits["val"] if splits["val"][0].shape[0]
                                     else held_out, labels=labels, recipe=recipe, batch_size=batch_size,
                                     on_progress=_Progress(ctx), should_stop=ctx.should_stop, **original)
        if ctx.should_stop():
            return None
        report.update(result.report)
        export_and_validate("int8", result.model, result.model)
        from appliance.optimize.quality_gate import classifier_gate

        served = report.get("qat") or report.get("ptq") or {}
        _apply_quality(validated["int8"], classifier_gate(report.get("float") or {}, served,
                                                          max_drop=recipe.max_accuracy_drop))
    else:
        ctx.progress("evaluating float")
        from appliance.train.classifier import classification_metrics

        val_images, val_labels = splits["val"] if splits["val"][0].shape[0] else held_out
        metrics = classification_metrics(classifier_probabilities(model, val_images), val_labels, labels)
        report["float"] = {"accuracy": metrics.accuracy, "roc_auc": metrics.to_dict()["roc_auc"],
                           "confusion": metrics.confusion}
        report.update(ptq=None, qat=None)
    report["variants"] = {v: _summarize(validated[v]) for v in VARIANTS if v in validated}
    return report, exports


def _summarize(validation: dict[str, Any]) -> dict[str, Any]:
    """The validation report without generated token ids (they could quote held-out records)."""
    summary = dict(validation)
    parity = dict(summary.get("parity", {}))
    if "greedy" in parity:
        parity["greedy"] = [{"equal": g["equal"], "tokens": len(g["onnx"]),
                             **({"first_difference": g["first_difference"]} if "first_difference" in g else {})}
                            for g in parity["greedy"]]
    summary["parity"] = parity
    return runs.finite(summary)


def store_exports(ctx: JobContext, keys: KeyOps, run: Run, report: dict[str, Any],
                  exports: dict[str, Any]) -> dict[str, Any]:
    """Validated exports into the vault, the report last (it is what makes them servable), then the audit row."""
    from appliance.audit import append_audit
    from appliance.catalog import transaction
    from appliance.optimize.engine_sidecar import current_machine
    from appliance.optimize.genai_export import vault_name
    from appliance.optimize.genai_jobs import store_genai_export
    from appliance.train.artifacts import save_artifact

    passed = {v: data for v, data in exports.items() if report["variants"][v]["ok"]}
    for variant, summary in report["variants"].items():
        summary["stored"] = variant in passed
        summary["file"] = None if variant not in passed else (
            [vault_name(variant, f) for f in summary["files"]] if is_genai(variant) else onnx_file(variant))
        if not summary["ok"]:
            ctx.log(f"{variant} export not stored: {'; '.join(summary['failures'])}")
    if not passed:
        failures = "; ".join(f"{v}: {', '.join(s['failures'])}" for v, s in report["variants"].items())
        raise OptimizeError(f"no export of run {run.id} matched PyTorch on ONNX Runtime ({failures})",
                            hint="nothing was stored; keep serving the current model and report the architecture")
    ctx.progress("choosing the runtime")
    machine = current_machine()
    runtime = _stored_runtime(report, passed, machine)
    report.update(format=REPORT_FORMAT, run=run.id, job=ctx.job.id, base_model=run.base_model,
                  base_hash=run.base_hash, created_at=runs.now(), runtime=runtime)
    ctx.progress("encrypting into the vault")
    files = {onnx_file(v): data for v, data in passed.items() if not is_genai(v)}
    artifact = save_artifact(ctx.db, keys, ctx.home, run.id, files)
    for variant in (v for v in passed if is_genai(v)):
        ctx.progress(f"encrypting {variant} into the vault", variant=variant)
        store_genai_export(ctx.db, keys, ctx.home, run, passed[variant])
        files.update({vault_name(variant, f): b"" for f in passed[variant].files})
    save_artifact(ctx.db, keys, ctx.home, run.id, {REPORT: json.dumps(runs.finite(report), sort_keys=True).encode()})
    variants = {v: {"ok": s["ok"], "bytes": s.get("bytes"), "sha256": s.get("sha256"),
                    **({"route": s.get("route"), "base_object": s["base"]["object"]} if "base" in s else {})}
                for v, s in report["variants"].items()}
    metrics = {stage: report.get(stage) for stage in ("float", "ptq", "qat")}
    with transaction(ctx.db):
        append_audit(ctx.db, "optimize.finish", run.id, runs.finite({
            "job": ctx.job.id, "artifact": artifact, "files": sorted([*files, REPORT]), "variants": variants,
            "qat_steps_done": report.get("qat_steps_done"), "runtime": runtime["kind"],
            **{stage: _numbers(value) for stage, value in metrics.items()}}), actor=ctx.job.actor)
    return runs.finite({"run": run.id, "artifact": artifact, "stored": True, "variants": variants,
                        "runtime": runtime["kind"], "qat_steps_done": report.get("qat_steps_done"),
                        **{stage: _numbers(value) for stage, value in metrics.items()}})


def _stored_runtime(report: dict[str, Any], passed: dict[str, Any], machine: Any) -> dict[str, Any]:
    """What this machine would serve, for the report: a genai export on the CPU (fastest measured within the
    quality gate), else the Q/DQ runtime selection (TensorRT -> ORT CUDA -> ORT CPU)."""
    from appliance.optimize.genai_jobs import choose_genai_variant
    from appliance.optimize.runtime_select import select_runtime

    genai = choose_genai_variant(report, [v for v in passed if is_genai(v)], gpu=False)
    qdq = [v for v in passed if not is_genai(v)]
    if genai is not None and (machine.sm is None or not qdq):
        speed = report["variants"][genai].get("generator", {}).get("decode_tokens_per_s")
        return {"kind": "genai-cpu", "genai_variant": genai, "skipped": [], "warnings": [],
                "reason": f"onnxruntime-genai on the CPU: {genai}, fastest measured decode within the quality gate"
                          + (f" ({speed:.0f} tokens/s, batch of 8)" if isinstance(speed, int | float) else ""),
                "machine": machine.to_dict()}
    gpu = next(v for v in GPU_ORDER if v in qdq)
    cpu = next(v for v in CPU_ORDER if v in qdq)
    choice = select_runtime(onnx_bytes=passed[gpu], cpu_onnx_bytes=passed[cpu], machine=machine)
    return {**choice.to_dict(), "onnx_variant": gpu if choice.kind == "ort-cuda" else cpu,
            "machine": machine.to_dict()}


def _numbers(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# --- the engine build job -------------------------------------------------------------------------------------------

def run_engine_build(ctx: JobContext) -> dict[str, Any]:
    """Handler of job kind `engine_build`: build a TensorRT engine from a stored export on the job's GPU."""
    from appliance.vault.lifecycle import keys_for

    params = ctx.job.params
    refusal = engine_build_refusal(ctx.job.device)
    if refusal is not None:
        raise refusal
    os.environ["CUDA_VISIBLE_DEVICES"] = ctx.job.device.split(":", 1)[1]  # before torch: the job's GPU is cuda:0
    keys = keys_for(ctx.db, ctx.home)
    run = runs.get_run(ctx.db, params["run"])
    report = stored_report(ctx.db, keys, ctx.home, run)
    variant = params["variant"]
    if variant not in usable_variants(report):
        raise EngineError(f"run {run.id} has no validated {variant} export", hint=f"run `airlock optimize {run.id}`")
    onnx = read_onnx(ctx.db, keys, ctx.home, run, report, variant)
    details = build_and_store_engine(ctx, keys, run, report, variant, onnx, params.get("profile", {}),
                                     params["options"])
    return {"run": run.id, **details}


def build_and_store_engine(ctx: JobContext, keys: KeyOps, run: Run, report: dict[str, Any], variant: str,
                           onnx: bytes, profile: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Build the TensorRT engine of a validated export on this process's GPU, store plan + sidecar, audit it."""
    from appliance.audit import append_audit
    from appliance.catalog import transaction
    from appliance.optimize.tensorrt_engine import (
        EngineBuildOptions,
        build_engine,
        causal_lm_profiles,
        classifier_profiles,
        serve_profile_limits,
    )
    from appliance.train.artifacts import save_artifact

    limits = {k: v for k, v in profile.items() if v is not None}
    if report["task"] == "classifier":
        profiles = classifier_profiles(tuple(report["image_shape"]),
                                       **{k: v for k, v in limits.items() if k == "max_batch"})
    else:
        from transformers import AutoConfig

        from appliance.base_models import resolve_base_model

        config = AutoConfig.from_pretrained(resolve_base_model(run.base_model).path, local_files_only=True)
        # Sized for what `airlock serve` admits by default (its start-up check refuses an engine that is smaller).
        context = int(getattr(config, "max_position_embeddings", 0) or 2048)
        profiles = causal_lm_profiles(config, **{**serve_profile_limits(context), **limits})
    ctx.progress(f"building the {variant} TensorRT engine (minutes on a large model)", variant=variant)
    build = build_engine(onnx, variant=variant, profiles=profiles, options=EngineBuildOptions(**options),
                         quant_recipe=report.get("recipe") if variant == "int8" else None)
    # The plan first: a sidecar never describes a plan that is not there yet.
    artifact = save_artifact(ctx.db, keys, ctx.home, run.id, {engine_plan_file(variant): build.plan})
    save_artifact(ctx.db, keys, ctx.home, run.id,
                  {engine_sidecar_file(variant): json.dumps(build.sidecar, sort_keys=True).encode()})
    details = {"job": ctx.job.id, "artifact": artifact, "variant": variant, "plan_sha256": build.sidecar["plan_sha256"],
               "onnx_sha256": build.sidecar["onnx_sha256"], "sm": build.sidecar["sm"], "gpu": build.sidecar["gpu"],
               "tensorrt": build.sidecar["tensorrt"], "plan_bytes": len(build.plan)}
    with transaction(ctx.db):
        append_audit(ctx.db, "engine.build", run.id, details, actor=ctx.job.actor)
    return details
