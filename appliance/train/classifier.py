"""Image classifiers (DICOM or PNG/JPEG datasets): fine-tune a transformers image model, top to bottom.

    result = train_classifier(resolve_base_model("tiny-resnet-cls"), train, val, ClassifierRecipe(), labels=[...])

Inputs are what the data import stores: float16 tensors N x C x H x W in [0, 1] and integer
labels. Class weighting counters imbalance (a site has far more normal than abnormal studies);
augmentation (flip, small rotation, intensity) runs on the fly with a seeded generator; early
stopping watches the validation ROC AUC. Metrics: accuracy, per-class sensitivity/specificity,
ROC AUC (one-vs-rest, macro), confusion matrix, expected calibration error, and sensitivity and
specificity (Wilson 95% CIs) with the 2 x 2 confusion at the task's operating point
(appliance.train.operating_point; a specificity target becomes a threshold on the validation
images). A metric a split cannot give (AUC on images of one class, anything on an empty split;
sensitivity without positives) is "not measured": NaN inside, None in `to_dict`, and a
validation split that gives no AUC turns early stopping off rather than stopping on noise. With
early stopping on, the weights returned are those of the best validation AUC, not the last.
Trains on the GPU when the job sees one, else on the CPU.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.base_models import BaseModel
from appliance.errors import AirlockError
from appliance.train.curves import Curves
from appliance.train.lm import CheckpointStore, clip_or_measure
from appliance.train.recipe import RecipeError


@dataclass(frozen=True)
class ClassifierRecipe:
    lr: float = 1e-3
    """Peak learning rate (AdamW, cosine decay)."""
    max_steps: int = 200
    """Optimizer steps (1-1,000,000)."""
    batch_size: int = 16
    """Images per step (1-4096)."""
    augment: bool = True
    """Random flip, rotation up to `max_rotation_deg` and intensity jitter on training images."""
    max_rotation_deg: float = 10.0
    """Largest rotation used by augmentation (0-45)."""
    class_weighting: bool = True
    """Weight the loss by inverse class frequency."""
    eval_every: int = 20
    """Validation every N steps."""
    early_stopping_patience: int = 0
    """Stop after N evaluations without a better validation AUC; 0 = off."""
    seed: int = 0
    ewc_lambda: float = 0.0
    """EWC penalty strength when continuing from an earlier classifier (`airlock retrain`); 0 = off."""

    def __post_init__(self) -> None:
        checks = [("lr", self.lr, 1e-6, 1.0), ("max_steps", self.max_steps, 1, 1_000_000),
                  ("batch_size", self.batch_size, 1, 4096), ("max_rotation_deg", self.max_rotation_deg, 0, 45),
                  ("eval_every", self.eval_every, 1, 100_000),
                  ("early_stopping_patience", self.early_stopping_patience, 0, 1000), ("seed", self.seed, 0, 2**31 - 1),
                  ("ewc_lambda", self.ewc_lambda, 0, 1e12)]
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                low_text, high_text = (f"{v:,}" if isinstance(v, int) else f"{v:g}" for v in (low, high))
                raise RecipeError(f"classifier recipe field {name} = {value!r} is outside {low_text}..{high_text}",
                                  hint=f"pick a number between {low_text} and {high_text}")
        for name in ("augment", "class_weighting"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"classifier recipe field {name} = {getattr(self, name)!r} is not true or false",
                                  hint=f"write {name} = true or {name} = false")


@dataclass(frozen=True)
class ClassifierMetrics:
    accuracy: float
    roc_auc: float
    sensitivity: dict[str, float]
    specificity: dict[str, float]
    confusion: list[list[int]]
    """confusion[true][predicted]"""
    ece: float | None = None
    """Expected calibration error (top-label, 10 bins); None on an empty split."""
    operating_point: dict[str, Any] | None = None
    """`operating_point.measure_operating_point`: class, threshold, how it was chosen, sensitivity and specificity
    with Wilson 95% CIs (None where not measured), the 2 x 2 confusion there."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a metric that could not be measured (NaN here) is None."""
        out = asdict(self)
        out["roc_auc"] = _measured(self.roc_auc)
        for name in ("sensitivity", "specificity"):
            out[name] = {k: _measured(v) for k, v in out[name].items()}
        return out


def _measured(value: float) -> float | None:
    return value if math.isfinite(value) else None


def auc_measurable(targets: Any, num_labels: int) -> bool:
    """Whether a split's labels give a ROC AUC: both classes of a binary task, or, with more classes,
    at least one class present beside another."""
    present = set(targets.tolist())
    if num_labels == 2:
        return present == {0, 1}
    return len(present) >= 2


@dataclass
class ClassifierResult:
    steps: int
    train_losses: list[float] = field(default_factory=list)
    val_aucs: list[tuple[int, float]] = field(default_factory=list)
    best_val_auc: float | None = None
    stopped_early: bool = False
    test: ClassifierMetrics | None = None
    ewc: dict[str, Any] | None = None
    """EWC numbers (lambda, Fisher statistics, last penalty) when the recipe turned it on."""
    curves: Curves = field(default_factory=Curves)
    """train/loss, train/lr, train/grad_norm, val/auc, test/accuracy, test/auc for TensorBoard."""
    state_dict: dict[str, Any] = field(default_factory=dict, repr=False)


def roc_auc(scores: list[float], positives: list[bool]) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties count half."""
    pairs = sorted(zip(scores, positives, strict=True))
    n_pos = sum(positives)
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2  # ranks are 1-based; tied scores share their mean rank
        rank_sum += average_rank * sum(1 for k in range(i, j) if pairs[k][1])
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def classification_metrics(probabilities: Any, labels: Any, names: list[str],
                           operating_point: dict[str, Any] | None = None) -> ClassifierMetrics:
    """Metrics from an N x K probability tensor and N integer labels.

    `operating_point`: from `operating_point.resolve` (None: the default point, 0.5 on the second class).
    """
    from appliance.train.operating_point import (
        OperatingPolicy,
        expected_calibration_error,
        measure_operating_point,
        resolve,
    )

    point = operating_point if operating_point is not None else resolve(OperatingPolicy(), names)
    predictions = probabilities.argmax(1).tolist()
    truth = labels.tolist()
    k = len(names)
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(truth, predictions, strict=True):
        confusion[t][p] += 1
    total = len(truth)
    sensitivity, specificity = {}, {}
    for c, name in enumerate(names):
        tp = confusion[c][c]
        fn = sum(confusion[c]) - tp
        fp = sum(confusion[r][c] for r in range(k)) - tp
        tn = total - tp - fn - fp
        sensitivity[name] = tp / (tp + fn) if tp + fn else float("nan")
        specificity[name] = tn / (tn + fp) if tn + fp else float("nan")
    # Two classes: one curve (class 1 positive). More: one-vs-rest per class, macro-averaged.
    positives = [1] if k == 2 else range(k)
    aucs = [roc_auc(probabilities[:, c].tolist(), [t == c for t in truth]) for c in positives]
    aucs = [a for a in aucs if not math.isnan(a)]
    return ClassifierMetrics(sum(confusion[i][i] for i in range(k)) / total if total else 0.0,
                             sum(aucs) / len(aucs) if aucs else float("nan"), sensitivity, specificity, confusion,
                             expected_calibration_error(probabilities, labels),
                             measure_operating_point(probabilities, labels, point))


def unmeasured_splits(splits: dict[str, tuple[Any, Any]], num_labels: int) -> list[str]:
    """One line per held-out split that cannot give its metrics: what is not measured, and what to do."""
    hint = "import studies of more patients (each patient's images stay in one split)"
    out = []
    for split, metric in (("val", "val AUC not measured, no early stopping"), ("test", "test metrics not measured")):
        images, targets = splits[split]
        if images.shape[0] == 0:
            out.append(f"no {split} images in this dataset: {metric}; hint: {hint}")
        elif not auc_measurable(targets, num_labels):
            what = metric if split == "val" else "test AUC not measured (accuracy is)"
            out.append(f"the {split} images are all of one class: {what}; hint: {hint}")
    return out


def augment(images: Any, generator: Any, max_rotation_deg: float) -> Any:
    """Flip, rotate and jitter intensity, per image, reproducibly from `generator`."""
    import torch
    import torch.nn.functional as F

    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rotation_deg)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, align_corners=False, padding_mode="border")
    scale = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * 0.05
    return (images * scale + shift).clamp(0, 1)


def load_classifier(base: BaseModel, num_labels: int, seed: int) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(seed)
    if base.has_weights:
        return AutoModelForImageClassification.from_pretrained(base.path, local_files_only=True,
                                                               num_labels=num_labels, ignore_mismatched_sizes=True)
    config = AutoConfig.from_pretrained(base.path, local_files_only=True, num_labels=num_labels)
    return AutoModelForImageClassification.from_config(config)


def _fit_channels(images: Any, channels: int) -> Any:
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1)  # grey DICOM into an RGB-pretrained model
    raise AirlockError(f"images have {images.shape[1]} channels, the model expects {channels}",
                       hint="re-import the dataset for this model, or choose a model with matching channels")


def predict(model: Any, images: Any, batch_size: int = 64) -> Any:
    import torch

    model.eval()
    channels = model.config.num_channels
    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk = _fit_channels(images[start:start + batch_size].float(), channels).to(device)
            outputs.append(model(pixel_values=chunk).logits.float().softmax(-1).cpu())
    model.train()
    return torch.cat(outputs)


def train_classifier(base: BaseModel, train: tuple[Any, Any], val: tuple[Any, Any], recipe: ClassifierRecipe, *,
                     labels: list[str], test: tuple[Any, Any] | None = None,
                     checkpoints: CheckpointStore | None = None,
                     on_progress: Callable[[dict[str, Any]], None] | None = None,
                     should_stop: Callable[[], bool] | None = None, init_state: dict[str, Any] | None = None,
                     ewc_data: tuple[Any, Any] | None = None, operating: Any = None,
                     on_checkpoint: Callable[[Curves], None] | None = None) -> ClassifierResult:
    """Train; checkpoint at every evaluation and when `should_stop()` turns true.

    `operating` (an `operating_point.OperatingPolicy`, None: not chosen) is where the test metrics read the
    scores; a specificity target sets its threshold on the validation images with the weights returned.
    `on_checkpoint(curves)` runs after each checkpoint with the curves up to it (the job stores them).

    `init_state` (a state dict of the same model and classes) continues from an earlier classifier
    (incremental retraining); `ewc_data` (earlier images, labels) measures the EWC Fisher at it.
    """
    import torch

    images, targets = train
    if images.shape[0] == 0:
        raise AirlockError("the training split is empty", hint="import more images or check the dataset's splits")
    # On a GPU when the job sees one (the job narrowed CUDA_VISIBLE_DEVICES to its device); images
    # stay in host memory and are augmented there, one batch at a time goes to the GPU.
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = load_classifier(base, len(labels), recipe.seed)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device).train()
    counts = torch.bincount(targets, minlength=len(labels)).float()
    weight = (counts.sum() / (len(labels) * counts.clamp(min=1))).to(device) if recipe.class_weighting else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    ewc = None
    if recipe.ewc_lambda:
        from appliance.train.ewc import estimate_ewc

        if init_state is None or ewc_data is None:
            raise AirlockError("EWC keeps training close to an earlier classifier, and there is none here",
                               hint="set ewc_lambda only for `airlock retrain` (continued from production)")
        old_images, old_targets = ewc_data
        chunks = [(old_images[i:i + recipe.batch_size], old_targets[i:i + recipe.batch_size])
                  for i in range(0, old_images.shape[0], recipe.batch_size)]
        ewc = estimate_ewc(model, recipe.ewc_lambda, chunks, lambda c: torch.nn.functional.cross_entropy(
            model(pixel_values=_fit_channels(c[0].float(), model.config.num_channels).to(device)).logits,
            c[1].to(device)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, recipe.max_steps) / recipe.max_steps)))
    generator = torch.Generator().manual_seed(recipe.seed)
    result = ClassifierResult(steps=0)
    state = {"step": 0, "best": None, "bad": 0}
    best_state: dict[str, Any] | None = None  # early stopping ships these weights, not the last ones
    # No validation AUC (no images, or one class only): train the full schedule without early stopping.
    validate = val[0].shape[0] > 0 and auc_measurable(val[1], len(labels))

    saved = checkpoints.read_bytes("classifier.pt") if checkpoints else None
    if saved is not None:
        blob = torch.load(io.BytesIO(saved), weights_only=True)
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        generator.set_state(blob["generator"])
        best_state = blob.get("best_model")
        state, result.train_losses, result.val_aucs = blob["state"], blob["losses"], blob["val_aucs"]
        result.curves = Curves.from_state(blob.get("curves"))

    def save() -> None:
        if checkpoints is not None:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "state": state,
                        "best_model": best_state,
                        "losses": result.train_losses, "val_aucs": result.val_aucs,
                        "curves": result.curves.state()}, buffer)
            checkpoints.write_bytes("classifier.pt", buffer.getvalue())
            if on_checkpoint:
                on_checkpoint(result.curves)

    while state["step"] < recipe.max_steps:
        index = torch.randint(images.shape[0], (min(recipe.batch_size, images.shape[0]),), generator=generator)
        batch = images[index].float()
        if recipe.augment:
            batch = augment(batch, generator, recipe.max_rotation_deg)
        logits = model(pixel_values=_fit_channels(batch, model.config.num_channels).to(device)).logits
        loss = loss_fn(logits, targets[index].to(device))
        loss.backward()
        if ewc is not None:
            ewc.add_gradient(model)
        grad_norm = float(clip_or_measure(list(model.parameters()), 0))  # measured only: no clipping here
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        result.train_losses.append(round(loss.item(), 6))
        result.curves.add(state["step"], {"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm})
        auc = None
        if state["step"] % recipe.eval_every == 0 or state["step"] == recipe.max_steps:
            if validate:
                auc = classification_metrics(predict(model, val[0]), val[1], labels).roc_auc
                result.val_aucs.append((state["step"], auc))
                result.curves.add(state["step"], {"val/auc": _measured(auc)})
                if state["best"] is None or auc > state["best"]:
                    state["best"], state["bad"] = auc, 0
                    if recipe.early_stopping_patience:
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    state["bad"] += 1
            save()
        if on_progress:
            on_progress({"step": state["step"], "total_steps": recipe.max_steps, "loss": loss.item(),
                         "val_auc": auc})
        if recipe.early_stopping_patience and state["bad"] >= recipe.early_stopping_patience:
            result.stopped_early = True
            break
        if should_stop and should_stop():
            save()
            break
    result.steps = state["step"]
    result.best_val_auc = state["best"]
    finished = result.steps >= recipe.max_steps or result.stopped_early  # not paused by a stop request
    if finished and best_state is not None:
        model.load_state_dict(best_state)  # the weights whose validation AUC is reported
    if test is not None and test[0].shape[0] and finished:
        from appliance.train.operating_point import OperatingPolicy, resolve

        policy = operating or OperatingPolicy()
        if policy.specificity is not None and val[0].shape[0]:
            point = resolve(policy, labels, predict(model, val[0]), val[1])
        else:
            point = resolve(policy, labels)
        result.test = classification_metrics(predict(model, test[0]), test[1], labels, point)
        result.curves.add(result.steps, {"test/accuracy": _measured(result.test.accuracy),
                                         "test/auc": _measured(result.test.roc_auc)})
    result.ewc = ewc.summary() if ewc is not None else None
    result.state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return result
