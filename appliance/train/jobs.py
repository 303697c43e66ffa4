"""Job kind `train`: LoRA fine-tuning of a language model, or an image classifier, on a dataset in the vault.

    airlock train lm --base tiny-deepseek-r1 --data qa --recipe recipe.toml --wait

`start_training` pins the dataset's latest version, writes the run row and launches the job (a
detached process, see appliance.jobs.runner). The job, `run_training`, top to bottom:

1. takes the data keys from the running key agent (a locked vault fails at once, with a hint);
2. checks the pinned dataset version is still there and unchanged, and hashes the base model
   (a resumed run refuses a base model whose files changed);
3. decrypts the records into memory; token ids come from the vault-encrypted cache when an
   earlier run already tokenized this data with this tokenizer;
4. trains with vault-encrypted checkpoints at every evaluation and on SIGTERM / `jobs cancel`; the
   training curves (loss, lr, grad norm, eval metrics) go with each checkpoint into the vault object
   `curves-<run id>` as a TensorBoard event file (appliance.train.curves; `airlock train export-curves`);
5. encrypts the adapter (or classifier) from memory into the vault object `run-<run id>`, records
   metrics and lineage in the run row, and shreds the checkpoint.

Several processes (`--nproc N`, or `--device cuda:0,1`): the job process stays the supervisor and
launches N ranks through torchrun (DDP: NCCL, one process per GPU; gloo on CPU), see
appliance.train.ddp. Every rank runs `_train_lm` on the same pinned data; only rank 0 writes
progress, checkpoints, the adapter and the run row. The process count is part of the job and
a resume keeps it (the data order per step depends on it).

kill -9 or power loss: the job is marked `interrupted`; `airlock jobs resume JOB` (or `airlock train
lm --resume RUN`) continues from the last checkpoint with the same data order, optimizer,
schedule and RNG state, so it ends where an uninterrupted run would (float noise only).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.base_models import CAUSAL_LM_ARCHITECTURES, IMAGE_CLASSIFIER_ARCHITECTURES, resolve_base_model
from appliance.errors import AirlockError, ModelNotFoundError
from appliance.jobs.runner import JobContext
from appliance.train import runs
from appliance.train.runs import Run

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.jobs.records import Job

JOB_KIND = "train"
PROGRESS_EVERY_S = 1.0
MAX_CURVE_POINTS = 500


def checkpoint_object_id(run_id: str) -> str:
    return f"ckpt-{run_id}"


def recipe_class(kind: str) -> type:
    if kind == "classifier":
        from appliance.train.classifier import ClassifierRecipe

        return ClassifierRecipe
    from appliance.train.recipe import LoraRecipe

    return LoraRecipe


def recipe_dict(recipe: Any) -> dict[str, Any]:
    return recipe.to_dict() if hasattr(recipe, "to_dict") else asdict(recipe)


def check_base_model(name: str, kind: str) -> Any:
    base = resolve_base_model(name)
    if kind == "lm" and base.architecture not in CAUSAL_LM_ARCHITECTURES:
        raise ModelNotFoundError(f"base model {name!r} is a {base.architecture}, not a language model",
                                 hint="`airlock train lm` needs a DeepSeek-family causal LM (`airlock base-models "
                                      "list`); image models train with `airlock train classifier`")
    if kind == "classifier" and base.architecture not in IMAGE_CLASSIFIER_ARCHITECTURES:
        raise ModelNotFoundError(f"base model {name!r} is a {base.architecture}, not an image classifier",
                                 hint=f"choose one of {', '.join(sorted(IMAGE_CLASSIFIER_ARCHITECTURES))} "
                                      "(`airlock base-models list`)")
    if kind == "lm" and not base.has_weights:
        raise ModelNotFoundError(f"base model {name!r} has a config but no weights",
                                 hint="stage the full model from a bundle")
    return base


def auto_device() -> str:
    """cuda:0 when an NVIDIA GPU is visible, else cpu. Decided without importing torch (the CLI stays fast)."""
    return "cuda:0" if visible_gpu_count() else "cpu"


def visible_gpu_count(dev: Path = Path("/dev")) -> int:
    """NVIDIA GPUs this process may use, without importing torch: the /dev/nvidiaN devices, narrowed by
    CUDA_VISIBLE_DEVICES when it is set (a machine without the devices has none, whatever it says)."""
    devices = sum(1 for p in dev.glob("nvidia[0-9]*") if p.name[6:].isdigit())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices == 0 or visible is None:
        return devices
    return 0 if visible.strip() in ("", "-1") else len(visible.split(","))


def plan_processes(kind: str, device: str, nproc: int | None, *, gpus: int | None = None) -> tuple[str, int]:
    """(the job's device, its number of training processes) from `--device` and `--nproc`.

    `auto` means the first N GPUs when there are GPUs, else N CPU processes; `cuda:0,1` means one
    process per GPU named. Refused with one line: fewer than one process, more GPUs than visible,
    a count that disagrees with the GPUs named, several processes for a classifier. `gpus`: how many
    are visible (default: `visible_gpu_count()`).
    """
    if nproc is not None and nproc < 1:
        raise runs.RunError(f"--nproc {nproc}: a run needs at least one training process",
                            hint="--nproc 1 trains in one process; --nproc 2 on two GPUs, or two CPU processes "
                                 "(gloo) with --device cpu")
    if kind != "lm" and (nproc or 1) > 1:
        raise runs.RunError(f"--nproc {nproc}: `airlock train {kind}` trains in one process",
                            hint="leave out --nproc; several processes (torchrun) are for `airlock train lm`")
    count = nproc or 1
    gpus = visible_gpu_count() if gpus is None else gpus
    if device == "auto":
        device = "cpu" if gpus == 0 else "cuda:" + ",".join(str(i) for i in range(count))
    if device == "cpu":
        cores = os.cpu_count() or 1
        if count > cores:
            raise runs.RunError(f"--nproc {count} on CPU: this machine has {cores} core(s)",
                                hint=f"use --nproc {cores} or fewer")
        return device, count
    indices = device[5:].split(",")
    if len(set(indices)) != len(indices):
        raise runs.RunError(f"--device {device} names a GPU twice", hint="name each GPU once, e.g. --device cuda:0,1")
    if nproc is not None and nproc != len(indices):
        named = f"names {len(indices)} GPUs" if len(indices) > 1 else "names one GPU"
        raise runs.RunError(f"--nproc {nproc} with --device {device}: training runs one process per GPU and "
                            f"--device {named}",
                            hint="name every GPU, e.g. --device cuda:" + ",".join(str(i) for i in range(nproc))
                                 + " (and --nproc may be left out)")
    if gpus == 0:
        on_cpu = "--device cpu" + (f" --nproc {len(indices)}" if len(indices) > 1 else "")
        raise runs.RunError(f"--device {device}: no NVIDIA GPU is visible on this machine",
                            hint=f"train on CPU with {on_cpu}, or check the driver with `nvidia-smi`")
    missing = [i for i in indices if int(i) >= gpus]
    if missing:
        raise runs.RunError(f"--device {device}: {len(indices)} GPU(s) asked for, {gpus} visible (cuda:0 to "
                            f"cuda:{gpus - 1}); cuda:{missing[0]} is not there",
                            hint=f"name GPUs below {gpus}, e.g. --device cuda:"
                                 + ",".join(str(i) for i in range(min(len(indices), gpus))))
    return device, len(indices)


def start_training(db: sqlite_utils.Database, kind: str, base_name: str, dataset_name: str, recipe: Any, *,
                   device: str = "auto", actor: str | None = None, task: str | None = None,
                   nproc: int | None = None, nodes: Any = None) -> tuple[Run, Job]:
    """Validate, pin the dataset's latest version, write the job and run rows, launch the job process.

    `task`: when the run succeeds it is registered as a candidate version of that task (appliance.registry).
    `nproc`: training processes (torchrun); None means one, or one per GPU that `device` names.
    `nodes`: this machine's place among several training the run together (train/nodes.py); None: one machine.
    """
    from appliance.catalog import transaction
    from appliance.jobs import records
    from appliance.jobs.runner import launch
    from appliance.train.fingerprints import recipe_hash
    from appliance.train.inputs import pin_dataset

    if kind not in runs.KINDS:
        raise runs.RunError(f"unknown training kind {kind!r}", hint="use lm or classifier")
    device, nproc = plan_processes(kind, device, nproc)
    check_base_model(base_name, kind)
    pinned = pin_dataset(db, dataset_name, kind)
    if task is not None:  # refuse a task the run could not join now, not after training
        from appliance.registry.versions import check_run_fits_task

        check_run_fits_task(db, task, kind, pinned.dataset.id)
    values = recipe_dict(recipe)
    run_id = runs.new_run_id(kind)
    with transaction(db):  # both rows or neither: a job without its run could never start
        job = records.create_job(db, JOB_KIND, {"run": run_id, "kind": kind, "base": base_name,
                                                "dataset": dataset_name, "dataset_version": pinned.version,
                                                "nproc": nproc,
                                                **({"nodes": nodes.to_params()} if nodes and nodes.several else {})},
                                 device=device, actor=actor)
        runs.insert_run(db, Run(run_id, kind, task, job.id, base_name, None, pinned.dataset.id, pinned.dataset.name,
                                pinned.version, pinned.content_hash, values, recipe_hash(values), "queued", {}, {},
                                None, None, runs.now(), None, None, job.actor))
    launch(job)  # only now: the job process reads the run row first thing
    return runs.get_run(db, run_id), job


# --- the job process -----------------------------------------------------------------------------------------------

def run_training(ctx: JobContext) -> dict[str, Any]:
    """Handler of job kind `train` (registered in appliance.jobs.runner.HANDLERS)."""
    from appliance.jobs.runner import JobInterrupted

    run = runs.run_for_job(ctx.db, ctx.job.id)
    _select_device(ctx.job.device)
    nproc = int(ctx.job.params.get("nproc", 1))
    try:
        if nproc > 1 or ctx.job.params.get("nodes"):
            from appliance.train.ddp import supervise_ranks

            return supervise_ranks(ctx, run, nproc)
        return _train_lm(ctx, run) if run.kind == "lm" else _train_classifier(ctx, run)
    except JobInterrupted as exc:
        with contextlib.suppress(Exception):
            runs.finish_run(ctx.db, run.id, "interrupted", error=exc.message)
        raise
    except Exception as exc:
        message = exc.message if isinstance(exc, AirlockError) else f"internal error ({type(exc).__name__})"
        with contextlib.suppress(Exception):
            runs.finish_run(ctx.db, run.id, "failed", error=message)
        raise


def _select_device(device: str) -> None:
    # Before torch is imported in this process (and its ranks): a CPU job must not grab a GPU, a GPU
    # job sees only its own (`cuda:0,1` -> "0,1": rank r then uses cuda:r).
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]


def _prepare(ctx: JobContext, run: Run, *, lead: bool = True):
    """Keys, base model, pinned data; the base model's hash (checked against an earlier attempt's).

    Ranks other than 0 (`lead=False`) read the same keys and data but leave the catalog's upkeep
    and the base model's hash (None for them) to rank 0."""
    from appliance.train.fingerprints import base_model_hash
    from appliance.train.inputs import check_pinned
    from appliance.train.token_cache import shred_caches_of_deleted_datasets
    from appliance.vault.lifecycle import keys_for

    keys = keys_for(ctx.db, ctx.home)
    base = check_base_model(run.base_model, run.kind)
    pinned = check_pinned(ctx.db, run.dataset_id, run.dataset_name, run.dataset_version, run.dataset_hash)
    if not lead:
        return keys, base, pinned, None
    for object_id in shred_caches_of_deleted_datasets(ctx.db, ctx.home):
        ctx.log(f"shredded {object_id}: a token cache of a deleted dataset")
    ctx.progress("hashing the base model")
    base_hash = base_model_hash(base.path)
    if run.base_hash and run.base_hash != base_hash:
        raise runs.RunError(f"base model {run.base_model} changed since run {run.id} started (its files differ)",
                            hint="a resumed run must continue on the same weights: restore that model, or start a "
                                 "new run")
    return keys, base, pinned, base_hash


class _ProgressReporter:
    """Training progress into job events: every evaluation, the last step, else at most once a second."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self._last = 0.0

    def __call__(self, step: int, total_steps: int, val: dict[str, Any], **data: Any) -> None:
        due = bool(val) or step == total_steps or step == 1 or time.monotonic() - self._last >= PROGRESS_EVERY_S
        if not due:
            return
        self._last = time.monotonic()
        peak, where = peak_memory_mb()
        self.ctx.progress("training", **runs.finite({"step": step, "total_steps": total_steps, **data, **val,
                                                     "peak_memory_mb": round(peak, 1), "memory": where}))


def peak_memory_mb() -> tuple[float, str]:
    """Peak GPU memory allocated by torch, or this process's peak resident memory on CPU."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "gpu"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process rss"


def curve_saver(ctx: JobContext, keys: Any, run_id: str) -> Any:
    """`on_checkpoint` for the training loops: the curves so far, encrypted into `curves-<run id>`."""
    from appliance.train.curves import save_curves

    return lambda curves: save_curves(ctx.db, keys, ctx.home, run_id, curves)


def _curve(points: list[tuple[int, float]]) -> list[list[float]]:
    """At most MAX_CURVE_POINTS (step, value) pairs, evenly thinned, always keeping the last one."""
    stride = max(1, -(-len(points) // MAX_CURVE_POINTS))
    kept = points[::stride]
    if points and kept[-1] != points[-1]:
        kept.append(points[-1])
    return [[int(s), float(v)] for s, v in kept]


def _train_lm(ctx: JobContext, run: Run, *, rank: int | None = None) -> dict[str, Any]:
    """One process, or one rank of a torchrun job (`rank` given): every rank trains on the same data;
    rank 0 alone writes the run row, the artifact and the registration. A rank's result carries
    its adapter's checksum, for the supervisor to check that the ranks agree."""
    from appliance.train.artifacts import ADAPTER, EVAL_SAMPLES, save_artifact, tensors_to_bytes
    from appliance.train.checkpoints import VaultCheckpoints
    from appliance.train.fingerprints import tokenizer_hash
    from appliance.train.inputs import text_splits
    from appliance.train.lm import Progress, train_lora
    from appliance.train.recipe import recipe_from_dict
    from appliance.train.token_cache import VaultTokenCache, cache_object_id

    lead = not rank
    keys, base, pinned, base_hash = _prepare(ctx, run, lead=lead)
    recipe = recipe_from_dict(run.recipe, f"run {run.id} recipe")
    ctx.progress("decrypting the dataset")
    data = text_splits(ctx.db, keys, ctx.home, pinned)
    tok_hash = tokenizer_hash(base.path)
    counts = {split: len(records) for split, records in data.items()}
    cache = VaultTokenCache(ctx.db, keys, ctx.home, cache_object_id(pinned.dataset.id, pinned.version_hashes,
                                                                   tok_hash, recipe.max_length), store_misses=lead)
    checkpoints: Any = VaultCheckpoints(ctx.db, keys, ctx.home, checkpoint_object_id(run.id))
    if rank is not None:  # under torchrun: every rank, on every machine, trains on the same inputs (a collective)
        from appliance.train.nodes import BroadcastCheckpoints, Nodes, check_same_inputs, signature

        nodes = Nodes.from_params(ctx.job.params.get("nodes"))
        check_same_inputs(signature(run, tok_hash, int(ctx.job.params.get("nproc", 1))), nodes.rank)
        if nodes.several:  # node 0's vault holds the checkpoints; the other machines' never do
            checkpoints = BroadcastCheckpoints(checkpoints, rank)
    if not lead:  # reads the same data and checkpoint; train_lora keeps its hands off the catalog
        result = train_lora(base, data["train"], data["val"], recipe, checkpoints=checkpoints,
                            should_stop=ctx.should_stop, encode=cache)
        return {"rank": rank, "steps": result.steps, "total_steps": result.total_steps,
                "stopped_early": result.stopped_early, "adapter_checksum": adapter_checksum(result.adapter_state)}
    run = runs.mark_running(ctx.db, run, base_hash=base_hash, lineage={
        "dataset_versions": [[i + 1, h] for i, h in enumerate(pinned.version_hashes)], "records": counts,
        "tokenizer_hash": tok_hash, "device": ctx.job.device})
    ctx.log(f"run {run.id}: {counts['train']} train, {counts['val']} val, {counts['test']} test records of "
            f"{run.dataset_name} v{run.dataset_version}")
    for split, metric in (("val", "val loss not measured, no early stopping"), ("test", "test loss not measured")):
        if not counts[split]:
            ctx.log(f"no {split} records in this dataset: {metric}; hint: import more records (a small dataset "
                    "may not give every split)")
    report = _ProgressReporter(ctx)

    def on_progress(p: Progress) -> None:
        report(p.step, p.total_steps, {"val_loss": p.val_loss} if p.val_loss is not None else {},
               loss=round(p.loss, 6), lr=p.lr, tokens_per_s=round(p.tokens_per_s, 1), eta_s=round(p.eta_s, 1),
               grad_norm=p.grad_norm)

    store_curves = curve_saver(ctx, keys, run.id)
    result = train_lora(base, data["train"], data["val"], recipe, test_records=data["test"], checkpoints=checkpoints,
                        on_progress=on_progress, should_stop=ctx.should_stop, encode=cache,
                        on_checkpoint=store_curves)
    store_curves(result.curves)  # with the test metrics; a paused run's match its checkpoint
    ranked = {} if rank is None else {"rank": rank, "adapter_checksum": adapter_checksum(result.adapter_state)}
    ctx.log(f"tokenized data: {len(cache.hits)} split(s) from the encrypted cache, {len(cache.misses)} encoded")
    peak, where = peak_memory_mb()
    metrics: dict[str, Any] = {
        "steps": result.steps, "total_steps": result.total_steps, "stopped_early": result.stopped_early,
        "initial_val_loss": result.initial_val_loss,
        "val_loss": result.val_losses[-1][1] if result.val_losses else None,
        "best_val_loss": result.best_val_loss, "val_losses": _curve(result.val_losses),
        "train_loss": result.train_losses[-1] if result.train_losses else None,
        "train_losses": _curve([(i + 1, v) for i, v in enumerate(result.train_losses)]),
        "truncated_examples": result.truncated_examples, "records": counts,
        "peak_memory_mb": round(peak, 1), "memory": where,
        "planned_memory_mb": round(result.memory_plan["total"] / 2**20, 1) if result.memory_plan else None,
        "test": result.test.metrics() if result.test is not None else None}
    if result.steps < result.total_steps and not result.stopped_early:
        # A rank 0 whose supervising job process died (kill -9) leaves the run `running`: the catalog's
        # next look marks job and run `interrupted` together.
        if not getattr(ctx, "supervisor_gone", False):
            runs.finish_run(ctx.db, run.id, "cancelled", metrics=metrics)
        return {"run": run.id, "steps": result.steps, "total_steps": result.total_steps, "checkpointed": True,
                **ranked}
    files = {ADAPTER: tensors_to_bytes(result.adapter_state, {"run": run.id, "base_model": run.base_model,
                                                              "base_hash": base_hash, "recipe_hash": run.recipe_hash})}
    if result.test is not None and result.test.samples:
        files[EVAL_SAMPLES] = json.dumps(result.test.samples, ensure_ascii=False).encode("utf-8")
    artifact = save_artifact(ctx.db, keys, ctx.home, run.id, files)
    run = runs.finish_run(ctx.db, run.id, "succeeded", metrics=metrics, artifact=artifact)
    _shred_checkpoint(ctx, run.id)
    return {"run": run.id, "artifact": artifact, "steps": result.steps, **_register(ctx, keys, run),
            **{k: run.metrics.get(k) for k in ("initial_val_loss", "val_loss", "best_val_loss")}, **ranked}


def adapter_checksum(adapter_state: dict[str, Any]) -> float:
    """Sum of every adapter weight (float64): equal on ranks that hold the same adapter."""
    return sum(float(v.double().sum()) for v in adapter_state.values())


def _train_classifier(ctx: JobContext, run: Run) -> dict[str, Any]:
    from appliance.registry.versions import find_task
    from appliance.train.artifacts import CLASSIFIER, LABELS, save_artifact, tensors_to_bytes
    from appliance.train.checkpoints import VaultCheckpoints
    from appliance.train.classifier import ClassifierRecipe, train_classifier, unmeasured_splits
    from appliance.train.inputs import image_splits
    from appliance.train.operating_point import OperatingPolicy
    from appliance.train.recipe import recipe_from_dict

    keys, base, pinned, base_hash = _prepare(ctx, run)
    recipe = recipe_from_dict(run.recipe, f"run {run.id} recipe", ClassifierRecipe)
    # The test metrics read the scores at the task's operating point (the default one for a new task).
    operating = OperatingPolicy.of_task(find_task(ctx.db, run.task) if run.task else None)
    ctx.progress("decrypting the dataset")
    data = image_splits(ctx.db, keys, ctx.home, pinned)
    counts = {split: int(images.shape[0]) for split, (images, _) in data.splits.items()}
    run = runs.mark_running(ctx.db, run, base_hash=base_hash, lineage={
        "dataset_versions": [[i + 1, h] for i, h in enumerate(pinned.version_hashes)], "records": counts,
        "labels": data.labels, "skipped_unlabeled": data.skipped, "device": ctx.job.device})
    ctx.log(f"run {run.id}: {counts['train']} train, {counts['val']} val, {counts['test']} test images, "
            f"{len(data.labels)} classes, {data.skipped} without a usable label left out")
    for line in unmeasured_splits(data.splits, len(data.labels)):
        ctx.log(line)
    report = _ProgressReporter(ctx)
    started, first_step = time.monotonic(), [None]

    def on_progress(p: dict[str, Any]) -> None:
        if first_step[0] is None:
            first_step[0] = p["step"] - 1
        done = p["step"] - first_step[0]
        eta = (time.monotonic() - started) / done * (p["total_steps"] - p["step"]) if done else 0.0
        report(p["step"], p["total_steps"], {"val_auc": p["val_auc"]} if p.get("val_auc") is not None else {},
               loss=round(p["loss"], 6), eta_s=round(eta, 1))

    test = data.splits["test"] if counts["test"] else None
    store_curves = curve_saver(ctx, keys, run.id)
    result = train_classifier(base, data.splits["train"], data.splits["val"], recipe, labels=data.labels, test=test,
                              checkpoints=VaultCheckpoints(ctx.db, keys, ctx.home, checkpoint_object_id(run.id)),
                              on_progress=on_progress, should_stop=ctx.should_stop, operating=operating,
                              on_checkpoint=store_curves)
    store_curves(result.curves)
    peak, where = peak_memory_mb()
    metrics: dict[str, Any] = {
        "steps": result.steps, "total_steps": recipe.max_steps, "stopped_early": result.stopped_early,
        "val_auc": result.val_aucs[-1][1] if result.val_aucs else None, "best_val_auc": result.best_val_auc,
        "val_aucs": _curve(result.val_aucs), "train_loss": result.train_losses[-1] if result.train_losses else None,
        "train_losses": _curve([(i + 1, v) for i, v in enumerate(result.train_losses)]), "records": counts,
        "labels": data.labels, "peak_memory_mb": round(peak, 1), "memory": where,
        "test": result.test.to_dict() if result.test is not None else None}
    if result.steps < recipe.max_steps and not result.stopped_early:
        runs.finish_run(ctx.db, run.id, "cancelled", metrics=metrics)
        return {"run": run.id, "steps": result.steps, "total_steps": recipe.max_steps, "checkpointed": True}
    labels_json = json.dumps({"labels": data.labels, "base_model": run.base_model}).encode("utf-8")
    files = {CLASSIFIER: tensors_to_bytes(result.state_dict, {"run": run.id, "base_model": run.base_model,
                                                              "base_hash": base_hash}), LABELS: labels_json}
    artifact = save_artifact(ctx.db, keys, ctx.home, run.id, files)
    run = runs.finish_run(ctx.db, run.id, "succeeded", metrics=metrics, artifact=artifact)
    _shred_checkpoint(ctx, run.id)
    return {"run": run.id, "artifact": artifact, "steps": result.steps, **_register(ctx, keys, run),
            **{k: run.metrics.get(k) for k in ("val_auc", "best_val_auc")}}


def _register(ctx: JobContext, keys: Any, run: Run) -> dict[str, Any]:
    """A run started with a task becomes a candidate version of it ({} without a task).

    The run has succeeded by now: a registration that fails leaves it succeeded, says why, and can
    be repeated with `airlock models register RUN --task TASK`."""
    if not run.task:
        return {}
    from appliance.registry.versions import register_run

    try:
        version = register_run(ctx.db, keys, ctx.home, run, run.task, actor=run.actor)
    except AirlockError as exc:
        ctx.log(f"not registered as a version of {run.task}: {exc.message}")
        return {"registration_error": exc.message}
    ctx.log(f"registered as {version.id} (candidate)")
    return {"version": version.id}


def _shred_checkpoint(ctx: JobContext, run_id: str) -> None:
    """The finished weights are in the artifact; the checkpoint (weights + optimizer) is one copy too many."""
    from appliance.vault.errors import ObjectError
    from appliance.vault.store import delete_object

    with contextlib.suppress(ObjectError):
        delete_object(ctx.db, ctx.home, checkpoint_object_id(run_id))
