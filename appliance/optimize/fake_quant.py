"""Fake quantization in PyTorch, shaped the way TensorRT wants INT8: what QAT trains and what exports to Q/DQ.

    fold_batch_norms(model)                        # CNNs: BN into the convolution before quantizing
    names = insert_fake_quant(model, recipe)       # Linear/Conv2d -> QuantLinear/QuantConv2d (+ residual quantizers)
    calibrate(model, batches, run_batch, recipe)   # activation ranges from real data (max or percentile)

Rules (TensorRT explicit quantization): symmetric INT8 (zero point 0, range [-128, 127],
scale = amax / 127), weights per output channel (axis 0), activations per tensor, and the
quantizers sit on the *inputs* of weighted ops (the activation and the weight), never on their
outputs. `torch.fake_quantize_*` exports as ONNX QuantizeLinear/DequantizeLinear with the scale and
the zero point as buffers, so they become constant initializers. The MoE router is never
quantized: a small error there changes which experts run.

This module subclasses torch.nn.Module, so importing it imports torch: the rest of
`appliance.optimize` imports it inside the functions that need it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from appliance.optimize.errors import OptimizeError
from appliance.optimize.recipe import QuantRecipe

INT8_MIN, INT8_MAX = -128, 127
HISTOGRAM_BINS = 2048
MIN_SCALE = 1e-8
"""TensorRT needs strictly positive scales; an all-zero channel still gets a tiny positive one."""
ROUTER = re.compile(r"(^|\.)mlp\.gate$")


class TensorQuantizer(nn.Module):
    """Symmetric INT8 fake quantization of one tensor: per tensor, or per channel along axis 0."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()
        self.per_channel = channels is not None
        shape = (channels,) if channels is not None else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.enabled = False
        self.calibrating = False
        self._amax: float | None = None
        self._histogram: Any = None
        self._histogram_range = 0.0

    def set_amax(self, amax: Any) -> None:
        amax = torch.as_tensor(amax, dtype=torch.float32, device=self.scale.device)
        self.scale.copy_((amax / INT8_MAX).clamp(min=MIN_SCALE).reshape(self.scale.shape))
        self.enabled = True

    @property
    def amax(self) -> Any:
        return self.scale * INT8_MAX

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x.detach())
            return x
        if not self.enabled:
            return x
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, 0, INT8_MIN, INT8_MAX)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, INT8_MIN, INT8_MAX)

    def _observe(self, x: Any) -> None:
        values = x.float().abs().flatten()
        if values.numel() == 0:
            return
        top = float(values.max())
        self._amax = top if self._amax is None else max(self._amax, top)
        # Percentile calibration: a histogram of |x| whose range grows with the largest value seen;
        # old counts move into the wider bins by their centres (bounded memory, any number of batches).
        new_range = max(self._amax, MIN_SCALE)
        if self._histogram is None:
            self._histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)
            self._histogram_range = new_range
        elif new_range > self._histogram_range:
            centres = (torch.arange(HISTOGRAM_BINS, dtype=torch.float64) + 0.5) * (
                self._histogram_range / HISTOGRAM_BINS)
            index = (centres / new_range * HISTOGRAM_BINS).long().clamp(max=HISTOGRAM_BINS - 1)
            self._histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64).index_add_(0, index,
                                                                                          self._histogram)
            self._histogram_range = new_range
        self._histogram += torch.histc(values.double().cpu(), HISTOGRAM_BINS, 0, self._histogram_range)

    def finish_calibration(self, method: str, percentile: float) -> bool:
        """Set the scale from what was observed; False when no data reached this quantizer."""
        self.calibrating = False
        if self._amax is None:
            return False
        amax = self._amax
        if method == "percentile" and self._histogram is not None and percentile < 100:
            cumulative = torch.cumsum(self._histogram, 0)
            index = int(torch.searchsorted(cumulative, cumulative[-1] * percentile / 100))
            amax = min(self._amax, (index + 1) * self._histogram_range / HISTOGRAM_BINS)
        self.set_amax(amax)
        self._histogram, self._amax = None, None
        return True

    def extra_repr(self) -> str:
        kind = "per-channel axis 0" if self.per_channel else "per-tensor"
        return f"{kind}, {'on' if self.enabled else 'off'}"


def _weight_quantizer(module: nn.Linear | nn.Conv2d, channels: int) -> TensorQuantizer:
    quantizer = TensorQuantizer(channels).to(module.weight.device)
    quantizer.set_amax(module.weight.detach().abs().amax(dim=tuple(range(1, module.weight.ndim))))
    return quantizer


class QuantLinear(nn.Module):
    """nn.Linear with fake-quantized input (per tensor) and weight (per output channel). Shares the parameters."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.input_quantizer = TensorQuantizer().to(linear.weight.device)
        self.weight_quantizer = _weight_quantizer(linear, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # QAT: the weight range follows the weights as they train
            refresh_weight_range(self)
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Module):
    """nn.Conv2d with fake-quantized input (per tensor) and weight (per output channel). Shares the parameters."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise OptimizeError(f"a Conv2d with padding_mode={conv.padding_mode!r} cannot be quantized",
                                hint="only zero-padded convolutions export to TensorRT Q/DQ")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight, self.bias = conv.weight, conv.bias
        self.input_quantizer = TensorQuantizer().to(conv.weight.device)
        self.weight_quantizer = _weight_quantizer(conv, conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            refresh_weight_range(self)
        return F.conv2d(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


def refresh_weight_range(module: QuantLinear | QuantConv2d) -> None:
    """Per-channel weight amax from the current weights (after QAT steps, before export)."""
    with torch.no_grad():
        weight = module.weight.detach()
        module.weight_quantizer.set_amax(weight.abs().amax(dim=tuple(range(1, weight.ndim))))


def fold_batch_norms(model: Any) -> int:
    """Fold each BatchNorm2d into the Conv2d before it (transformers' `convolution` + `normalization` pairs).

    TensorRT cannot fold a BatchNorm into weights that are already quantized, so the fold happens
    before quantization: the scales are then calibrated on the weights that will actually run.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    folded = 0
    for module in list(model.modules()):
        conv, norm = getattr(module, "convolution", None), getattr(module, "normalization", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            module.convolution = fuse_conv_bn_eval(conv, norm)
            module.normalization = nn.Identity()
            folded += 1
    return folded


def _should_skip(name: str, recipe: QuantRecipe) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if ROUTER.search(name) or leaf == "gate" or "router" in leaf:
        return True
    return leaf == "lm_head" and not recipe.quantize_lm_head


def insert_fake_quant(model: Any, recipe: QuantRecipe) -> list[str]:
    """Replace Linear/Conv2d layers in place by their fake-quantized versions; returns the names replaced."""
    replaced: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if _should_skip(full, recipe):
                continue
            if type(child) is nn.Linear:
                setattr(parent, child_name, QuantLinear(child))
                replaced.append(full)
            elif type(child) is nn.Conv2d:
                setattr(parent, child_name, QuantConv2d(child))
                replaced.append(full)
    if recipe.residual_quantizers:
        for module in list(model.modules()):
            # A residual block (transformers ResNet layers): `layer(x) + shortcut(x)`. Quantizing the
            # shortcut's output lets TensorRT fuse the add into the block's last convolution in INT8.
            if hasattr(module, "shortcut") and hasattr(module, "layer") and isinstance(module.shortcut, nn.Module):
                module.shortcut = nn.Sequential(module.shortcut, TensorQuantizer())
    if not replaced:
        raise OptimizeError("found no Linear or Conv2d layer to quantize in this model",
                            hint="INT8 export supports transformers causal LMs and CNN/ViT image classifiers")
    return replaced


def quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def activation_quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(name, q) for name, q in quantizers(model) if not q.per_channel]


def is_fake_quantized(model: Any) -> bool:
    return any(q.enabled for _, q in quantizers(model))


def calibrate(model: Any, batches: Iterable[Any], run_batch: Callable[[Any, Any], Any], recipe: QuantRecipe) -> int:
    """Run up to `recipe.calibration_batches` batches in eval mode, observing activations; returns batches used.

    Activations are observed unquantized (the float model's ranges); weights keep their
    per-channel max ranges. A quantizer that no batch reached is an error, not a silent float layer.
    """
    targets = activation_quantizers(model)
    for _, quantizer in targets:
        quantizer.calibrating = True
    was_training = model.training
    model.eval()
    used = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if used >= recipe.calibration_batches:
                    break
                run_batch(model, batch)
                used += 1
    finally:
        missed = [name for name, q in targets if not q.finish_calibration(recipe.calibration, recipe.percentile)]
        model.train(was_training)
    if used == 0:
        raise OptimizeError("no calibration data: the calibration split is empty",
                            hint="import more data or lower the validation share of the dataset's splits")
    if missed:
        raise OptimizeError(f"calibration never reached {len(missed)} quantized input(s), first: {missed[0]}",
                            hint="calibrate with inputs that run the whole model (e.g. every image size it serves)")
    return used
