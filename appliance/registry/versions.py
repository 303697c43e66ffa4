"""Model versions and tasks in the catalog: what was trained, from what, how well, and its state.

    production(db, "maint-qa")      -> ModelVersion | None   what the inference server serves (it polls this)
    get_version(db, "maint-qa-v2")  -> ModelVersion

A *task* names one use of a model ("maint-qa"): its kind, dataset, base model and its gate and
auto-promotion policy. A *version* is one trained artifact for a task: its training run, parent
version (the production version it was built to replace), base model and hash, the dataset
versions it read with their content hashes, recipe hash, code version, metrics, artifacts with
their SHA-256 (adapter now; the optimize stage adds `onnx_fp32`, `onnx_int8`, `engine`), gate
results and state:

    candidate  -> production (promote) -> retired (another promoted, or rollback) -> production ...
    candidate | rejected (gates failed) | retired -> deleted (artifact crypto-shredded, row kept)

Exactly one production version per task is enforced by the catalog (a partial unique index).
Every write joins the caller's transaction with its audit row; nothing here holds record contents.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import appliance
from appliance.audit import append_audit, canonical_json
from appliance.catalog import transaction
from appliance.errors import AirlockError

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.train.runs import Run
    from appliance.vault.keys import KeyOps

STATES = ("candidate", "production", "retired", "rejected", "deleted")
KINDS = ("lm", "classifier")
ARTIFACT_NAMES = ("adapter", "classifier", "onnx_fp32", "onnx_fp16", "onnx_int8", "engine", "genai_fp32",
                  "genai_int8", "genai_int4")
_TASK_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class RegistryError(AirlockError):
    """A task or model version is unknown, or not in a state that allows the request."""


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    dataset_id: str
    base_model: str
    auto_promote: bool
    """A retrain whose gates pass is promoted at once (when its starter may promote: admin or scheduler)."""
    max_forgetting: float
    """Largest relative rise of test loss allowed on any earlier frozen test split (0.05 = 5%)."""
    new_data_tolerance: float
    """Largest relative rise of test loss allowed on the new data's test split (0.01: improvement or parity)."""
    deploys_engines: bool
    """The task serves through QAT/TensorRT engines: a retrain runs the optimize stage and engine parity is a gate."""
    created_at: str
    created_by: str
    updated_at: str | None
    updated_by: str | None
    ewc_lambda: float = 0.0
    """EWC penalty strength for retrains (0 = off): how hard training pulls weights back to production's."""
    engine_variant: str = "int8"
    """The export the engine-parity gate checks and production serves: int8 (quantized), fp16 or fp32 (Q/DQ, for
    TensorRT), or an onnxruntime-genai export of an LM (genai-int4, genai-int8, genai-fp32: served on the CPU)."""
    engine_qat: bool = True
    """int8: quantization-aware fine-tuning after calibration (QAT); False = calibration only (PTQ)."""
    engine_max_rel_diff: float | None = None
    """Largest max |onnx - torch| / max(1, max |torch|) over held-out logits; None = the optimize stage's tolerance."""
    engine_min_top1: float | None = None
    """Smallest share of held-out inputs with the same top-1 as PyTorch; None = the optimize stage's tolerance."""
    operating_class: str | None = None
    """Classifiers: the class a positive call means at the operating point (None: the second of two classes)."""
    operating_specificity: float | None = None
    """Classifiers: the operating point as a specificity target (threshold set on validation images)."""
    operating_threshold: float | None = None
    """Classifiers: the operating point as a fixed threshold on the positive class's probability."""
    engine_recipe: dict[str, Any] = field(default_factory=dict)
    """The quantization recipe the engine gate builds and judges the variant with (QuantRecipe fields; {} = its
    defaults, where the quality tolerance is +5% perplexity / -1 pt accuracy and AUC)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ModelVersion:
    id: str
    task: str
    kind: str
    """lm | classifier"""
    number: int
    state: str
    """candidate | production | retired | rejected | deleted"""
    run_id: str
    parent_id: str | None
    """The production version this one was built to replace (retrain) or registered beside; None for the first."""
    base_model: str
    base_hash: str | None
    dataset_versions: list[dict[str, Any]]
    """[{dataset_id, name, version, content_hash}] for every dataset version the training read."""
    recipe_hash: str
    code_version: str
    metrics: dict[str, Any]
    artifacts: dict[str, Any]
    """name -> {object, file, sha256, bytes, ...}: adapter or classifier now; onnx_fp32, onnx_int8, engine later."""
    created_at: str
    actor: str
    gates: dict[str, Any]
    """forgetting, new_data, engine_parity: each with a status (pass, fail, not_applicable, not_evaluated)."""
    reasons: list[str]
    """Why the gates rejected it (empty when they passed or were not evaluated)."""
    state_changed_at: str

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_VERSION_COLUMNS = [f.name for f in fields(ModelVersion)]
_VERSION_JSON = {"dataset_versions", "metrics", "artifacts", "gates", "reasons"}
_TASK_COLUMNS = [f.name for f in fields(Task)]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_task_name(name: str) -> str:
    if not _TASK_NAME.fullmatch(name) or ".." in name:
        raise RegistryError(f"task name {name!r} is not allowed",
                            hint="use 1-64 lowercase letters, digits, '.', '_' or '-', e.g. maint-qa")
    return name


def version_id(task: str, number: int) -> str:
    return f"{task}-v{number}"


# --- tasks ---------------------------------------------------------------------------------------------------------

def _task(row: tuple) -> Task:
    values = dict(zip(_TASK_COLUMNS, row, strict=True))
    for flag in ("auto_promote", "deploys_engines", "engine_qat"):
        values[flag] = bool(values[flag])
    values["engine_recipe"] = json.loads(values["engine_recipe"])
    return Task(**values)


def find_task(db: sqlite_utils.Database, name: str) -> Task | None:
    row = db.execute(f"SELECT {', '.join(_TASK_COLUMNS)} FROM model_tasks WHERE name = ?", [name]).fetchone()
    return _task(row) if row else None


def get_task(db: sqlite_utils.Database, name: str) -> Task:
    found = find_task(db, name)
    if found is None:
        raise RegistryError(f"no task named {name!r}",
                            hint="a task starts with `airlock models register RUN --task NAME` (or `airlock train lm "
                                 "... --task NAME`); list them with `airlock models list`")
    return found


def list_tasks(db: sqlite_utils.Database) -> list[Task]:
    return [_task(r) for r in db.execute(f"SELECT {', '.join(_TASK_COLUMNS)} FROM model_tasks ORDER BY name")]


def ensure_task(db: sqlite_utils.Database, name: str, run: Run, *, actor: str) -> Task:
    """The task `name`, created for `run`'s kind, dataset and base model if new; a run that does not fit is refused."""
    check_task_name(name)
    task = find_task(db, name)
    if task is None:
        with transaction(db):
            db.execute("INSERT INTO model_tasks (name, kind, dataset_id, base_model, created_at, created_by)"
                       " VALUES (?, ?, ?, ?, ?, ?)", [name, run.kind, run.dataset_id, run.base_model, now(), actor])
            append_audit(db, "models.task_create", name, {"kind": run.kind, "dataset_id": run.dataset_id,
                                                          "base_model": run.base_model}, actor=actor)
        return get_task(db, name)
    if task.kind != run.kind:
        raise RegistryError(f"task {name!r} holds {task.kind} models; run {run.id} trained a {run.kind}",
                            hint="register it under another --task")
    if task.dataset_id != run.dataset_id:
        raise RegistryError(f"task {name!r} learns from dataset {task.dataset_id}; run {run.id} trained on "
                            f"{run.dataset_name} ({run.dataset_id})",
                            hint="new data for a task is imported into its dataset (`airlock data import PATH --name "
                                 "DATASET`); a different dataset is a different --task")
    return task


def check_run_fits_task(db: sqlite_utils.Database, name: str, kind: str, dataset_id: str) -> None:
    """Before training with `--task`: the name is valid, and an existing task has this kind and dataset."""
    check_task_name(name)
    task = find_task(db, name)
    if task is not None and (task.kind != kind or task.dataset_id != dataset_id):
        raise RegistryError(f"task {name!r} holds {task.kind} models trained on dataset {task.dataset_id}; this run "
                            f"would be a {kind} on {dataset_id}",
                            hint="new data for a task is imported into its dataset; otherwise choose another --task")


POLICY_FIELDS = ("auto_promote", "max_forgetting", "new_data_tolerance", "deploys_engines", "ewc_lambda",
                 "engine_variant", "engine_qat", "engine_max_rel_diff", "engine_min_top1", "operating_class",
                 "operating_specificity", "operating_threshold", "engine_recipe")
OPERATING_FIELDS = ("operating_class", "operating_specificity", "operating_threshold")
ENGINE_VARIANTS = ("fp32", "fp16", "int8", "genai-int4", "genai-int8", "genai-fp32")
"""What a task's engine gate may judge. The CUDA genai exports are not: the optimize stage validates them only on a
GPU with onnxruntime-genai-cuda, which a retrain job does not do yet (the catalog's CHECK already admits them)."""
MAX_EWC_LAMBDA = 1e12


def set_policy(db: sqlite_utils.Database, name: str, *, actor: str, clear_operating_point: bool = False,
               **changes: Any) -> Task:
    """Change a task's gates or auto-promotion (None values are left alone); audited with before and after.

    The operating point is a specificity target or a threshold, never both: setting one clears the other;
    `clear_operating_point` clears all three operating fields (back to "not chosen").
    """
    task = get_task(db, name)
    changes = {k: v for k, v in changes.items() if v is not None}
    unknown = set(changes) - set(POLICY_FIELDS)
    if unknown:
        raise ValueError(f"unknown policy fields {sorted(unknown)}")
    changes = _operating_changes(task, changes, clear_operating_point)
    for key in ("max_forgetting", "new_data_tolerance"):
        if key in changes and not 0 <= changes[key] <= 1:
            raise RegistryError(f"{key.replace('_', '-')} {changes[key]} is outside 0..1",
                                hint="a fraction: 0.05 allows a 5% rise of the test loss")
    if "ewc_lambda" in changes and not 0 <= changes["ewc_lambda"] <= MAX_EWC_LAMBDA:
        raise RegistryError(f"ewc-lambda {changes['ewc_lambda']} is outside 0..{MAX_EWC_LAMBDA:g}",
                            hint="0 turns EWC off; try 1-1000 and read the forgetting gate's numbers")
    if "engine_variant" in changes and changes["engine_variant"] not in ENGINE_VARIANTS:
        raise RegistryError(f"engine variant {changes['engine_variant']!r} is not one of {', '.join(ENGINE_VARIANTS)}",
                            hint="int8 for TensorRT INT8 engines, fp16 or fp32 otherwise; genai-int4 for an LM "
                                 "served by onnxruntime-genai on the CPU")
    if changes.get("engine_variant", "").startswith("genai-") and task.kind != "lm":
        raise RegistryError(f"engine variant {changes['engine_variant']}: onnxruntime-genai exports are for language "
                            f"models; task {name!r} holds {task.kind} models",
                            hint="use int8, fp16 or fp32 for a classifier")
    if "engine_recipe" in changes:
        changes["engine_recipe"] = _checked_recipe(changes["engine_recipe"])
    if "engine_max_rel_diff" in changes and not changes["engine_max_rel_diff"] >= 0:
        raise RegistryError(f"engine max relative difference {changes['engine_max_rel_diff']} is negative",
                            hint="e.g. 0.05 for int8; see `airlock optimize show RUN` for measured values")
    if "engine_min_top1" in changes and not 0 <= changes["engine_min_top1"] <= 1:
        raise RegistryError(f"engine minimum top-1 agreement {changes['engine_min_top1']} is outside 0..1",
                            hint="a share of held-out inputs, e.g. 0.95")
    if not changes:
        return task
    changes = {k: v for k, v in changes.items() if v is not None or getattr(task, k) is not None}
    if not changes:
        return task
    before = {k: getattr(task, k) for k in changes}
    with transaction(db):
        sets = ", ".join(f"{k} = ?" for k in changes)
        db.execute(f"UPDATE model_tasks SET {sets}, updated_at = ?, updated_by = ? WHERE name = ?",
                   [int(v) if isinstance(v, bool) else canonical_json(v) if isinstance(v, dict) else v
                    for v in changes.values()] + [now(), actor, name])
        append_audit(db, "models.policy", name, {"before": before, "after": changes}, actor=actor)
    return get_task(db, name)


def _checked_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """A task's quantization recipe: QuantRecipe's own checks (unknown fields, ranges), kept as the fields given."""
    from appliance.optimize.errors import OptimizeError
    from appliance.optimize.recipe import quant_recipe_from

    try:
        quant_recipe_from(values, "engine recipe")
    except OptimizeError as exc:
        raise RegistryError(exc.message, hint=exc.hint) from None
    return dict(values)


def _operating_changes(task: Task, changes: dict[str, Any], clear: bool) -> dict[str, Any]:
    """Validate operating-point changes; the value None in the result means: set the column to NULL."""
    asked = {k for k in OPERATING_FIELDS if k in changes}
    if clear and asked:
        raise RegistryError("the operating point cannot be cleared and set in one command",
                            hint="clear it with --clear-operating-point, or set it with --operating-specificity or "
                                 "--operating-threshold")
    if not (clear or asked):
        return changes
    if task.kind != "classifier":
        raise RegistryError(f"task {task.name!r} holds {task.kind} models; an operating point is for classifiers",
                            hint="set --operating-* on an image classifier task")
    if clear:
        return {**changes, **dict.fromkeys(OPERATING_FIELDS)}
    if "operating_specificity" in changes and "operating_threshold" in changes:
        raise RegistryError("an operating point is a specificity target or a threshold, not both",
                            hint="give --operating-specificity (e.g. 0.9) or --operating-threshold (e.g. 0.3)")
    specificity = changes.get("operating_specificity")
    if specificity is not None and not 0 < specificity < 1:
        raise RegistryError(f"operating specificity {specificity} is outside 0..1 (exclusive)",
                            hint="a share of negative studies called negative, e.g. 0.9")
    threshold = changes.get("operating_threshold")
    if threshold is not None and not 0 <= threshold <= 1:
        raise RegistryError(f"operating threshold {threshold} is outside 0..1",
                            hint="a probability of the positive class, e.g. 0.3")
    label = changes.get("operating_class")
    if label is not None and not (isinstance(label, str) and 0 < len(label) <= 256 and label.isprintable()):
        raise RegistryError(f"operating class {label!r} is not a class name",
                            hint="name one of the task's classes, as `airlock models show VERSION` lists them")
    if specificity is not None:
        changes["operating_threshold"] = None  # the newer choice replaces the other kind
    if threshold is not None:
        changes["operating_specificity"] = None
    return changes


# --- versions ------------------------------------------------------------------------------------------------------

def _version(row: tuple) -> ModelVersion:
    values = {name: (json.loads(value) if name in _VERSION_JSON else value)
              for name, value in zip(_VERSION_COLUMNS, row, strict=True)}
    return ModelVersion(**values)


_SELECT = f"SELECT {', '.join(_VERSION_COLUMNS)} FROM model_versions"


def find_version(db: sqlite_utils.Database, version: str) -> ModelVersion | None:
    row = db.execute(f"{_SELECT} WHERE id = ?", [version]).fetchone()
    return _version(row) if row else None


def get_version(db: sqlite_utils.Database, version: str) -> ModelVersion:
    found = find_version(db, version)
    if found is None:
        raise RegistryError(f"no model version {version!r}", hint="list versions with `airlock models list`")
    return found


def production(db: sqlite_utils.Database, task: str) -> ModelVersion | None:
    """The version of `task` in production, or None. Cheap (one indexed row): the server polls it to hot-swap."""
    row = db.execute(f"{_SELECT} WHERE task = ? AND state = 'production'", [task]).fetchone()
    return _version(row) if row else None


def list_versions(db: sqlite_utils.Database, *, task: str | None = None, state: str | None = None
                  ) -> list[ModelVersion]:
    sql, params = f"{_SELECT} WHERE 1 = 1", []
    if task:
        sql += " AND task = ?"
        params.append(task)
    if state:
        sql += " AND state = ?"
        params.append(state)
    return [_version(r) for r in db.execute(sql + " ORDER BY task, number", params)]


def version_for_run(db: sqlite_utils.Database, run_id: str) -> ModelVersion | None:
    row = db.execute(f"{_SELECT} WHERE run_id = ?", [run_id]).fetchone()
    return _version(row) if row else None


def promotions(db: sqlite_utils.Database, task: str) -> list[dict[str, Any]]:
    """The task's production history, oldest first: promote and rollback, who, why, when."""
    rows = db.execute("SELECT id, action, version_id, previous_id, actor, reason, at FROM model_promotions"
                      " WHERE task = ? ORDER BY id", [task])
    return [dict(zip(("id", "action", "version", "previous", "actor", "reason", "at"), r, strict=True)) for r in rows]


def insert_version(db: sqlite_utils.Database, version: ModelVersion) -> ModelVersion:
    """Write a new candidate or rejected version with its audit row (joins the caller's transaction)."""
    if version.state not in ("candidate", "rejected"):
        raise ValueError("a new version is a candidate or rejected; promotion is appliance.registry.promotion")
    values = [canonical_json(getattr(version, c)) if c in _VERSION_JSON else getattr(version, c)
              for c in _VERSION_COLUMNS]
    with transaction(db):
        db.execute(f"INSERT INTO model_versions ({', '.join(_VERSION_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(_VERSION_COLUMNS))})", values)
        details: dict[str, Any] = {
            "task": version.task, "run": version.run_id, "parent": version.parent_id, "state": version.state,
            "base_hash": version.base_hash, "recipe_hash": version.recipe_hash, "code_version": version.code_version,
            "dataset_versions": [[d["name"], d["version"], d["content_hash"]] for d in version.dataset_versions],
            "artifacts": {k: v.get("sha256") for k, v in version.artifacts.items()},
            "gates": {k: v.get("status") for k, v in version.gates.items() if isinstance(v, dict)}}
        if version.reasons:
            details["reasons"] = version.reasons
        append_audit(db, "models.reject" if version.state == "rejected" else "models.register", version.id, details,
                     actor=version.actor)
    return get_version(db, version.id)


def next_number(db: sqlite_utils.Database, task: str) -> int:
    return (db.execute("SELECT MAX(number) FROM model_versions WHERE task = ?", [task]).fetchone()[0] or 0) + 1


def dataset_versions_of(db: sqlite_utils.Database, run: Run) -> list[dict[str, Any]]:
    """Every dataset version a run read (1..pinned), with its content hash, from the catalog."""
    from appliance.data import datasets

    name = run.dataset_name
    return [{"dataset_id": run.dataset_id, "name": name, "version": v.version, "content_hash": v.content_hash}
            for v in datasets.versions(db, run.dataset_id) if v.version <= run.dataset_version]


def run_metrics(run: Run) -> dict[str, Any]:
    """The numbers worth keeping on a version: the run's metrics without the long curves."""
    return {k: v for k, v in run.metrics.items() if k not in ("val_losses", "train_losses", "val_aucs")}


def artifact_entry(object_id: str, file_name: str, data: bytes) -> dict[str, Any]:
    """An `artifacts` entry: where the (encrypted) file is, and the SHA-256 of its plaintext."""
    return {"object": object_id, "file": file_name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def run_artifacts(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run) -> dict[str, Any]:
    """The run's weights as artifacts entries, hashed from the decrypted bytes (in memory only)."""
    from appliance.train.artifacts import ADAPTER, CLASSIFIER
    from appliance.vault.store import read_bytes

    if run.state != "succeeded" or not run.artifact:
        raise RegistryError(f"run {run.id} is {run.state} and has no trained weights to register",
                            hint="only succeeded runs register; see `airlock train show " + run.id + "`")
    name, file_name = ("adapter", ADAPTER) if run.kind == "lm" else ("classifier", CLASSIFIER)
    return {name: artifact_entry(run.artifact, file_name, read_bytes(db, keys, home, run.artifact, file_name))}


def not_evaluated_gates(why: str) -> dict[str, Any]:
    return {gate: {"status": "not_evaluated", "reason": why} for gate in ("forgetting", "new_data", "engine_parity")}


def register_run(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, task_name: str, *,
                 actor: str) -> ModelVersion:
    """A succeeded training run becomes candidate version N+1 of `task_name` (the task is created if new).

    Its parent is the task's production version at this moment. Gates are not evaluated here: they
    compare a retrain with what it replaces (`airlock retrain`); a registered version is promoted
    by a person who has read its card.
    """
    if run.task and run.task != task_name:
        raise RegistryError(f"run {run.id} was trained for task {run.task!r}, not {task_name!r}",
                            hint=f"register it with --task {run.task}")
    existing = version_for_run(db, run.id)
    if existing is not None:
        raise RegistryError(f"run {run.id} is already registered as {existing.id}",
                            hint=f"see it with `airlock models show {existing.id}`")
    artifacts = run_artifacts(db, keys, home, run)
    with transaction(db):
        task = ensure_task(db, task_name, run, actor=actor)
        parent = production(db, task.name)
        number = next_number(db, task.name)
        return insert_version(db, ModelVersion(
            version_id(task.name, number), task.name, run.kind, number, "candidate", run.id,
            parent.id if parent else None, run.base_model, run.base_hash, dataset_versions_of(db, run),
            run.recipe_hash, appliance.__version__, run_metrics(run), artifacts, now(), actor,
            not_evaluated_gates("registered from a training run; gates are evaluated by `airlock retrain`"), [],
            now()))


def add_artifact(db: sqlite_utils.Database, version: str, name: str, entry: dict[str, Any], *,
                 actor: str) -> ModelVersion:
    """Record a derived artifact (the optimize stage: onnx_fp32, onnx_int8, engine) on a version, audited."""
    if name not in ARTIFACT_NAMES:
        raise ValueError(f"unknown artifact name {name!r}")
    with transaction(db):
        current = get_version(db, version)
        if current.state == "deleted":
            raise RegistryError(f"model version {version} was deleted", hint="export from a version that exists")
        artifacts = {**current.artifacts, name: entry}
        db.execute("UPDATE model_versions SET artifacts = ? WHERE id = ?", [canonical_json(artifacts), version])
        append_audit(db, "models.artifact", version, {"name": name, "sha256": entry.get("sha256"),
                                                      "object": entry.get("object")}, actor=actor)
    return get_version(db, version)
