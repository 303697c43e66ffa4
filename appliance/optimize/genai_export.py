"""Causal LM export on onnxruntime-genai's model builder: fp32, int8, int4 weight-only (CPU); fp16, bf16, int4 (CUDA).

    with scratch_dir(home, "job-42") as work:
        export = build_genai_model(model, tokenizer, work, variant="genai-int4", recipe=QuantRecipe())
        export.path / "model.onnx", export.path / "model.onnx.data", export.path / "genai_config.json"

The builder (`onnxruntime_genai.models.builder`, maintained with ONNX Runtime) reads a Hugging Face
checkpoint folder and writes a GroupQueryAttention graph with the KV cache, MatMulNBits weight-only
int4/int8 (RTN or k_quant, block size and accuracy level from the recipe) and the weights as
external data: no protobuf 2 GiB limit, so a 7B model exports. Its runtime (`og.Model`,
`og.Generator`) decodes: KV cache, sampling and batches are its job (`appliance.serve.genai_backend`).

It covers Qwen2 (DeepSeek-R1-Distill-Qwen) and Llama (deepseek-llm, deepseek-coder) here; MoE models
(DeepSeek-V2/V3) stay PyTorch. Here the LoRA adapter is merged into the weights before the build (one
graph, no adapter inputs per step); `genai_adapters` builds the other route, a base with a LoRA branch plus
an `.onnx_adapter` file per version, which genai-int4 of a LoRA run takes (docs/adr/0016; genai_jobs chooses).

The builder reads and writes files, so this is the one stage that puts plaintext weights on disk:
under `scratch_dir` (a 0700 folder of AIRLOCK_HOME, `AIRLOCK_SCRATCH` to move it), removed when the
stage ends, whatever happens; the caller encrypts the files it keeps into the vault.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.optimize.errors import ExportError, ExportRefusedError

GENAI_VARIANTS: dict[str, tuple[str, str]] = {
    "genai-fp32": ("fp32", "cpu"),
    "genai-int8": ("int8", "cpu"),
    "genai-int4": ("int4", "cpu"),
    "genai-fp16-cuda": ("fp16", "cuda"),
    "genai-bf16-cuda": ("bf16", "cuda"),
    "genai-int4-cuda": ("int4", "cuda"),
}
"""variant -> (builder precision, builder execution provider). The builder's valid CPU precisions are fp32, int8
and int4 (no fp16 CPU kernels); CUDA takes fp16, bf16, int4 and int8."""
FLOAT_GENAI = ("genai-fp32", "genai-fp16-cuda", "genai-bf16-cuda")
FAMILIES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
"""Architectures the builder covers and we validate; others (MoE: DeepSeek-V2/V3) stay PyTorch."""
MODEL_FILES = ("model.onnx", "model.onnx.data", "genai_config.json")
"""What `og.Model` needs; tokenization stays ours (the base model's tokenizer and chat template)."""
BUILD_TIMEOUT_S = 6 * 3600


@dataclass
class GenAIExport:
    """A built model folder (plaintext, inside a scratch dir) and what it is."""

    variant: str
    path: Path
    files: dict[str, str] = field(default_factory=dict)
    """file name -> SHA-256 of its plaintext."""
    options: dict[str, Any] = field(default_factory=dict)
    """The builder options used (precision, execution provider, extra options)."""

    @property
    def bytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in self.files)

    @property
    def sha256(self) -> str:
        """One digest over the file digests (name order): what the report records and serving checks."""
        return manifest_sha256(self.files)


def manifest_sha256(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}\0{files[name]}\n" for name in sorted(files)).encode()).hexdigest()


def is_genai(variant: str) -> bool:
    return variant in GENAI_VARIANTS


def vault_name(variant: str, file: str) -> str:
    """The vault file name of one file of a genai export (vault names have no '/')."""
    return f"{variant}.{file}"


def genai_refusal(config: Any, variant: str) -> str | None:
    """Why `variant` cannot be built for this model (one line), or None."""
    from appliance.optimize.onnx_export import MOE_MODEL_TYPES, architecture

    name = architecture(config)
    if getattr(config, "model_type", "") in MOE_MODEL_TYPES or name not in FAMILIES:
        return (f"{name} is not a family the onnxruntime-genai builder covers here ({', '.join(FAMILIES)}); "
                "it is served with PyTorch")
    if importlib_missing("onnxruntime_genai"):
        return "onnxruntime-genai is not installed (it is part of the appliance extra)"
    return None


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def scratch_root(home: Path) -> Path:
    return Path(os.environ.get("AIRLOCK_SCRATCH") or home / "scratch")


@contextlib.contextmanager
def scratch_dir(home: Path, name: str) -> Iterator[Path]:
    """A private (0700) folder for plaintext the builder or the runtime must read from disk; removed on exit.

    A folder of the same name left by a killed job is removed first."""
    root = scratch_root(home)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def builder_options(variant: str, recipe: Any, *, adapter: Path | None = None,
                    keep_float: Sequence[str] = ()) -> tuple[str, str, list[str]]:
    """(precision, execution provider, extra options as KEY=VALUE) for the builder, from the quantization recipe.

    `adapter`: a peft folder the builder adds as a LoRA branch (genai_adapters); `keep_float`: node names left
    out of weight-only quantization (that branch)."""
    precision, provider = GENAI_VARIANTS[variant]
    extra = ["hf_token=false", "hf_remote=false"]
    if adapter is not None:
        extra.append(f"adapter_path={adapter}")
    if precision in ("int4", "int8"):
        extra += [f"block_size={recipe.int4_block_size}", f"algo_config={recipe.int4_algo}",
                  f"is_symmetric={'true' if recipe.int4_symmetric else 'false'}"]
        if provider == "cpu":
            extra.append(f"accuracy_level={recipe.int4_accuracy_level}")
        excluded = ([] if recipe.quantize_lm_head else ["/lm_head/MatMul"]) + list(keep_float)
        if excluded:
            extra.append(f"nodes_to_exclude={','.join(excluded)}")
    return precision, provider, extra


def save_checkpoint(model: Any, tokenizer: Any, folder: Path) -> None:
    """The merged model as a Hugging Face folder the builder reads (safetensors, config, tokenizer)."""
    import torch

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with torch.no_grad():
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def build_genai_model(model: Any, tokenizer: Any, work: Path, *, variant: str, recipe: Any,
                      checkpoint: Path | None = None, log: Any = None, adapter: Path | None = None,
                      keep_float: Sequence[str] = ()) -> GenAIExport:
    """Build `variant` of a (LoRA-merged) causal LM into `work/<variant>` with the builder, in a child process.

    The child is the builder's own command line (`python -m onnxruntime_genai.models.builder`): it loads the
    checkpoint again, so it runs apart from this process and returns its memory when done. `checkpoint`: a
    folder already written by `save_checkpoint` (several variants share one). `adapter`, `keep_float`: see
    `builder_options` (the adapter-file route of genai_adapters)."""
    if variant not in GENAI_VARIANTS:
        raise ExportError(f"unknown genai variant {variant!r}", hint=f"use one of {', '.join(GENAI_VARIANTS)}")
    refusal = genai_refusal(model.config, variant)
    if refusal:
        raise ExportRefusedError(refusal, hint="serve this model with PyTorch")
    if checkpoint is None:
        checkpoint = work / "checkpoint"
        save_checkpoint(model, tokenizer, checkpoint)
    out = work / variant
    shutil.rmtree(out, ignore_errors=True)
    precision, provider, extra = builder_options(variant, recipe, adapter=adapter, keep_float=keep_float)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
               "-p", precision, "-e", provider, "-c", str(work / "builder-cache"), "--extra_options", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise ExportError(f"the onnxruntime-genai builder did not finish {variant} in {BUILD_TIMEOUT_S} s",
                          hint="check the machine's load and memory; retry with fewer variants") from exc
    missing = [name for name in MODEL_FILES if not (out / name).is_file()]
    if done.returncode != 0 or missing:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "Error" in line or "Exception" in line),
                    lines[-1] if lines else f"exit status {done.returncode}")
        raise ExportError(f"the onnxruntime-genai builder failed on {variant}: {last.strip()[:300]}",
                          hint="run with --debug for the builder's output; the float PyTorch model keeps serving")
    if log is not None:
        log(f"built {variant} with onnxruntime-genai ({precision}, {provider})")
    files = {name: _sha256_file(out / name) for name in MODEL_FILES}
    shown = [e if not e.startswith("nodes_to_exclude=") or len(e) < 200 else f"{e[:120]}... ({e.count(',') + 1} nodes)"
             for e in extra[2:] if not e.startswith("adapter_path=")]
    return GenAIExport(variant, out, files, {"precision": precision, "execution_provider": provider,
                                             "extra_options": shown})


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_export_files(folder: Path, files: dict[str, str]) -> None:
    """Every file of an export present with the SHA-256 its report recorded (before `og.Model` reads it)."""
    for name, expected in files.items():
        path = folder / name
        if not path.is_file() or _sha256_file(path) != expected:
            raise ExportError(f"the genai export file {name} is not the one its optimize report validated",
                              hint="an optimize job was interrupted while writing; run `airlock optimize RUN` again")
