"""The quantization recipe: how to calibrate, how long to fine-tune with fake quantization, what stays in float.

    # quant.toml (every field optional; these are the defaults)
    calibration = "percentile"
    percentile = 99.99
    qat_step_fraction = 0.1
    qat_lr_fraction = 0.01

    recipe = load_quant_recipe(Path("quant.toml"))   # or QuantRecipe(...)

Defaults follow the usual INT8 practice for TensorRT: symmetric INT8, per-channel weights,
per-tensor activations, calibrated on a few batches, then quantization-aware fine-tuning for about
10% of the original training steps at about 1% of its learning rate. PTQ is the same recipe
without the fine-tuning; both are always reported against the float model.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from appliance.optimize.errors import OptimizeError

CALIBRATIONS = ("max", "percentile")
INT4_ALGOS = ("rtn", "k_quant")
"""Weight-only methods of the onnxruntime-genai builder (data-free: RTN, and k_quant's searched scales)."""
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class QuantRecipe:
    calibration: str = "percentile"
    """Activation range: "max" (largest |x| seen) or "percentile" (clips rare outliers; better for LMs)."""
    percentile: float = 99.99
    """Percentile of |x| used as the range when calibration = "percentile" (90-100)."""
    calibration_batches: int = 16
    """Batches of held-in data run through the model to calibrate activation ranges (1-10,000)."""
    qat: bool = True
    """Fine-tune with fake quantization after calibration (QAT); False stops at PTQ."""
    qat_step_fraction: float = 0.1
    """QAT steps as a fraction of the original training run's steps (0.001-1)."""
    qat_lr_fraction: float = 0.01
    """QAT learning rate as a fraction of the original training run's peak learning rate (0.0001-1)."""
    min_qat_steps: int = 4
    """At least this many QAT steps, however short the original run (1-100,000)."""
    quantize_lm_head: bool = False
    """Also quantize the LM head (smaller, usually a little less accurate). The MoE router never is."""
    residual_quantizers: bool = True
    """CNNs: quantize the shortcut branch of residual adds, so TensorRT can fuse the add into the convolution."""
    seed: int = 0
    """Seeds the QAT data order and augmentation."""
    int4_block_size: int = 32
    """genai int4/int8 weight-only: weights per scale (16, 32, 64, 128 or 256); larger is smaller and coarser."""
    int4_algo: str = "rtn"
    """genai int4/int8 weight-only method: "rtn" (round to nearest) or "k_quant" (searched scales, no data)."""
    int4_accuracy_level: int = 4
    """genai CPU int4/int8: the MatMul's compute type (4 = int8 activations, fastest; 1 = fp32, most exact)."""
    int4_symmetric: bool = True
    """genai int4/int8: symmetric weights (int4); False = asymmetric (uint4 with zero points)."""
    max_perplexity_increase: float = 0.05
    """Quality gate, LMs: a quantized variant serves only if its perplexity is at most this much above the float
    model's (0.05 = +5%) on the held-out split."""
    max_accuracy_drop: float = 0.01
    """Quality gate, classifiers: a quantized variant serves only if its accuracy and ROC AUC are at most this much
    below the float model's (0.01 = 1 point)."""

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise OptimizeError(f"quantization recipe: calibration = {self.calibration!r} is not one of "
                                f"{', '.join(CALIBRATIONS)}", hint='use "max" or "percentile"')
        checks = [("percentile", self.percentile, 90.0, 100.0),
                  ("calibration_batches", self.calibration_batches, 1, 10_000),
                  ("qat_step_fraction", self.qat_step_fraction, 0.001, 1.0),
                  ("qat_lr_fraction", self.qat_lr_fraction, 0.0001, 1.0),
                  ("min_qat_steps", self.min_qat_steps, 1, 100_000),
                  ("int4_accuracy_level", self.int4_accuracy_level, 0, 4),
                  ("max_perplexity_increase", self.max_perplexity_increase, 0.0, 10.0),
                  ("max_accuracy_drop", self.max_accuracy_drop, 0.0, 1.0)]
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise OptimizeError(f"quantization recipe: {name} = {value!r} is outside {low:g}..{high:g}",
                                    hint=f"pick a number between {low:g} and {high:g}")

        if self.int4_block_size not in BLOCK_SIZES or isinstance(self.int4_block_size, bool):
            raise OptimizeError(f"quantization recipe: int4_block_size = {self.int4_block_size!r} is not one of "
                                f"{', '.join(map(str, BLOCK_SIZES))}", hint="use 32 (the builder's default)")
        if self.int4_algo not in INT4_ALGOS:
            raise OptimizeError(f"quantization recipe: int4_algo = {self.int4_algo!r} is not one of "
                                f"{', '.join(INT4_ALGOS)}", hint='use "rtn" or "k_quant"')
        for name in ("qat", "quantize_lm_head", "residual_quantizers", "int4_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise OptimizeError(f"quantization recipe: {name} = {getattr(self, name)!r} is not true or false",
                                    hint=f"write {name} = true or {name} = false")

    def qat_steps(self, original_steps: int) -> int:
        return max(self.min_qat_steps, round(original_steps * self.qat_step_fraction))

    def qat_lr(self, original_lr: float) -> float:
        return original_lr * self.qat_lr_fraction

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_quant_recipe(path: Path | None) -> QuantRecipe:
    """Read a quantization recipe TOML file (None = all defaults). Unknown keys are refused; errors name the file."""
    if path is None:
        return QuantRecipe()
    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptimizeError(f"cannot read quantization recipe {path}: {exc.strerror}", hint="check the path") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OptimizeError(f"quantization recipe {path} is not valid TOML: {exc}",
                            hint="fix the line named above") from exc
    return quant_recipe_from(values, str(path))


def quant_recipe_from(values: dict, source: str) -> QuantRecipe:
    """A recipe from field values (a TOML file's, a task's stored recipe): unknown fields are refused and every
    error is prefixed with `source`."""
    known = {f.name for f in fields(QuantRecipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptimizeError(f"{source}: unknown field(s) {', '.join(unknown)}",
                            hint=f"known fields: {', '.join(sorted(known))}")
    try:
        return QuantRecipe(**values)
    except OptimizeError as exc:
        raise OptimizeError(f"{source}: {exc.message}", hint=exc.hint) from None
