"""Job kind `retrain`: incremental retraining of a task's production model, gated, then registered.

    airlock retrain maint-qa --replay 0.2 --wait          # continue from production on new data + 20% replay
    airlock retrain chest-xray --ewc-lambda 1e5 --wait    # an image classifier, with an EWC penalty

`start_retrain` (the command, or `airlock schedule run-due`) pins the dataset's latest version,
derives the recipe from the production version's run (same LoRA structure; `--lr`, `--max-steps`
override; a fixed step count is scaled to the size of the new mix, so cost follows new data +
replay, not the whole dataset), writes the job and its run row, and launches the job. The job,
`run_retrain`, top to bottom:

1. keys from the key agent, base model hash (must equal production's when continuing from it),
   the pinned dataset version unchanged;
2. decrypts the records into memory and selects new + seeded replay (appliance.registry.gates);
3. loads the production adapter or classifier (its SHA-256 checked against the registry) and
   continues training from it (`--from fresh`: new weights), with vault checkpoints as `train`
   has, and with an EWC penalty when the task's or the command's `ewc_lambda` is above 0
   (Fisher measured on a seeded sample of earlier train records; appliance.train.ewc);
4. stores the weights encrypted (`run-<run id>`), measures production and candidate on every
   earlier frozen test split and on the new test split (LMs: test loss; classifiers: ROC AUC and
   accuracy), decides gates 1 and 2; for a task that deploys engines whose candidate passed them,
   runs the optimize stage on it for gate 3 (appliance.registry.engine_gate);
5. registers the version: `candidate` when the gates pass (then promoted at once when auto-promote
   is on and the job's account may promote), `rejected` with its reasons otherwise; the exports
   (and engine) that gate 3 stored are recorded on it. Production is untouched unless promoted here.

Image classifiers keep production's classes: new data that brings a new class is refused before
the job starts (a new class is a new model: `airlock train classifier ... --task`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from typing import TYPE_CHECKING, Any

import appliance
from appliance.catalog import transaction
from appliance.errors import AirlockError
from appliance.jobs.runner import JobContext
from appliance.registry import engine_gate, gates
from appliance.registry.versions import (
    MAX_EWC_LAMBDA,
    ModelVersion,
    RegistryError,
    add_artifact,
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
EWC_RECORDS = 64
"""Earlier train records (a seeded sample) on which the EWC Fisher is measured."""


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


def new_classes(db: sqlite_utils.Database, dataset_id: str, since: int, known: list[str]) -> list[str]:
    """Labels of train records imported after version `since` that the production classifier does not know."""
    rows = db.execute("SELECT DISTINCT label FROM dataset_records WHERE dataset_id = ? AND version > ? AND split = "
                      "'train' AND label IS NOT NULL AND label != ''", [dataset_id, since])
    return sorted({r[0] for r in rows} - set(known))


def start_retrain(db: sqlite_utils.Database, task_name: str, *, session: Session, init: str = "production",
                  replay: float = 0.2, lr: float | None = None, max_steps: int | None = None, auto: bool = False,
                  device: str = "auto", seed: int | None = None, ewc_lambda: float | None = None
                  ) -> tuple[runs.Run, Job]:
    """Validate and launch a retrain of `task_name`'s production version. The caller checked `train.start`.

    `ewc_lambda`: EWC strength for this retrain (None: the task's policy, `airlock models policy --ewc-lambda`).
    """
    from appliance.jobs import records
    from appliance.jobs.runner import launch
    from appliance.train.fingerprints import recipe_hash
    from appliance.train.inputs import pin_dataset
    from appliance.train.jobs import auto_device, check_base_model, recipe_class
    from appliance.train.recipe import recipe_from_dict

    task = get_task(db, task_name)
    if init not in INITS:
        raise RegistryError(f"--from {init!r} is not production or fresh", hint="use --from production (continue) "
                                                                                "or --from fresh")
    if not 0 <= replay <= MAX_REPLAY:
        raise RegistryError(f"--replay {replay} is outside 0..{MAX_REPLAY}",
                            hint="the share of earlier records in the training mix, e.g. 0.2")
    ewc = task.ewc_lambda if ewc_lambda is None else ewc_lambda
    if not 0 <= ewc <= MAX_EWC_LAMBDA:
        raise RegistryError(f"--ewc-lambda {ewc} is outside 0..{MAX_EWC_LAMBDA:g}", hint="0 turns EWC off")
    if ewc and init == "fresh":
        raise RegistryError("EWC keeps a retrain close to the production weights; --from fresh does not start there",
                            hint="use --from production with EWC, or --ewc-lambda 0 with --from fresh")
    parent = production(db, task.name)
    if parent is None:
        raise RegistryError(f"task {task.name!r} has no production version to retrain",
                            hint=f"promote one first: `airlock models promote ID` (`airlock models list --task "
                                 f"{task.name}`)")
    parent_run = runs.get_run(db, parent.run_id)
    pinned = pin_dataset(db, parent_run.dataset_name, task.kind)
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
    if task.kind == "classifier":
        unknown = new_classes(db, task.dataset_id, since, parent_run.metrics.get("labels") or [])
        if unknown:
            raise RegistryError(f"the new images of {pinned.dataset.name} bring class(es) {', '.join(unknown)} that "
                                f"{parent.id} does not know; a retrain keeps production's classes",
                                hint=f"train a new classifier on all classes (`airlock train classifier --data "
                                     f"{pinned.dataset.name} --task {task.name} ...`) and promote it after review")
    check_base_model(parent_run.base_model, task.kind)
    values = dict(parent_run.recipe)
    values["ewc_lambda"] = ewc
    if lr is not None:
        values["lr"] = lr
    if max_steps is not None:
        values["max_steps"] = max_steps
    elif values.get("max_steps"):
        # Same steps per training record as the parent run: cost follows the new mix, not the whole dataset.
        mix = counts["train"] + gates.replay_count(counts["train"], counts["earlier_train"], replay)
        learned = (parent_run.metrics.get("records") or {}).get("train") or mix
        values["max_steps"] = max(1, math.ceil(values["max_steps"] * mix / learned))
    recipe_from_dict(values, f"retrain of {task.name}", recipe_class(task.kind))  # --lr bounds, before any write
    auto_promote, note = (auto or task.auto_promote), None
    if auto_promote and not session.allows("models.promote"):
        auto_promote = False
        note = f"{session.account} ({session.role}) may not promote: the result stays a candidate"
    device = auto_device() if device == "auto" else device
    run_id = runs.new_run_id(task.kind)
    params = {"run": run_id, "task": task.name, "parent": parent.id, "init": init, "replay": replay,
              "replay_seed": parent_run.recipe.get("seed", 0) if seed is None else seed, "since_version": since,
              "auto_promote": auto_promote, "auto_promote_note": note}
    with transaction(db):
        job = records.create_job(db, JOB_KIND, params, device=device, actor=session.actor)
        runs.insert_run(db, runs.Run(run_id, task.kind, task.name, job.id, parent_run.base_model, None,
                                     pinned.dataset.id, pinned.dataset.name, pinned.version, pinned.content_hash,
                                     values, recipe_hash(values), "queued", {}, {}, None, None, runs.now(), None, None,
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
        if run.kind == "classifier":
            from appliance.registry.retrain_classifier import retrain_classifier

            return retrain_classifier(ctx, run, ctx.job.params)
        return _retrain(ctx, run, ctx.job.params)
    except Exception as exc:
        message = exc.message if isinstance(exc, AirlockError) else f"internal error ({type(exc).__name__})"
        with contextlib.suppress(Exception):
            if runs.get_run(ctx.db, run.id).state in ("queued", "running"):  # a registered version keeps its run
                runs.finish_run(ctx.db, run.id, "failed", error=message)
        raise


def load_weights(ctx: JobContext, keys: Any, version: ModelVersion, name: str = "adapter") -> dict[str, Any]:
    """The version's adapter (or classifier) weights, decrypted into memory, once their SHA-256 matches the registry."""
    from safetensors.torch import load

    from appliance.vault.store import read_bytes

    entry = version.artifacts.get(name)
    if not entry:
        raise RegistryError(f"{version.id} has no {name} artifact", hint="retrain --from fresh, or promote a version "
                                                                         "that has one")
    data = read_bytes(ctx.db, keys, ctx.home, entry["object"], entry["file"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise RegistryError(f"the {name} of {version.id} does not match the hash the registry recorded",
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
    from appliance.train.artifacts import ADAPTER, tensors_to_bytes
    from appliance.train.checkpoints import VaultCheckpoints
    from appliance.train.jobs import _curve, _prepare, _ProgressReporter, checkpoint_object_id, curve_saver
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
                                seed=params["replay_seed"], ewc_count=EWC_RECORDS if recipe.ewc_lambda else 0)
    parent_adapter = load_weights(ctx, keys, parent)
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
    store_curves = curve_saver(ctx, keys, run.id)
    result = train_lora(base, data.train, data.val, recipe,
                        checkpoints=VaultCheckpoints(ctx.db, keys, ctx.home, checkpoint_object_id(run.id)),
                        on_progress=on_progress, should_stop=ctx.should_stop,
                        init_adapter=parent_adapter if params["init"] == "production" else None,
                        ewc_records=data.ewc, on_checkpoint=store_curves)
    store_curves(result.curves)
    train_s = time.monotonic() - train_started
    metrics: dict[str, Any] = {
        "steps": result.steps, "total_steps": result.total_steps, "stopped_early": result.stopped_early,
        "initial_val_loss": result.initial_val_loss,
        "val_loss": result.val_losses[-1][1] if result.val_losses else None, "best_val_loss": result.best_val_loss,
        "val_losses": _curve(result.val_losses),
        "train_loss": result.train_losses[-1] if result.train_losses else None,
        "train_losses": _curve([(i + 1, v) for i, v in enumerate(result.train_losses)]),
        "truncated_examples": result.truncated_examples, "ewc": result.ewc,
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
    metrics["timings_s"] = {"train": round(train_s, 2), "gates": round(gates_s, 2)}
    adapter_bytes = tensors_to_bytes(result.adapter_state, {"run": run.id, "base_model": run.base_model,
                                                            "base_hash": base_hash, "recipe_hash": run.recipe_hash})
    return conclude(ctx, keys, run, task, parent, params, outcome, metrics, {ADAPTER: adapter_bytes},
                    ("adapter", ADAPTER), started)


def conclude(ctx: JobContext, keys: Any, run: runs.Run, task: Any, parent: ModelVersion, params: dict[str, Any],
             outcome: gates.GateOutcome, metrics: dict[str, Any], files: dict[str, bytes], primary: tuple[str, str],
             started: float) -> dict[str, Any]:
    """Store the weights, measure engine parity (gate 3) if due, register the version, maybe promote it."""
    from appliance.train.artifacts import save_artifact
    from appliance.train.jobs import _shred_checkpoint

    artifact = save_artifact(ctx.db, keys, ctx.home, run.id, files)
    derived: dict[str, dict[str, Any]] = {}
    if task.deploys_engines and outcome.passed:
        engine_started = time.monotonic()
        # The optimize stage reads the weights just stored; the run row stays `running` until the version exists.
        finished = dataclasses.replace(run, state="succeeded", artifact=artifact, metrics=metrics)
        gate, derived = engine_gate.measure(ctx, keys, finished, task)
        outcome = gates.with_engine_gate(outcome, gate, engine_gate.reasons_of(gate))
        metrics["timings_s"]["engine_parity"] = round(time.monotonic() - engine_started, 2)
        ctx.log(f"engine parity: {gate['status']}" + (f" ({'; '.join(gate['failures'])})" if gate.get("failures")
                                                      else ""))
    elif task.deploys_engines:
        outcome = gates.with_engine_gate(outcome, engine_gate.not_measured(
            task, "not measured: gates 1-2 already rejected this version"), [])
    metrics["timings_s"]["total"] = round(time.monotonic() - started, 2)
    state = "candidate" if outcome.passed else "rejected"
    with transaction(ctx.db):  # the run's end and its version, or neither
        run = runs.finish_run(ctx.db, run.id, "succeeded", metrics=metrics, artifact=artifact)
        number = next_number(ctx.db, task.name)
        version = insert_version(ctx.db, ModelVersion(
            version_id(task.name, number), task.name, run.kind, number, state, run.id, parent.id, run.base_model,
            run.base_hash, dataset_versions_of(ctx.db, run), run.recipe_hash, appliance.__version__,
            run_metrics(run), {primary[0]: artifact_entry(artifact, primary[1], files[primary[1]])}, runs.now(),
            run.actor, outcome.gates, outcome.reasons, runs.now()))
    for name, entry in derived.items():  # what gate 3 stored: the validated export, and an engine where built
        version = add_artifact(ctx.db, version.id, name, entry, actor=ctx.job.actor)
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
