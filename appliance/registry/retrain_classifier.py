"""The `retrain` job for image classifiers: new labelled images + replay, continued from production, gated on AUC.

    airlock retrain chest-xray --replay 0.2 --wait

Same steps, recording and audit as a language model's retrain (appliance.registry.retrain): the
images imported after production's dataset version plus a seeded replay sample of earlier train
and val images; training continues from the production classifier (its SHA-256 checked against
the registry; `--from fresh`: a new one) with production's classes, optionally with an EWC penalty;
then both models are measured on every earlier frozen test split and on the new test split (ROC
AUC, accuracy and, once the site chose one, sensitivity at the task's operating point:
`gates.decide_classifier`; a specificity target sets each model's threshold on this retrain's
validation images), gate 3 for tasks that deploy engines, registration.
Only the images the retrain reads are decoded; the others stay encrypted bytes in memory.
"""

from __future__ import annotations

import json
import time
from typing import Any

from appliance.jobs.runner import JobContext
from appliance.registry import gates
from appliance.registry.retrain import EWC_RECORDS, conclude, load_weights
from appliance.registry.versions import RegistryError, get_task, get_version
from appliance.train import runs


def _rows(ctx: JobContext, keys: Any, pinned: Any, labels: list[str]) -> tuple[list[tuple[str, int, str, Any]], int]:
    """(content hash, version, split, (encrypted-store payload, class index)) of labelled records; count left out."""
    from appliance.data.store import iter_records

    index = {label: i for i, label in enumerate(labels)}
    rows, skipped = [], 0
    for record in iter_records(ctx.db, keys, ctx.home, pinned.dataset, max_version=pinned.version):
        if record.label not in index:  # unlabelled (a new class was refused before the job started)
            skipped += 1
            continue
        rows.append((record.content_hash, record.version, record.split, (record.payload, index[record.label])))
    return rows, skipped


def _tensors(records: list[tuple[bytes, int]], channels: int, shape: tuple[int, int] | None) -> tuple[Any, Any]:
    """Decode the chosen images: float16 N x C x H x W in [0, 1] and class indices (as `image_splits` gives them)."""
    import numpy as np
    import torch

    from appliance.data.errors import DataError
    from appliance.train.inputs import decode_pixels

    arrays = []
    for payload, _ in records:
        pixels = np.asarray(decode_pixels(payload), dtype=np.float16)
        if pixels.shape[0] == 1 and channels > 1:
            pixels = np.repeat(pixels, channels, axis=0)
        if shape is not None and tuple(pixels.shape[1:]) != shape:
            raise DataError(f"images of {pixels.shape[1]}x{pixels.shape[2]} among {shape[0]}x{shape[1]} ones",
                            hint="re-import the new images with the dataset's --image-size")
        arrays.append(pixels)
    targets = torch.tensor([label for _, label in records], dtype=torch.int64)
    if not arrays:
        height, width = shape or (1, 1)
        return torch.zeros((0, channels, height, width), dtype=torch.float16), targets
    return torch.from_numpy(np.stack(arrays)), targets


def _scores(model: Any, images: Any, targets: Any, labels: list[str], point: dict[str, Any]
            ) -> dict[str, Any] | None:
    from appliance.train.classifier import predict

    if images.shape[0] == 0:
        return None
    return gates.classifier_scores(predict(model, images), targets, labels, point)


def _operating_point(model: Any, val: tuple[Any, Any], labels: list[str], policy: Any) -> dict[str, Any]:
    """Where this model's scores are read: a specificity target sets its threshold on the retrain's val images."""
    from appliance.train.classifier import predict
    from appliance.train.operating_point import resolve

    if policy.specificity is None or val[0].shape[0] == 0:
        return resolve(policy, labels)
    return resolve(policy, labels, predict(model, val[0]), val[1])


def retrain_classifier(ctx: JobContext, run: runs.Run, params: dict[str, Any]) -> dict[str, Any]:
    from appliance.train.artifacts import CLASSIFIER, LABELS, tensors_to_bytes
    from appliance.train.checkpoints import VaultCheckpoints
    from appliance.train.classifier import ClassifierRecipe, load_classifier, train_classifier
    from appliance.train.jobs import _curve, _prepare, _ProgressReporter, checkpoint_object_id, curve_saver
    from appliance.train.operating_point import OperatingPolicy
    from appliance.train.recipe import recipe_from_dict
    from appliance.vault.store import read_bytes

    started = time.monotonic()
    keys, base, pinned, base_hash = _prepare(ctx, run)
    parent = get_version(ctx.db, params["parent"])
    task = get_task(ctx.db, params["task"])
    if params["init"] == "production" and parent.base_hash and parent.base_hash != base_hash:
        raise RegistryError(f"base model {run.base_model} is not the one {parent.id} was trained on",
                            hint="install the exact base model (hash in `airlock models show`), or retrain "
                                 "--from fresh")
    recipe = recipe_from_dict(run.recipe, f"run {run.id} recipe", ClassifierRecipe)
    parent_state = load_weights(ctx, keys, parent, "classifier")
    entry = parent.artifacts["classifier"]
    labels = json.loads(read_bytes(ctx.db, keys, ctx.home, entry["object"], LABELS))["labels"]
    ctx.progress("decrypting the dataset")
    rows, skipped = _rows(ctx, keys, pinned, labels)
    data = gates.select_records(rows, dataset=pinned.dataset.name, since=params["since_version"], last=pinned.version,
                                replay=params["replay"], seed=params["replay_seed"],
                                ewc_count=EWC_RECORDS if recipe.ewc_lambda else 0)
    from transformers import AutoConfig

    channels = int(AutoConfig.from_pretrained(base.path, local_files_only=True).num_channels)
    ctx.progress("decoding the images the retrain reads")
    train = _tensors(data.train, channels, None)
    shape = tuple(train[0].shape[2:])
    val = _tensors(data.val, channels, shape)
    tests = {name: _tensors(records, channels, shape) for name, records in
             {**data.frozen_tests, data.new_test_name: data.new_test}.items()}
    ewc_data = _tensors(data.ewc, channels, shape) if data.ewc else None
    run = runs.mark_running(ctx.db, run, base_hash=base_hash, lineage={
        "dataset_versions": [[i + 1, h] for i, h in enumerate(pinned.version_hashes)], "records": data.counts,
        "labels": labels, "skipped_unlabeled": skipped, "device": ctx.job.device,
        "retrain": {"parent": parent.id, "init": params["init"], "replay": params["replay"],
                    "replay_seed": params["replay_seed"], "since_version": params["since_version"]}})
    ctx.log(f"retrain of {task.name} from {parent.id} ({params['init']}): {data.counts['new_train']} new + "
            f"{data.counts['replay_train']} replayed train images, {len(data.frozen_tests)} earlier test split(s)")
    report = _ProgressReporter(ctx)

    def on_progress(p: dict[str, Any]) -> None:
        report(p["step"], p["total_steps"], {"val_auc": p["val_auc"]} if p.get("val_auc") is not None else {},
               loss=round(p["loss"], 6))

    train_started = time.monotonic()
    store_curves = curve_saver(ctx, keys, run.id)
    result = train_classifier(base, train, val, recipe, labels=labels,
                              checkpoints=VaultCheckpoints(ctx.db, keys, ctx.home, checkpoint_object_id(run.id)),
                              on_progress=on_progress, should_stop=ctx.should_stop,
                              init_state=parent_state if params["init"] == "production" else None,
                              ewc_data=ewc_data, on_checkpoint=store_curves)
    store_curves(result.curves)
    train_s = time.monotonic() - train_started
    metrics: dict[str, Any] = {
        "steps": result.steps, "total_steps": recipe.max_steps, "stopped_early": result.stopped_early,
        "val_auc": result.val_aucs[-1][1] if result.val_aucs else None, "best_val_auc": result.best_val_auc,
        "val_aucs": _curve(result.val_aucs), "train_loss": result.train_losses[-1] if result.train_losses else None,
        "train_losses": _curve([(i + 1, v) for i, v in enumerate(result.train_losses)]), "labels": labels,
        "ewc": result.ewc, "records": {"train": int(train[0].shape[0]), "val": int(val[0].shape[0]), **data.counts}}
    if result.steps < recipe.max_steps and not result.stopped_early:
        runs.finish_run(ctx.db, run.id, "cancelled", metrics=metrics)
        return {"run": run.id, "steps": result.steps, "total_steps": recipe.max_steps, "checkpointed": True}

    ctx.progress("measuring the gates")
    gates_started = time.monotonic()
    production_model = load_classifier(base, len(labels), 0)
    production_model.load_state_dict(parent_state)
    candidate_model = load_classifier(base, len(labels), 0)
    candidate_model.load_state_dict(result.state_dict)
    policy = OperatingPolicy.of_task(task)
    points = {"production": _operating_point(production_model, val, labels, policy),
              "candidate": _operating_point(candidate_model, val, labels, policy)}
    measured = {name: gates.SplitScores(name, int(images.shape[0]),
                                        _scores(production_model, images, targets, labels, points["production"]),
                                        _scores(candidate_model, images, targets, labels, points["candidate"]))
                for name, (images, targets) in tests.items()}
    outcome = gates.decide_classifier([measured[n] for n in data.frozen_tests], measured[data.new_test_name],
                                      max_forgetting=task.max_forgetting, new_data_tolerance=task.new_data_tolerance,
                                      deploys_engines=task.deploys_engines, operating_point=policy.describe())
    metrics["test_splits"] = {name: {**(m.candidate or {}), "records": m.records} for name, m in measured.items()}
    if any(images.shape[0] for images, _ in tests.values()):  # every test image of versions 1..N, as `train` reports
        import torch

        every = (torch.cat([images for images, _ in tests.values()]), torch.cat([t for _, t in tests.values()]))
        metrics["test"] = _scores(candidate_model, *every, labels, points["candidate"])
    metrics["timings_s"] = {"train": round(train_s, 2), "gates": round(time.monotonic() - gates_started, 2)}
    files = {CLASSIFIER: tensors_to_bytes(result.state_dict, {"run": run.id, "base_model": run.base_model,
                                                              "base_hash": base_hash}),
             LABELS: json.dumps({"labels": labels, "base_model": run.base_model}).encode("utf-8")}
    return conclude(ctx, keys, run, task, parent, params, outcome, metrics, files, ("classifier", CLASSIFIER),
                    started)
