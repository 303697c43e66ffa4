"""`airlock optimize` and `airlock engine`: INT8 QAT, ONNX exports and TensorRT engines of a trained run.

    airlock optimize RUN [--recipe quant.toml] [--variants fp32,fp16,int8,genai-int4] [--no-qat] [--wait] [--json]
    airlock optimize show RUN [--json]
    airlock engine build RUN [--variant int8] [--device cuda:0] [--max-batch N] ... [--wait]
    airlock engine check RUN [--variant int8]
    airlock engine export-triton RUN --repo DIR --name NAME [--engine | --onnx] [--max-batch-size N]

`optimize` and `engine build` run as detached jobs (like `airlock train`); `--wait` follows the job
and exits 0 only when it succeeded. Exports and engines are stored encrypted in the run's vault
object; `export-triton` is the one command that writes a model in plaintext, and it is audited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.cli_output import echo_json, echo_table

_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
_wait = click.option("--wait", is_flag=True, help="Follow the job's progress until it ends; exit 2 unless it "
                                                  "succeeded.")


def _open():
    from appliance.catalog import open_catalog
    from appliance.jobs.runner import reconcile_jobs

    db = open_catalog()
    reconcile_jobs(db)
    return db


def _session(db, action: str):
    """Keys (a locked vault fails here, with its hint) and the session allowed to do `action`."""
    from appliance.access import require
    from appliance.paths import airlock_home
    from appliance.vault.lifecycle import keys_for

    keys = keys_for(db, airlock_home())
    return keys, require(db, airlock_home(), action)


class _RunFirstGroup(click.Group):
    """`airlock optimize RUN ...` means `airlock optimize run RUN ...`; `show` stays a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_RunFirstGroup)
def optimize() -> None:
    """Quantize a trained run (PTQ + QAT to INT8) and export it to ONNX: `airlock optimize RUN --wait`."""


@optimize.command("run")
@click.argument("run_id")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Quantization recipe TOML (every field optional; unknown fields are refused).")
@click.option("--variants", default="fp32,fp16,int8", show_default=True,
              help="ONNX variants to export and validate (comma-separated): fp32, fp16, int8 (Q/DQ, TensorRT-ready); "
                   "for LMs also genai-fp32, genai-int8, genai-int4 (onnxruntime-genai, CPU) and genai-fp16-cuda, "
                   "genai-bf16-cuda, genai-int4-cuda.")
@click.option("--no-qat", is_flag=True, help="Stop at PTQ (calibration only), without the QAT fine-tuning.")
@_wait
@_json
def optimize_run(run_id: str, recipe_path: Path | None, variants: str, no_qat: bool, wait: bool,
                 as_json: bool) -> int:
    """Quantize and export RUN as a detached job (the ONNX exports are stored encrypted with the run)."""
    import dataclasses

    from appliance.errors import AirlockError
    from appliance.jobs.records import get_job
    from appliance.optimize.jobs import parse_variants, start_optimize, stored_report
    from appliance.optimize.recipe import load_quant_recipe
    from appliance.paths import airlock_home
    from appliance.train.runs import get_run

    db = _open()
    keys, _ = _session(db, "optimize.run")
    recipe = load_quant_recipe(recipe_path)
    if no_qat:
        recipe = dataclasses.replace(recipe, qat=False)
    job = start_optimize(db, run_id, recipe, parse_variants(variants))
    if not as_json:
        click.echo(f"started job {job.id}: optimize run {run_id} ({variants}"
                   f"{', PTQ only' if not recipe.qat else ''})")
    if not wait:
        if as_json:
            echo_json({"job": job.to_dict()})
        else:
            click.echo(f"follow it with `airlock jobs show {job.id}`; then `airlock optimize show {run_id}`")
        return 0
    job = _follow(db, job.id, quiet=as_json)
    if job is None:
        return 130
    if job.state != "succeeded":
        if as_json:
            echo_json({"job": job.to_dict(), "report": None})
        hint = job.hint or ""
        if job.state in ("cancelled", "interrupted"):
            hint = f"nothing was stored (QAT has no checkpoint); start it again with `airlock optimize {run_id}`"
        raise AirlockError(f"optimize job {job.id} ended {job.state}" + (f": {job.error}" if job.error else ""),
                           hint=hint)
    report = stored_report(db, keys, airlock_home(), get_run(db, run_id))
    if as_json:
        echo_json({"job": get_job(db, job.id).to_dict(), "report": report})
        return 0
    click.echo(f"run {run_id} optimized: {_metrics_text(report)}")
    click.echo(f"exports: {_variants_text(report)}")
    click.echo(f"serves with: {report['runtime']['reason']}")
    return 0


def _follow(db, job_id: str, *, quiet: bool):
    """Progress to stderr until the job ends (appliance.jobs.cli.follow_job); None after Ctrl-C."""
    from appliance.jobs.cli import follow_job

    def describe(event) -> str:
        loss = f", loss {event.data['loss']:.4f}" if event.data.get("loss") is not None else ""
        return f"{event.message or 'step'} {event.data['step']}/{event.data.get('total_steps', '?')}{loss}"

    return follow_job(db, job_id, quiet=quiet, describe=describe)


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _metrics_text(report: dict[str, Any]) -> str:
    stages = [("float", report.get("float")), ("PTQ", report.get("ptq")), ("QAT", report.get("qat"))]
    if report["task"] == "causal_lm":
        text = "perplexity " + ", ".join(f"{name} {_num(m['perplexity'], 3)}" for name, m in stages if m)
    else:
        text = "accuracy " + ", ".join(f"{name} {_num(m['accuracy'], 3)}" for name, m in stages if m)
        text += "; ROC AUC " + ", ".join(f"{name} {_num(m.get('roc_auc'), 3)}" for name, m in stages if m)
    if report.get("qat_steps"):
        text += f" (QAT {report.get('qat_steps_done', 0)}/{report['qat_steps']} steps at lr {report['qat_lr']:.2g})"
    return text


def _variant_text(name: str, v: dict[str, Any]) -> str:
    if not v.get("stored"):
        return f"{name} NOT stored ({'; '.join(v.get('failures', []))})"
    parity = v["parity"]
    size = f"{v['bytes'] / 2**20:.1f} MiB"
    if v.get("route") == "adapter":  # genai-int4 of a LoRA run: its adapter file over a shared base (docs/adr/0016)
        base = v["base"]
        size = (f"adapter file {size} over base {base['object']} ({base['bytes'] / 2**20:.1f} MiB, "
                f"{'built by this run' if base['built'] else 'reused'})")
    text = (f"{name} ok, {size}, max rel diff {parity['max_rel_diff']:.2g}, "
            f"top-1 {parity['top1_agreement']:.1%}")
    if "greedy_equal" in parity:
        text += ", greedy decoding " + ("equal" if parity["greedy_equal"] else "differs")
    quality = v.get("quality") or {}
    if quality.get("metric") == "perplexity":
        text += f", perplexity {quality['increase']:+.1%} vs float"
    elif quality.get("measured"):
        text += ", " + ", ".join(f"{k} {m['variant'] - m['float']:+.3f} vs float"
                                 for k, m in quality["measured"].items())
    speed = (v.get("generator") or {}).get("decode_tokens_per_s")
    if isinstance(speed, int | float):
        text += f", decode {speed:.0f} tokens/s (og.Generator, batch {v['generator']['batch']})"
    return text


def _variants_text(report: dict[str, Any]) -> str:
    return "; ".join(_variant_text(name, v) for name, v in report["variants"].items())


@optimize.command("show")
@click.argument("run_id")
@_json
def optimize_show(run_id: str, as_json: bool) -> None:
    """The stored report: float vs PTQ vs QAT, each export's parity with PyTorch, the runtime and why, engines."""
    from appliance.audit import canonical_json
    from appliance.optimize.jobs import engine_plan_file, stored_engines, stored_report
    from appliance.paths import airlock_home
    from appliance.train.runs import get_run

    db = _open()
    keys, _ = _session(db, "models.view")
    run = get_run(db, run_id)
    report = stored_report(db, keys, airlock_home(), run)
    engines = stored_engines(db, keys, airlock_home(), run)
    for variant, sidecar in engines.items():
        current = report["variants"].get(variant, {}).get("sha256")
        sidecar["stale"] = sidecar.get("onnx_sha256") != current
        sidecar["file"] = engine_plan_file(variant)
    if as_json:
        echo_json({"run": run.id, "report": report, "engines": engines})
        return
    rows = [("run", f"{run.id} ({run.kind}, {run.base_model})"), ("optimized", f"{report['created_at']} by job "
                                                                              f"{report['job']}"),
            ("recipe", canonical_json(report["recipe"])), ("metrics", _metrics_text(report))]
    rows += [(f"export {name}", _variant_text(name, v)) for name, v in report["variants"].items()]
    runtime = report["runtime"]
    rows.append(("runtime", f"{runtime['reason']} (chosen when optimized)"))
    rows += [("warning", w) for w in runtime.get("warnings", [])]
    for variant, sidecar in engines.items():
        rows.append((f"engine {variant}", f"SM {sidecar['sm']} {sidecar['gpu']}, TensorRT {sidecar['tensorrt']}, "
                                          f"built {sidecar['built_at']}"
                                          + (" (STALE: built from an earlier export)" if sidecar["stale"] else "")))
    echo_table(rows, ["field", "value"])


# --- engines ----------------------------------------------------------------------------------------------------------

@click.group()
def engine() -> None:
    """TensorRT engines of optimized runs: build on the serving GPU, check, export to Triton."""


def _check_device(device: str) -> None:
    from appliance.optimize.errors import EngineError

    if not (device.startswith("cuda:") and device[5:].isdigit()):
        raise EngineError(f"--device {device!r} is not cuda:N", hint="engines are built on a GPU, e.g. --device cuda:0")


@engine.command("build")
@click.argument("run_id")
@click.option("--variant", type=click.Choice(["int8", "fp16", "fp32"]),
              help="Which ONNX export to build from (default: the best validated one, int8 first).")
@click.option("--device", default="cuda:0", show_default=True, help="The GPU that builds (and will run) it.")
@click.option("--max-batch", type=click.IntRange(1, 4096), help="Largest batch the engine accepts.")
@click.option("--max-sequence", type=click.IntRange(1, 131072), help="LMs: longest prompt in one call.")
@click.option("--max-past", type=click.IntRange(1, 131072), help="LMs: longest KV cache.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="Builder optimization level: 0 fast build ... 5 fastest engine.")
@click.option("--hardware-compat", type=click.Choice(["none", "ampere_plus", "same_compute_capability"]),
              default="none", show_default=True, help="Let the engine run on other GPUs (slower).")
@click.option("--version-compatible", is_flag=True, help="Let later TensorRT versions load the engine.")
@click.option("--weak-fp16", is_flag=True, help="TensorRT 10 only: let the builder pick FP16 kernels.")
@click.option("--workspace-gib", type=click.FloatRange(0.25, 256), default=4.0, show_default=True)
@click.option("--contexts", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Inferences the engine runs at once (set it to `airlock serve --workers`; more wait).")
@_wait
@_json
def engine_build(run_id: str, variant: str | None, device: str, max_batch: int | None, max_sequence: int | None,
                 max_past: int | None, opt_level: int, hardware_compat: str, version_compatible: bool,
                 weak_fp16: bool, workspace_gib: float, contexts: int, wait: bool, as_json: bool) -> int:
    """Build a TensorRT engine from RUN's stored ONNX export, as a job on the GPU (needs TensorRT)."""
    from appliance.errors import AirlockError
    from appliance.optimize.jobs import engine_build_refusal, start_engine_build
    from appliance.paths import airlock_home

    _check_device(device)
    refusal = engine_build_refusal(device)
    if refusal is not None:
        raise refusal
    db = _open()
    keys, _ = _session(db, "optimize.run")
    options = {"workspace_gib": workspace_gib, "builder_optimization_level": opt_level,
               "hardware_compatibility": hardware_compat, "version_compatible": version_compatible,
               "weak_fp16": weak_fp16, "contexts": contexts}
    profile = {"max_batch": max_batch, "max_sequence": max_sequence, "max_past": max_past}
    job = start_engine_build(db, keys, airlock_home(), run_id, variant=variant, device=device, profile=profile,
                             options=options)
    if not as_json:
        click.echo(f"started job {job.id}: {job.params['variant']} engine of run {run_id} on {device}")
    if not wait:
        if as_json:
            echo_json({"job": job.to_dict()})
        return 0
    job = _follow(db, job.id, quiet=as_json)
    if job is None:
        return 130
    if as_json:
        echo_json({"job": job.to_dict()})
    if job.state != "succeeded":
        raise AirlockError(f"engine build job {job.id} ended {job.state}" + (f": {job.error}" if job.error else ""),
                           hint=job.hint or f"start it again with `airlock engine build {run_id}`")
    if not as_json:
        result = job.result or {}
        click.echo(f"engine stored: {result.get('variant')} for SM {result.get('sm')}, TensorRT "
                   f"{result.get('tensorrt')} ({result.get('plan_bytes', 0) / 2**20:.1f} MiB, encrypted)")
    return 0


def _engine_variant(engines: dict[str, Any], variant: str | None, run_id: str) -> str:
    from appliance.optimize.errors import EngineError

    if not engines:
        raise EngineError(f"run {run_id} has no TensorRT engine",
                          hint=f"build one on the serving GPU: `airlock engine build {run_id}`")
    if variant is None:
        return next(iter(engines))
    if variant not in engines:
        raise EngineError(f"run {run_id} has no {variant} engine (built: {', '.join(engines)})",
                          hint=f"build it with `airlock engine build {run_id} --variant {variant}`")
    return variant


@engine.command("check")
@click.argument("run_id")
@click.option("--variant", type=click.Choice(["int8", "fp16", "fp32"]), help="Which engine (default: the best built).")
@_json
def engine_check(run_id: str, variant: str | None, as_json: bool) -> None:
    """Does RUN's engine fit this machine (GPU architecture, TensorRT, CUDA, the plan's hash)? Refuses if not."""
    from appliance.optimize.engine_sidecar import check_sidecar, current_machine
    from appliance.optimize.errors import EngineMismatchError
    from appliance.optimize.jobs import engine_plan_file, stored_engines, stored_report
    from appliance.paths import airlock_home
    from appliance.train.runs import get_run
    from appliance.vault.store import read_bytes

    db = _open()
    keys, _ = _session(db, "optimize.run")
    run = get_run(db, run_id)
    engines = stored_engines(db, keys, airlock_home(), run)
    variant = _engine_variant(engines, variant, run.id)
    sidecar = engines[variant]
    plan = read_bytes(db, keys, airlock_home(), run.artifact, engine_plan_file(variant))
    machine = current_machine()
    warnings = check_sidecar(sidecar, machine, plan_bytes=plan)
    report = stored_report(db, keys, airlock_home(), run)
    if sidecar.get("onnx_sha256") != report["variants"].get(variant, {}).get("sha256"):
        raise EngineMismatchError(f"the {variant} engine of run {run.id} was built from an earlier ONNX export",
                                  hint=f"rebuild it with `airlock engine build {run.id} --variant {variant}`")
    if as_json:
        echo_json({"run": run.id, "variant": variant, "ok": True, "warnings": warnings, "machine": machine.to_dict(),
                   "sidecar": sidecar})
        return
    click.echo(f"the {variant} engine of run {run.id} fits this machine: SM {machine.sm} {machine.gpu}, TensorRT "
               f"{machine.tensorrt}, CUDA {machine.cuda}")
    for warning in warnings:
        click.echo(f"warning: {warning}")


@engine.command("export-triton")
@click.argument("run_id")
@click.option("--repo", "repository", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="The Triton model repository (created if missing).")
@click.option("--name", required=True, help="Model name inside the repository.")
@click.option("--engine/--onnx", "use_engine", default=False, show_default=True,
              help="The TensorRT engine (Triton's TensorRT must match it) or the ONNX export (ORT backend).")
@click.option("--variant", type=click.Choice(["int8", "fp16", "fp32"]),
              help="Default: the best engine, or the best export for a GPU (int8 first; fp32 with --cpu).")
@click.option("--max-batch-size", type=click.IntRange(0, 65536), default=0, show_default=True,
              help="Triton's dynamic batching (0 = off; the model then sees exactly what clients send).")
@click.option("--cpu", is_flag=True, help="Triton runs the ONNX on CPUs (KIND_CPU instances).")
@_json
def engine_export_triton(run_id: str, repository: Path, name: str, use_engine: bool, variant: str | None,
                         max_batch_size: int, cpu: bool, as_json: bool) -> None:
    """Write RUN's model into a Triton model repository: PLAINTEXT for the Triton server (audited)."""
    import hashlib

    from appliance.audit import append_audit
    from appliance.catalog import transaction
    from appliance.optimize.errors import OptimizeError
    from appliance.optimize.jobs import (
        CPU_ORDER,
        GPU_ORDER,
        engine_plan_file,
        read_onnx,
        stored_engines,
        stored_report,
        usable_variants,
    )
    from appliance.optimize.triton import write_triton_model
    from appliance.paths import airlock_home
    from appliance.train.runs import get_run
    from appliance.vault.store import read_bytes

    db = _open()
    keys, session = _session(db, "optimize.run")
    home = airlock_home()
    run = get_run(db, run_id)
    report = stored_report(db, keys, home, run)
    if use_engine:
        if cpu:
            raise OptimizeError("--engine and --cpu do not go together: a TensorRT plan runs on a GPU",
                                hint="use --onnx --cpu, or leave out --cpu")
        engines = stored_engines(db, keys, home, run)
        variant = _engine_variant(engines, variant, run.id)
        payload = read_bytes(db, keys, home, run.artifact, engine_plan_file(variant))
        model_dir = write_triton_model(repository, name, engine_plan=payload, engine_sidecar=engines[variant],
                                       max_batch_size=max_batch_size)
    else:
        usable = usable_variants(report)
        variant = variant or next((v for v in (CPU_ORDER if cpu else GPU_ORDER) if v in usable), None)
        if variant not in usable:
            raise OptimizeError(f"run {run.id} has no validated {variant or 'ONNX'} export",
                                hint=f"exported: {', '.join(usable) or 'none'}; run `airlock optimize {run.id}`")
        payload = read_onnx(db, keys, home, run, report, variant)
        model_dir = write_triton_model(repository, name, onnx_bytes=payload, max_batch_size=max_batch_size,
                                       gpu=not cpu)
    details = {"repository": str(Path(repository).resolve()), "name": name, "variant": variant,
               "format": "tensorrt_plan" if use_engine else "onnx", "sha256": hashlib.sha256(payload).hexdigest(),
               "bytes": len(payload), "max_batch_size": max_batch_size}
    with transaction(db):
        append_audit(db, "optimize.export_triton", run.id, details, actor=session.actor if session else None)
    if as_json:
        echo_json({"run": run.id, "model_dir": str(model_dir), **details})
        return
    click.echo(f"wrote {model_dir} ({details['format']}, {variant}): config.pbtxt and 1/"
               f"{'model.plan' if use_engine else 'model.onnx'}")
    click.echo("note: the model is in plaintext there, for the Triton server; keep the directory readable only by "
               "Triton's account")
