"""`airlock train lm|classifier|runs|show`: fine-tuning runs as resumable jobs over encrypted datasets.

    airlock train lm --base tiny-deepseek-r1 --data qa --recipe recipe.toml          # starts the job, returns
    airlock train lm --base tiny-deepseek-r1 --data qa --recipe recipe.toml --wait   # ... and follows it
    airlock train lm --base tiny-deepseek-r1 --data qa --device cpu --nproc 2        # 2 processes (torchrun, gloo)
    airlock train lm --base NAME --data qa --device cuda:0,1                          # one process per GPU (NCCL)
    airlock train lm ... --nnodes 2 --node-rank 0|1 --master-addr HOST          # two machines (train/nodes.py)
    airlock train lm --resume RUN [--wait]                                            # after kill -9 / cancel / failure
    airlock train runs [--json] / airlock train show RUN [--json]
    airlock train export-curves RUN --out DIR                                         # TensorBoard event file

A run always starts as a detached job (it survives the terminal closing); `--wait` follows its
progress and exits 0 only when it succeeded. Ctrl-C while waiting leaves the job running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from appliance.cli_output import echo_json, echo_table

_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def open_and_reconcile():
    """The catalog, after runs whose job process vanished took its state, and stale token caches were shredded."""
    from appliance.catalog import open_catalog
    from appliance.jobs.runner import reconcile_jobs
    from appliance.paths import airlock_home
    from appliance.train.runs import sync_with_jobs
    from appliance.train.token_cache import shred_caches_of_deleted_datasets

    db = open_catalog()
    reconcile_jobs(db)
    sync_with_jobs(db)
    for object_id in shred_caches_of_deleted_datasets(db, airlock_home()):
        click.echo(f"note: shredded {object_id}, the token cache of a deleted dataset", err=True)
    return db


@click.group()
def train() -> None:
    """Fine-tune a language model (LoRA) or an image classifier on a dataset in the vault."""


def _start_options(func):
    options = [
        click.option("--base", help="Base model name (`airlock base-models list`) or absolute path."),
        click.option("--data", "dataset", help="Dataset name (`airlock data list`); its latest version is pinned."),
        click.option("--recipe", "recipe_path", type=click.Path(path_type=Path, dir_okay=False),
                     help="Recipe TOML (every field optional; unknown fields are refused)."),
        click.option("--resume", "resume_run", metavar="RUN",
                     help="Continue an interrupted, cancelled or failed run from its last checkpoint."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (the first GPU, or the first --nproc GPUs, when visible; else cpu), cpu, cuda:N, "
                          "or cuda:N,M,... (one training process per GPU)."),
        click.option("--nproc", type=int, default=None,
                     help="Training processes, launched through torchrun (DDP): on GPUs one per GPU (NCCL), "
                          "on CPU gloo. Default: 1, or one per GPU named in --device."),
        click.option("--wait", is_flag=True,
                     help="Follow the job's progress until it ends; exit 2 unless it succeeded."),
        click.option("--task", help="Register the finished run as a candidate model version of this task "
                                    "(`airlock models`)."),
        _json,
    ]
    for option in reversed(options):
        func = option(func)
    return func


@train.command("lm")
@_start_options
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the memory plan (weights, adapter, optimizer, activations, logits vs free memory) and "
                   "exit: 0 if it fits, 2 if not. Reads only the base model's config.json.")
@click.option("--gradient-checkpointing", "checkpointing", type=click.Choice(["auto", "on", "off"]), default=None,
              help="Override the recipe's gradient_checkpointing (auto: on where the memory plan's activations "
                   "outweigh the rest). Recorded in the run's recipe.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default=None,
              help="Override the recipe's strategy for --nproc N: ddp (a full model per process) or fsdp "
                   "(parameters sharded over the processes, for a base that does not fit one GPU).")
@click.option("--nnodes", type=int, default=None,
              help="Machines training this run together (torchrun's static rendezvous); run the same command on "
                   "each, with its own --node-rank. Node 0 records the run.")
@click.option("--node-rank", type=int, default=None, help="This machine's number among --nnodes, 0 to N-1.")
@click.option("--master-addr", default=None, help="Address of node 0, where the machines meet (every node the same).")
@click.option("--master-port", type=int, default=None, help="TCP port on node 0 for the rendezvous (default 29500).")
@click.option("--join-timeout", "join_timeout", type=int, default=None,
              help="Seconds a node waits for the others to join before it fails (default 600).")
def train_lm(base: str | None, dataset: str | None, recipe_path: Path | None, resume_run: str | None, device: str,
             nproc: int | None, wait: bool, task: str | None, as_json: bool, plan_only: bool,
             checkpointing: str | None, strategy: str | None, nnodes: int | None, node_rank: int | None,
             master_addr: str | None, master_port: int | None, join_timeout: int | None) -> int:
    """LoRA supervised fine-tuning of a causal LM on a text dataset (chat or plain text records)."""
    overrides: dict[str, Any] = {"gradient_checkpointing": checkpointing, "strategy": strategy}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if plan_only:
        return _print_plan(base, recipe_path, device, nproc, as_json, overrides)
    from appliance.train.nodes import plan_nodes

    node_flags = (nnodes, node_rank, master_addr, master_port, join_timeout)
    if resume_run and any(v is not None for v in node_flags):
        from appliance.train import runs

        raise runs.RunError("--resume continues a run on the machines it started on",
                            hint="leave out --nnodes, --node-rank, --master-addr, --master-port and --join-timeout "
                                 "(run `airlock train lm --resume RUN` on every node)")
    nodes = plan_nodes("lm", *node_flags, task=task)  # one line for bad flags, before anything is touched
    return _start("lm", base, dataset, recipe_path, resume_run, device, wait, as_json, task, nproc, overrides,
                  nodes=nodes)


def _print_plan(base: str | None, recipe_path: Path | None, device: str, nproc: int | None, as_json: bool,
                overrides: dict[str, Any] | None = None) -> int:
    from appliance.base_models import resolve_base_model
    from appliance.train import runs
    from appliance.train.memory_plan import plan_for
    from appliance.train.recipe import load_recipe

    if not base:
        raise runs.RunError("`airlock train lm --plan` needs --base",
                            hint="e.g. airlock train lm --plan --base tiny-deepseek-r1 --recipe recipe.toml")
    if not _valid_device(device):
        raise runs.RunError(f"--device {device!r} is not auto, cpu or cuda:N", hint="e.g. --device cuda:0")
    model = resolve_base_model(base)
    recipe = _with_overrides(load_recipe(recipe_path), overrides)
    if device == "auto":
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    world = nproc or (len(device.split(",")) if device.startswith("cuda:") else 1)
    device = device.split(",")[0]  # every rank holds the same: plan the first
    plan = plan_for(model, recipe, device=device, world=world,
                    shards=world if recipe.strategy == "fsdp" and world > 1 else 1)
    if plan is None:
        click.echo(f"no memory plan for {model.architecture} (the planner models dense Qwen2/Llama decoders)")
        return 0
    if as_json:
        echo_json({"base": model.name, "world": world, **plan.to_dict()})
    else:
        click.echo(f"memory plan: {model.name}, {recipe.batch_size} x {recipe.max_length} tokens per micro-batch, "
                   f"precision {recipe.precision}, quantization {recipe.quantization}, gradient checkpointing "
                   f"{'on' if plan.checkpointing else 'off'}"
                   f"{' (auto)' if recipe.gradient_checkpointing == 'auto' else ''}, per process ({world}"
                   f"{', fsdp' if recipe.strategy == 'fsdp' and world > 1 else ''})")
        for line in plan.lines():
            click.echo(f"  {line}")
    return 0 if plan.fits else 2


@train.command("classifier")
@_start_options
def train_classifier(base: str | None, dataset: str | None, recipe_path: Path | None, resume_run: str | None,
                     device: str, nproc: int | None, wait: bool, task: str | None, as_json: bool) -> int:
    """Fine-tune an image classifier on an images or DICOM dataset with labels."""
    return _start("classifier", base, dataset, recipe_path, resume_run, device, wait, as_json, task, nproc)


def _valid_device(device: str) -> bool:
    indices = device[5:].split(",") if device.startswith("cuda:") else []
    return device in ("auto", "cpu") or (bool(indices) and all(i.isdigit() for i in indices))


def _with_overrides(recipe: Any, overrides: dict[str, Any] | None) -> Any:
    """The recipe with command-line overrides, validated like recipe lines."""
    from dataclasses import replace

    return replace(recipe, **overrides) if overrides else recipe


def _start(kind: str, base: str | None, dataset: str | None, recipe_path: Path | None, resume_run: str | None,
           device: str, wait: bool, as_json: bool, task: str | None = None, nproc: int | None = None,
           overrides: dict[str, Any] | None = None, nodes: Any = None) -> int:
    from appliance.access import require
    from appliance.jobs.records import get_job
    from appliance.paths import airlock_home
    from appliance.train import runs
    from appliance.train.jobs import plan_processes
    from appliance.vault.lifecycle import keys_for

    command = f"airlock train {kind}"
    if not _valid_device(device):
        raise runs.RunError(f"--device {device!r} is not auto, cpu or cuda:N (cuda:N,M,... for several GPUs)",
                            hint="e.g. --device cuda:1, or --device cuda:0,1 to train on two GPUs")
    if not resume_run:
        plan_processes(kind, device, nproc)  # refuse a bad --nproc/--device before anything is touched
    db = open_and_reconcile()
    keys_for(db, airlock_home())  # fail now with "vault is locked", not inside the job
    require(db, airlock_home(), "train.start")  # operators and admins train; auditors never decrypt data
    if resume_run:
        if base or dataset or recipe_path or task or overrides:
            raise runs.RunError("--resume continues a run with its own base model, data, recipe and task",
                                hint="leave out --base, --data, --recipe and --task, or start a new run without "
                                     "--resume")
        run = _resume(db, kind, resume_run, device=device, nproc=nproc)
        verb = "resumed"
    else:
        if not base or not dataset:
            example = "tiny-deepseek-r1" if kind == "lm" else "tiny-resnet-cls"
            raise runs.RunError(f"`{command}` needs --base and --data (or --resume RUN)",
                                hint=f"e.g. {command} --base {example} --data NAME --recipe recipe.toml")
        from appliance.train.jobs import recipe_class, start_training
        from appliance.train.recipe import load_recipe

        recipe = _with_overrides(load_recipe(recipe_path, recipe_class(kind)), overrides)
        run, _ = start_training(db, kind, base, dataset, recipe, device=device, task=task, nproc=nproc, nodes=nodes)
        verb = "started"
    if not as_json:
        click.echo(f"{verb} run {run.id} (job {run.job_id}): {run.base_model} on {run.dataset_name} "
                   f"v{run.dataset_version}")
    if not wait:
        if as_json:
            echo_json({"run": run.to_dict(), "job": get_job(db, run.job_id).to_dict()})
        else:
            click.echo(f"follow it with `airlock train show {run.id}` or `airlock jobs show {run.job_id}`")
        return 0
    job = follow_training(db, run.job_id, quiet=as_json)
    if job is None:
        return 130
    run = runs.get_run(db, run.id)
    if as_json:
        echo_json({"run": run.to_dict(), "job": job.to_dict()})
    if job.state != "succeeded":
        from appliance.errors import AirlockError

        hint = job.hint or ""
        if job.state in ("cancelled", "interrupted"):
            hint = f"continue it from its last checkpoint with `{command} --resume {run.id}`"
        raise AirlockError(f"run {run.id} ended {job.state}" + (f": {job.error}" if job.error else ""), hint=hint)
    if not as_json and (job.result or {}).get("recorded_on"):  # another node than node 0 of several machines
        click.echo(f"run {run.id} succeeded as node {job.result['node_rank']} of {job.result['nnodes']}: the run, "
                   f"its metrics and its adapter are recorded on {job.result['recorded_on']}")
    elif not as_json:
        click.echo(f"run {run.id} succeeded: {_metric_text(run)}; weights in vault object {run.artifact}")
        if (job.result or {}).get("version"):
            click.echo(f"registered as model version {job.result['version']} (candidate): `airlock models card "
                       f"{job.result['version']}`")
    return 0


def _resume(db, kind: str, run_id: str, *, device: str = "auto", nproc: int | None = None):
    """Relaunch the run's job as it started: same device(s), same number of processes."""
    from appliance.jobs.records import get_job
    from appliance.jobs.runner import resume_job
    from appliance.train import runs

    run = runs.get_run(db, run_id)
    job = get_job(db, run.job_id)
    started = int(job.params.get("nproc", 1))
    if nproc is not None and nproc != started:
        raise runs.RunError(f"run {run_id} trains in {started} process(es); it resumes with the same number, not "
                            f"--nproc {nproc}",
                            hint="leave out --nproc (how many ranks share each step decides the data order, so the "
                                 "checkpoint continues only that way), or start a new run")
    if device != "auto" and device != job.device:
        raise runs.RunError(f"run {run_id} trains on {job.device}; it resumes there, not on --device {device}",
                            hint="leave out --device, or start a new run")
    if run.kind != kind:
        raise runs.RunError(f"run {run_id} was started with `airlock train {run.kind}`, not `airlock train {kind}`",
                            hint=f"use `airlock train {run.kind} --resume {run_id}`")
    if run.state == "succeeded":
        raise runs.RunError(f"run {run_id} already finished", hint="start a new run to train again")
    if run.state in ("queued", "running"):
        raise runs.RunError(f"run {run_id} is {run.state}", hint=f"follow it with `airlock train show {run_id}`")
    resume_job(db, run.job_id)
    return runs.get_run(db, run_id)


def follow_training(db, job_id: str, *, quiet: bool):
    """Progress to stderr until the job ends (appliance.jobs.cli.follow_job); None after Ctrl-C."""
    from appliance.jobs.cli import follow_job

    return follow_job(db, job_id, quiet=quiet, describe=lambda event: _progress_text(event.data))


def _progress_text(d: dict[str, Any]) -> str:
    parts = [f"step {d['step']}/{d.get('total_steps', '?')}"]
    if d.get("loss") is not None:
        parts.append(f"loss {d['loss']:.4f}")
    if d.get("val_loss") is not None:
        parts.append(f"val loss {d['val_loss']:.4f}")
    if d.get("val_auc") is not None:
        parts.append(f"val AUC {d['val_auc']:.3f}")
    if d.get("tokens_per_s"):
        parts.append(f"{d['tokens_per_s']:.0f} tok/s")
    if d.get("eta_s") is not None:
        parts.append(f"eta {int(d['eta_s'])} s")
    if d.get("peak_memory_mb"):
        parts.append(f"peak {d['peak_memory_mb']:.0f} MiB")
    return ", ".join(parts)


def _metric_text(run) -> str:
    m = run.metrics
    if run.kind == "lm":
        before, after = m.get("initial_val_loss"), m.get("val_loss")
        text = f"val loss {_num(before)} -> {_num(after)}" if before is not None else f"val loss {_num(after)}"
        test = m.get("test") or {}
        if test.get("perplexity") is not None:
            text += f", test perplexity {_num(test['perplexity'], 2)}"
        return text
    test = m.get("test") or {}
    text = f"val AUC {_num(m.get('val_auc'), 3)}"
    if test.get("accuracy") is not None:
        text += f", test accuracy {_num(test['accuracy'], 3)}, test AUC {_num(test.get('roc_auc'), 3)}"
    op = test.get("operating_point") or {}
    if op:
        ci = op.get("sensitivity_ci")
        where = "the operating point" if op.get("site_chosen") else \
            f"the default threshold {op['threshold']:g}" if op.get("threshold") is not None else "an operating point"
        text += f", sensitivity at {where} {_num(op.get('sensitivity'), 3)}" + (
            f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci and op.get("sensitivity") is not None else "")
    if "ece" in test:
        text += f", ECE {_num(test.get('ece'), 3)}"
    return text


def _num(value: Any, digits: int = 4) -> str:
    return "not measured" if value is None else f"{value:.{digits}f}"


@train.command("runs")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]))
@click.option("--kind", type=click.Choice(["lm", "classifier"]))
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@_json
def train_runs(state: str | None, kind: str | None, limit: int, as_json: bool) -> None:
    """Training runs, newest first."""
    from appliance.train.runs import list_runs

    found = list_runs(open_and_reconcile(), state=state, kind=kind, limit=limit)
    if as_json:
        echo_json({"runs": [r.to_dict() for r in found]})
        return
    if not found:
        click.echo("no training runs yet: start one with `airlock train lm --base NAME --data DATASET`")
        return
    echo_table([(r.id, r.state, r.base_model, f"{r.dataset_name} v{r.dataset_version}", r.created_at,
                 _metric_text(r) if r.metrics else "") for r in found],
               ["run", "state", "base", "data", "created", "metrics"])


@train.command("show")
@click.argument("run_id")
@_json
def train_show(run_id: str, as_json: bool) -> None:
    """One run: lineage (base model, dataset version, recipe and their hashes), state, metrics, artifact."""
    from appliance.audit import canonical_json
    from appliance.jobs.records import events, get_job
    from appliance.train.runs import get_run

    db = open_and_reconcile()
    run = get_run(db, run_id)
    job = get_job(db, run.job_id)
    last = events(db, job.id, kind="progress", limit=1)
    if as_json:
        echo_json({"run": run.to_dict(), "job": job.to_dict(), "last_progress": last[0].data if last else None})
        return
    rows = [("run", run.id), ("kind", run.kind), ("state", run.state), ("job", f"{job.id} ({job.state})"),
            ("started by", run.actor), ("created", run.created_at), ("finished", run.finished_at or "-"),
            ("base model", f"{run.base_model} sha256 {run.base_hash or '(hashed when the job starts)'}"),
            ("dataset", f"{run.dataset_name} ({run.dataset_id}) version {run.dataset_version} "
                        f"sha256 {run.dataset_hash}"),
            ("recipe", f"sha256 {run.recipe_hash} {canonical_json(run.recipe)}")]
    if last and run.state in ("queued", "running"):
        rows.append(("progress", _progress_text(last[0].data) if "step" in last[0].data else last[0].message))
    if run.metrics:
        rows.append(("metrics", _metric_text(run)))
    if run.artifact:
        rows.append(("weights", f"vault object {run.artifact} (encrypted)"))
    from appliance.paths import airlock_home
    from appliance.train.curves import EVENTS, curves_object_id
    from appliance.vault.store import list_files

    if EVENTS in list_files(airlock_home(), curves_object_id(run.id)):
        rows.append(("curves", f"vault object {curves_object_id(run.id)} (encrypted): `airlock train export-curves "
                               f"{run.id} --out DIR`, then `tensorboard --logdir DIR`"))
    if run.error or job.error:
        rows += [("error", run.error or job.error or ""), ("hint", job.hint or "")]
    echo_table(rows, ["field", "value"])


@train.command("export-curves")
@click.argument("run_id")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder to write into (the run gets its own subfolder there, which must be new or empty).")
def train_export_curves(run_id: str, out: Path) -> None:
    """Write a run's training curves (loss, lr, grad norm, eval metrics) as a TensorBoard event file. Audited.

    Numbers only, never record contents. Works while the run trains (the curves as of its last
    checkpoint) and after it ended. View with `tensorboard --logdir OUT` on any machine."""
    from appliance.access import require
    from appliance.paths import airlock_home
    from appliance.train.curves import export_curves
    from appliance.train.runs import get_run
    from appliance.vault.lifecycle import keys_for

    db = open_and_reconcile()
    run = get_run(db, run_id)
    keys = keys_for(db, airlock_home())
    require(db, airlock_home(), "train.start")  # the training roles; auditors never decrypt
    target = export_curves(db, keys, airlock_home(), run, out)
    click.echo(f"wrote the training curves of run {run.id} ({run.state}) to {target}")
    click.echo(f"view them with `tensorboard --logdir {out}`")
