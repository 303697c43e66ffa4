"""Job kind `retrain`: incremental retraining of a task's production model, gated, then registered.

    airlock retrain maint-qa --replay 0.2 --wait          # continue from production on new data + 20% replay

`start_retrain` (the command, or `airlock schedule run-due`) pins the dataset's latest version,
derives the recipe from the production version's run (same LoRA structure; `--lr`, `--max-steps`
override; a fixed step count is scaled to the size of the new mix, so cost follows new data +
replay, not the whole dataset), writes the job and its run row, and launches the job. The job,
`run_retrain`, top to bottom:

1. keys from the key agent, base model hash (must equal production's when continuing from it),
   the pinned dataset version unchanged;
2. decrypts the records into memory and selects new + seeded replay (appliance.registry.gates);
3. loads the production adapter (its SHA-256 checked against the registry) and continues
   training from it (`--from fresh`: a new adapter), with vault checkpoints as `train` has;
4. stores the adapter encrypted (`run-<run id>`), measures production and candidate on every
   earlier frozen test split and on the new test split, decides the gates;
5. registers the version: `candidate` when the gates pass (then promoted at once when auto-promote
   is on and the job's account may promote), `rejected` with its reasons otherwise. Production is
   untouched unless promoted here.

EWC (elastic weight consolidation) is not implemented: replay and the forgetting gate carry the load.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from typing import TYPE_CHECKING, Any

import appliance
from appliance.catalog import transaction
from appliance.errors import AirlockError
from appliance.jobs.runner import JobContext
from appliance.registry import gates
from appliance.registry.versions import (
    ModelVersion,
    RegistryError,
    artifact_entry,
    dataset_versions_of,
    get_task,
    get_version,
    insert_version,
    next_number,
    production,
    run_metrics,
    version_id,
)
from appliance.train import runs

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.access import Session
    from appliance.jobs.records import Job

JOB_KIND = "retrain"
INITS = ("production", "fresh")
MAX_REPLAY = 0.9


def learned_version(version: ModelVersion, dataset_id: str) -> int:
    """The last version of `dataset_id` that `version` was trained on (0 if none)."""
    return max((d["version"] for d in version.dataset_versions if d["dataset_id"] == dataset_id), default=0)


def new_record_counts(db: sqlite_utils.Database, dataset_id: str, since: int) -> dict[str, int]:
    """Records imported after dataset version `since`, per split, and the earlier train records (catalog only)."""
    counts = {"train": 0, "val": 0, "test": 0, "earlier_train": 0}
    for split, newer, count in db.execute(
            "SELECT split, version > ?, COUNT(*) FROM dataset_records WHERE dataset_id = ? GROUP BY 1, 2",
            [since, dataset_id]):
        if newer:
            counts[split] += count
        elif split == "train":
            counts["earlier_train"] = count
    return counts


def start_retrain(db: sqlite_utils.Database, task_name: str, *, session: Session, init: str = "production",
                  replay: float = 0.2, lr: float | None = None, max_steps: int | None = None, auto: bool = False,
                  device: str = "auto", seed: int | None = None) -> tuple[runs.Run, Job]:
    """Validate and launch a retrain of `task_name`'s production version. The caller checked `train.start`."""
    from appliance.jobs import records
    from appliance.jobs.runner import launch
    from appliance.train.fingerprints import recipe_hash
    from appliance.train.inputs import pin_dataset
    from appliance.train.jobs import auto_device, check_base_model
    from appliance.train.recipe import recipe_from_dict

    task = get_task(db, task_name)
    if task.kind != "lm":
        raise RegistryError(f"task {task.name!r} holds image classifiers; incremental retraining covers language "
                            "models for now", hint=f"train a new classifier (`airlock train classifier ... --task "
                                                   f"{task.name}`), read its card, and promote it")
    if init not in INITS:
        raise RegistryError(f"--from {init!r} is not production or fresh", hint="use --from production (continue) "
                                                                                "or --from fresh")
    if not 0 <= replay <= MAX_REPLAY:
        raise RegistryError(f"--replay {replay} is outside 0..{MAX_REPLAY}",
                            hint="the share of earlier records in the training mix, e.g. 0.2")
    parent = production(db, task.name)
    if parent is None:
        raise RegistryError(f"task {task.name!r} has no production version to retrain",
                            hint=f"promote one first: `airlock models promote ID` (`airlock models list --task "
                                 f"{task.name}`)")
    parent_run = runs.get_run(db, parent.run_id)
    pinned = pin_dataset(db, parent_run.dataset_name, "lm")
    if pinned.dataset.id != task.dataset_id:
        raise RegistryError(f"dataset {parent_run.dataset_name!r} of task {task.name} was deleted and created again",
                            hint="its earlier data is gone; train a new model on it and register it under a new task")
    since = learned_version(parent, task.dataset_id)
    if pinned.version <= since:
        raise RegistryError(f"no new data for task {task.name}: {parent.id} already learned {pinned.dataset.name} "
                            f"up to version {since}",
                            hint=f"import new records first: `airlock data import PATH --name {pinned.dataset.name}`")
    counts = new_record_counts(db, task.dataset_id, since)
    if counts["train"] == 0:
        raise RegistryError(f"the {counts['val'] + counts['test']} records imported since version {since} all "
                            "landed in val/test", hint="import more records; retraining needs new train records")
    check_base_model(parent_run.base_model, "lm")
    values = dict(parent_run.recipe)
    if lr is not None:
        values["lr"] = lr
    if max_steps is not None:
        values["max_steps"] = max_steps
    elif values.get("max_steps"):
        # Same steps per training record as the parent run: cost follows the new mix, not the whole dataset.
        mix = counts["train"] + gates.replay_count(counts["train"], counts["earlier_train"], replay)
        learned = (parent_run.metrics.get("records") or {}).get("train") or mix
        values["max_steps"] = max(1, math.ceil(values["max_steps"] * mix / learned))
    recipe_from_dict(values, f"retrain of {task.name}")  # validates (--lr bounds) before anything is written
    auto_promote, note = (auto or task.auto_promote), None
    if auto_promote and not session.allows("models.promote"):
        auto_promote = False
        note = f"{session.account} ({session.role}) may not promote: the result stays a candidate"
    device = auto_device() if device == "auto" else device
    run_id = runs.new_run_id("lm")
    params = {"run": run_id, "task": task.name, "parent": parent.id, "init": init, "replay": replay,
              "replay_seed": parent_run.recipe.get("seed", 0) if seed is None else seed, "since_version": since,
              "auto_promote": auto_promote, "auto_promote_note": note}
    with transaction(db):
        job = records.create_job(db, JOB_KIND, params, device=device, actor=session.actor)
        runs.insert_run(db, runs.Run(run_id, "lm", task.name, job.id, parent_run.base_model, None, pinned.dataset.id,
                                     pinned.dataset.name, pinned.version, pinned.content_hash, values,
                                     recipe_hash(values), "queued", {}, {}, None, None, runs.now(), None, None,
                                     job.actor))
    launch(job)
    return runs.get_run(db, run_id), job


# --- the job process -----------------------------------------------------------------------------------------------

def run_retrain(ctx: JobContext) -> dict[str, Any]:
    """Handler of job kind `retrain` (registered in appliance.jobs.runner.HANDLERS)."""
    from appliance.train.jobs import _select_device  # the train job's own device pinning, before torch loads

    run = runs.run_for_job(ctx.db, ctx.job.id)
    _select_device(ctx.job.device)
    try:
        return _retrain(ctx, run, ctx.job.params)
    except Exception as exc:
        message = exc.message if isinstance(exc, AirlockError) else f"internal error ({type(exc).__name__})"
        with contextlib.suppress(Exception):
            if runs.get_run(ctx.db, run.id).state in ("queued", "running"):  # a registered version keeps its run
                runs.finish_run(ctx.db, run.id, "failed", error=message)
        raise


def _load_adapter(ctx: JobContext, keys: Any, version: ModelVersion) -> dict[str, Any]:
    """The version's adapter, decrypted into memory, after its SHA-256 matched the registry's."""
    from safetensors.torch import load

    from appliance.vault.store import read_bytes

    entry = version.artifacts.get("adapter")
    if not entry:
        raise RegistryError(f"{version.id} has no adapter artifact", hint="retrain --from fresh, or promote a version "
                                                                          "that has one")
    data = read_bytes(ctx.db, keys, ctx.home, entry["object"], entry["file"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise RegistryError(f"the adapter of {version.id} does not match the hash the registry recorded",
                            hint="run `airlock vault verify` and `airlock audit verify`; do not serve it")
    return load(data)


def _decrypt_rows(ctx: JobContext, keys: Any, pinned: Any) -> list[tuple[str, int, str, dict[str, Any]]]:
    from appliance.data.store import iter_records

    rows = []
    for record in iter_records(ctx.db, keys, ctx.home, pinned.dataset, max_version=pinned.version):
        value = record.json()
        value.pop("source_format", None)
        rows.append((record.content_hash, record.version, record.split, value))
    return rows


def _retrain(ctx: JobContext, run: runs.Run, params: dict[str, Any]) -> dict[str, Any]:
    from appliance.train.artifacts import ADAPTER, save_artifact, tensors_to_bytes
    from appliance.train.checkpoints import VaultCheckpoints
    from appliance.train.jobs import _curve, _prepare, _ProgressReporter, _shred_checkpoint, checkpoint_object_id
    from appliance.train.lm import Progress, train_lora
    from appliance.train.recipe import recipe_from_dict

    started = time.monotonic()
    keys, base, pinned, base_hash = _prepare(ctx, run)
    parent = get_version(ctx.db, params["parent"])
    parent_run = runs.get_run(ctx.db, parent.run_id)
    task = get_task(ctx.db, params["task"])
    if params["init"] == "production" and parent.base_hash and parent.base_hash != base_hash:
        raise RegistryError(f"base model {run.base_model} is not the one {parent.id} was trained on",
                            hint="install the exact base model (hash in `airlock models show`), or retrain "
                                 "--from fresh")
    recipe = recipe_from_dict(run.recipe, f"run {run.id} recipe")
    ctx.progress("decrypting the dataset")
    data = gates.select_records(_decrypt_rows(ctx, keys, pinned), dataset=pinned.dataset.name,
                                since=params["since_version"], last=pinned.version, replay=params["replay"],
                                seed=params["replay_seed"])
    parent_adapter = _load_adapter(ctx, keys, parent)
    run = runs.mark_running(ctx.db, run, base_hash=base_hash, lineage={
        "dataset_versions": [[i + 1, h] for i, h in enumerate(pinned.version_hashes)], "records": data.counts,
        "device": ctx.job.device, "retrain": {"parent": parent.id, "init": params["init"], "replay": params["replay"],
                                               "replay_seed": params["replay_seed"],
                                               "since_version": params["since_version"]}})
    ctx.log(f"retrain of {task.name} from {parent.id} ({params['init']}): {data.counts['new_train']} new + "
            f"{data.counts['replay_train']} replayed train records, {len(data.frozen_tests)} earlier test split(s)")
    report = _ProgressReporter(ctx)

    def on_progress(p: Progress) -> None:
        report(p.step, p.total_steps, {"val_loss": p.val_loss} if p.val_loss is not None else {},
               loss=round(p.loss, 6), lr=p.lr, tokens_per_s=round(p.tokens_per_s, 1), eta_s=round(p.eta_s, 1))

    train_started = time.monotonic()
    result = train_lora(base, data.train, data.val, recipe,
                        checkpoints=VaultCheckpoints(ctx.db, keys, ctx.home, checkpoint_object_id(run.id)),
                        on_progress=on_progress, should_stop=ctx.should_stop,
                        init_adapter=parent_adapter if params["init"] == "production" else None)
    train_s = time.monotonic() - train_started
    metrics: dict[str, Any] = {
        "steps": result.steps, "total_steps": result.total_steps, "stopped_early": result.stopped_early,
        "initial_val_loss": result.initial_val_loss,
        "val_loss": result.val_losses[-1][1] if result.val_losses else None, "best_val_loss": result.best_val_loss,
        "val_losses": _curve(result.val_losses),
        "train_loss": result.train_losses[-1] if result.train_losses else None,
        "train_losses": _curve([(i + 1, v) for i, v in enumerate(result.train_losses)]),
        "truncated_examples": result.truncated_examples,
        "records": {"train": len(data.train), "val": len(data.val), **data.counts}}
    if result.steps < result.total_steps and not result.stopped_early:
        runs.finish_run(ctx.db, run.id, "cancelled", metrics=metrics)
        return {"run": run.id, "steps": result.steps, "total_steps": result.total_steps, "checkpointed": True}

    ctx.progress("measuring the gates")
    gates_started = time.monotonic()
    splits = {**data.frozen_tests, data.new_test_name: data.new_test}
    before = gates.evaluate_losses(base, recipe_from_dict(parent_run.recipe, f"run {parent_run.id} recipe"),
                                   parent_adapter, splits)
    after = gates.evaluate_losses(base, recipe, result.adapter_state, splits)
    measured = {name: gates.SplitLoss(name, len(records), before[name], after[name])
                for name, records in splits.items()}
    outcome = gates.decide([measured[n] for n in data.frozen_tests], measured[data.new_test_name],
                           max_forgetting=task.max_forgetting, new_data_tolerance=task.new_data_tolerance,
                           deploys_engines=task.deploys_engines)
    gates_s = time.monotonic() - gates_started
    metrics["test_splits"] = {name: {"loss": after[name], "records": m.records} for name, m in measured.items()}
    metrics["timings_s"] = {"train": round(train_s, 2), "gates": round(gates_s, 2),
                            "total": round(time.monotonic() - started, 2)}

    adapter_bytes = tensors_to_bytes(result.adapter_state, {"run": run.id, "base_model": run.base_model,
                                                            "base_hash": base_hash, "recipe_hash": run.recipe_hash})
    artifact = save_artifact(ctx.db, keys, ctx.home, run.id, {ADAPTER: adapter_bytes})
    state = "candidate" if outcome.passed else "rejected"
    with transaction(ctx.db):  # the run's end and its version, or neither
        run = runs.finish_run(ctx.db, run.id, "succeeded", metrics=metrics, artifact=artifact)
        number = next_number(ctx.db, task.name)
        version = insert_version(ctx.db, ModelVersion(
            version_id(task.name, number), task.name, "lm", number, state, run.id, parent.id, run.base_model,
            base_hash, dataset_versions_of(ctx.db, run), run.recipe_hash, appliance.__version__,
            run_metrics(run), {"adapter": artifact_entry(artifact, ADAPTER, adapter_bytes)}, runs.now(), run.actor,
            outcome.gates, outcome.reasons, runs.now()))
    _shred_checkpoint(ctx, run.id)
    ctx.log(f"{version.id}: gates {'passed' if outcome.passed else 'failed'}"
            + (f" ({'; '.join(outcome.reasons)})" if outcome.reasons else ""))
    promoted, note = _maybe_promote(ctx, version, parent, params)
    return {"run": run.id, "version": version.id, "state": get_version(ctx.db, version.id).state,
            "gates_passed": outcome.passed, "reasons": outcome.reasons, "promoted": promoted, "note": note,
            "parent": parent.id, "timings_s": metrics["timings_s"]}


def _maybe_promote(ctx: JobContext, version: ModelVersion, parent: ModelVersion, params: dict[str, Any]
                   ) -> tuple[bool, str | None]:
    from appliance.registry.promotion import promote

    if version.state != "candidate":
        return False, f"production stays {parent.id}"
    if not params.get("auto_promote"):
        return False, params.get("auto_promote_note") or "auto-promote is off: a person promotes it after review"
    try:
        promote(ctx.db, version.id, actor=ctx.job.actor, expect_production=parent.id,
                reason=f"gates passed (auto-promote; retrain job {ctx.job.id})")
    except RegistryError as exc:
        ctx.log(f"not promoted: {exc.message}")
        return False, exc.message
    ctx.log(f"{version.id} promoted to production, replacing {parent.id}")
    return True, None
