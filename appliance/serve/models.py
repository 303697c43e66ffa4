"""What the server serves: a name clients ask for, bound to a training run or to a task's production version.

    source = RunSource("qa-bot", "lm-20250101-120000-abc123")   # --run qa-bot=RUN (fixed)
    source = TaskSource("chest-xray")                           # --task chest-xray (follows promotions)
    target = source.resolve(db)                                 # which run, which version, right now
    model = load_model(db, keys, home, source.name, target)     # decrypted into memory, ready to serve

The backend is the optimize stage's choice for this machine (`appliance.optimize.jobs.runtime_for_run`:
TensorRT engine -> ONNX Runtime CUDA -> ONNX Runtime CPU -> PyTorch), or PyTorch when asked. In
PyTorch, a language model's LoRA adapter is merged into the base weights once at load time (no
adapter overhead per token); the ONNX exports have it merged already. A classifier gets the image
size its training data was imported at.
Weights are decrypted in memory only (appliance.train.artifacts); loading needs the vault
unlocked, and a locked vault fails the load with the vault's own hint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.serve.errors import ServeError

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.serve.limits import ServeLimits
    from appliance.train.runs import Run
    from appliance.vault.keys import KeyOps

DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class Target:
    """One loadable version of a served model."""

    version_id: str
    """Changes when the served version should change (registry version id, or the run id)."""
    run_id: str
    version: str
    """Shown to clients: 'v3' for a registry version, the run id for --run."""


@dataclass(frozen=True)
class RunSource:
    """A succeeded training run, served directly (`--run [NAME=]RUN`); it never changes."""

    name: str
    run_id: str

    def resolve(self, db: sqlite_utils.Database) -> Target:
        return Target(self.run_id, self.run_id, self.run_id)


@dataclass(frozen=True)
class TaskSource:
    """The production version of a registry task (`--task TASK`); promotions change it."""

    name: str

    def resolve(self, db: sqlite_utils.Database) -> Target | None:
        from appliance.registry.versions import get_task, production

        version = production(db, self.name)
        if version is None:
            get_task(db, self.name)  # an unknown task is an error with the registry's hint, not "nothing promoted"
            return None
        return Target(str(version.id), version.run_id, f"v{version.number}")


@dataclass
class ServedModel:
    name: str
    kind: str
    """'lm' or 'classifier'."""
    target: Target
    backend: Any
    """An LMBackend or a ClassifierBackend (appliance.serve.backends)."""
    base_model: str
    tokenizer: Any = None
    eos_ids: frozenset[int] = frozenset()
    reasoning: bool = False
    """R1 family: the chat template opens a `<think>` block; chat answers carry `reasoning_content` apart."""
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    """temperature / top_p from the base model's generation_config.json, for requests that leave them out."""
    context_length: int = 2048
    """Prompt plus generated tokens the model takes (its config's max_position_embeddings)."""
    labels: list[str] = field(default_factory=list)
    image_size: int = DEFAULT_IMAGE_SIZE
    frames: str = "middle"
    """The DICOM frame rule the training data was imported with (`--frames`): uploads are decoded the same way."""
    backend_reason: str = ""
    """Why this backend (e.g. "ONNX Runtime on the CPU because TensorRT engine: ..."), for /v1/models and logs."""
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0

    @property
    def version(self) -> str:
        return self.target.version

    @property
    def label(self) -> str:
        """`name@version`, the value of the X-Airlock-Model header."""
        return f"{self.name}@{self.target.version}"


def parse_run_option(text: str) -> RunSource:
    """`RUN` or `NAME=RUN` (the name clients put in "model"; default: the run id)."""
    name, sep, run_id = text.partition("=")
    if not sep:
        name, run_id = text, text
    if not name or not run_id:
        raise ServeError(f"--run {text!r} is not RUN or NAME=RUN", hint="e.g. --run qa-bot=lm-20250101-120000-abc123")
    return RunSource(name, run_id)


BACKENDS = ("auto", "pytorch")
"""auto: the fastest runtime the optimize stage prepared for this machine (TensorRT, ONNX Runtime CUDA/CPU),
PyTorch when the run was never optimized; pytorch: always PyTorch."""


def load_model(db: sqlite_utils.Database, keys: KeyOps, home: Path, name: str, target: Target, *,
               device: str = "cpu", backend: str = "auto", limits: ServeLimits | None = None) -> ServedModel:
    """Decrypt and load the run behind `target` into a ready backend.

    `limits`: what the server admits; a TensorRT engine whose profile cannot hold it is refused here, and a
    PyTorch or ONNX Runtime LM decodes up to `limits.max_batch` requests together (`appliance.serve.batching`)."""
    from appliance.train.runs import get_run

    if backend not in BACKENDS:
        raise ServeError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}", hint="use --backend auto")
    started = time.monotonic()
    run = get_run(db, target.run_id)
    if run.state != "succeeded":
        raise ServeError(f"run {run.id} is {run.state}; only a succeeded run can be served",
                         hint=f"see `airlock train show {run.id}`; serve another run or wait for it to finish")
    loader = _load_lm if run.kind == "lm" else _load_classifier
    # A batched LM decodes every request through the batch (a CPU genai export then loads no og.Model).
    batched = limits is not None and limits.max_batch > 1
    model = loader(db, keys, home, name, target, run, device, backend, batched)
    if limits is not None and model.kind == "lm" and model.backend.kind == "tensorrt":
        from appliance.optimize.tensorrt_engine import check_lm_profile
        from appliance.serve.limits import lm_rows_per_call

        check_lm_profile(model.backend.runner.profiles, context=model.context_length, run_id=run.id,
                         max_prompt_tokens=limits.max_prompt_tokens, max_new_tokens=limits.max_tokens,
                         rows=lm_rows_per_call(limits, model.backend.kind), max_batch=limits.max_batch)
    if limits is not None and model.kind == "lm" and limits.max_batch > 1:
        from appliance.serve.batching import BatchingLMBackend, batchable

        if batchable(model.backend):
            model.backend = BatchingLMBackend(model.backend, limits.max_batch)
    model.load_seconds = time.monotonic() - started
    return model


def _runtime(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, device: str,
             pytorch: Callable[[], Any], batched: bool = False) -> tuple[Any, str]:
    """(runner or PyTorch backend, why that one) from the optimize stage's runtime selection."""
    from appliance.optimize.engine_sidecar import MachineInfo
    from appliance.optimize.jobs import runtime_for_run

    # --device cpu keeps a GPU machine's GPU out of it: no TensorRT, no CUDA provider.
    machine = MachineInfo(None, None, None, None, None) if device == "cpu" else None
    index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    choice = runtime_for_run(db, keys, home, run, device=index, pytorch_runner=pytorch, machine=machine,
                             batched=batched)
    return choice.runner, choice.reason + "".join(f"; warning: {w}" for w in choice.warnings)


def _load_lm(db: sqlite_utils.Database, keys: KeyOps, home: Path, name: str, target: Target, run: Run,
             device: str, backend: str, batched: bool = False) -> ServedModel:
    from appliance.serve.backends import RunnerLMBackend, TorchLMBackend

    loaded: dict[str, Any] = {}

    def pytorch() -> TorchLMBackend:
        from appliance.train.artifacts import load_lm_adapter

        peft_model, loaded["tokenizer"] = load_lm_adapter(db, keys, home, run)
        model = peft_model.merge_and_unload()
        model.activation_checkpointing_disable()  # a recipe may have trained with it; it only slows inference
        model.config.use_cache = True
        loaded["generation_config"] = model.generation_config
        return TorchLMBackend(model, device)

    if backend == "pytorch":
        lm_backend, reason = pytorch(), "PyTorch (--backend pytorch)"
    else:
        runner, reason = _runtime(db, keys, home, run, device, pytorch, batched)
        lm_backend = runner if isinstance(runner, TorchLMBackend) else \
            RunnerLMBackend(runner, _kv_layout(run.base_model))
    tokenizer = loaded.get("tokenizer") or _tokenizer(run.base_model)
    eos = {tokenizer.eos_token_id}
    configured = getattr(loaded.get("generation_config") or _generation_config(run.base_model), "eos_token_id", None)
    eos.update(configured if isinstance(configured, list) else [configured])
    from appliance.serve.decoding import opens_reasoning

    return ServedModel(name, "lm", target, lm_backend, run.base_model, tokenizer=tokenizer,
                       eos_ids=frozenset(int(e) for e in eos if e is not None), backend_reason=reason,
                       reasoning=opens_reasoning(tokenizer), sampling_defaults=sampling_defaults(run.base_model),
                       context_length=_context_length(run.base_model))


SAMPLING_DEFAULTS = ("temperature", "top_p")


def sampling_defaults(base_model: str | Path) -> dict[str, float]:
    """The sampling values the model's authors set in generation_config.json (only those written there,
    as vLLM reads them: transformers' own defaults are not the authors'). DeepSeek-R1 distills: 0.6 / 0.95."""
    from appliance.base_models import resolve_base_model

    path = Path(base_model) if isinstance(base_model, Path) else resolve_base_model(base_model).path
    try:
        config = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {k: float(config[k]) for k in SAMPLING_DEFAULTS
            if isinstance(config.get(k), int | float) and not isinstance(config.get(k), bool)}


def _context_length(base_model: str) -> int:
    from transformers import AutoConfig

    from appliance.base_models import resolve_base_model

    config = AutoConfig.from_pretrained(resolve_base_model(base_model).path, local_files_only=True)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 1 else 2048


def _tokenizer(base_model: str) -> Any:
    from transformers import AutoTokenizer

    from appliance.base_models import resolve_base_model

    return AutoTokenizer.from_pretrained(resolve_base_model(base_model).path, local_files_only=True)


def _generation_config(base_model: str) -> Any:
    from transformers import GenerationConfig

    from appliance.base_models import resolve_base_model

    try:
        return GenerationConfig.from_pretrained(resolve_base_model(base_model).path, local_files_only=True)
    except OSError:  # no generation_config.json: the tokenizer's EOS is the only one
        return None


def _kv_layout(base_model: str) -> tuple[int, int, int]:
    from transformers import AutoConfig

    from appliance.base_models import resolve_base_model
    from appliance.optimize.onnx_export import kv_cache_layout

    return kv_cache_layout(AutoConfig.from_pretrained(resolve_base_model(base_model).path, local_files_only=True))


def _load_classifier(db: sqlite_utils.Database, keys: KeyOps, home: Path, name: str, target: Target, run: Run,
                     device: str, backend: str, batched: bool = False) -> ServedModel:
    from appliance.serve.backends import RunnerClassifierBackend, TorchClassifierBackend
    from appliance.train.artifacts import LABELS
    from appliance.vault.store import read_bytes

    def pytorch() -> TorchClassifierBackend:
        from appliance.train.artifacts import load_classifier_weights

        model, _ = load_classifier_weights(db, keys, home, run)
        return TorchClassifierBackend(model, device)

    labels = json.loads(read_bytes(db, keys, home, run.artifact or "", LABELS))["labels"]
    if backend == "pytorch":
        classifier, reason = pytorch(), "PyTorch (--backend pytorch)"
    else:
        runner, reason = _runtime(db, keys, home, run, device, pytorch)
        classifier = runner if isinstance(runner, TorchClassifierBackend) else \
            RunnerClassifierBackend(runner, _channels(run.base_model))
    return ServedModel(name, "classifier", target, classifier, run.base_model, labels=list(labels),
                       image_size=training_image_size(db, run), frames=training_frames(db, run),
                       backend_reason=reason)


def _channels(base_model: str) -> int:
    from transformers import AutoConfig

    from appliance.base_models import resolve_base_model

    config = AutoConfig.from_pretrained(resolve_base_model(base_model).path, local_files_only=True)
    return int(getattr(config, "num_channels", 3))


def training_image_size(db: sqlite_utils.Database, run: Run) -> int:
    """The --image-size the run's dataset version was imported with (images are resized to it)."""
    size = _import_option(db, run, "image_size")
    return int(size) if isinstance(size, int) and 8 <= size <= 4096 else DEFAULT_IMAGE_SIZE


def training_frames(db: sqlite_utils.Database, run: Run) -> str:
    """The --frames rule the run's dataset version was imported with ('middle' for imports before it existed).

    `each` trained on single frames: an upload gives its middle frame, as with `middle`."""
    from appliance.data.dicom_pixels import FrameRule

    frames = _import_option(db, run, "frames")
    try:
        rule = FrameRule.parse(frames) if isinstance(frames, str) else FrameRule()
    except ValueError:
        rule = FrameRule()
    return rule.to_text() if rule.mode == "stack" else "middle"


def _import_option(db: sqlite_utils.Database, run: Run, name: str) -> Any:
    row = db.execute("SELECT jobs.params FROM dataset_versions JOIN jobs ON jobs.id = dataset_versions.job_id"
                     " WHERE dataset_versions.dataset_id = ? AND dataset_versions.version = ?",
                     [run.dataset_id, run.dataset_version]).fetchone()
    try:
        return json.loads(row[0])["options"].get(name) if row else None
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
