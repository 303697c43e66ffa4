"""Fake quantization: the INT8 arithmetic TensorRT will do, calibration, and what is (not) quantized."""

from __future__ import annotations

import pytest
import torch

from appliance.optimize.errors import OptimizeError
from appliance.optimize.fake_quant import (
    QuantConv2d,
    QuantLinear,
    TensorQuantizer,
    calibrate,
    fold_batch_norms,
    insert_fake_quant,
    quantizers,
)
from appliance.optimize.recipe import QuantRecipe, load_quant_recipe


def test_per_tensor_quantization_is_symmetric_int8_with_scale_amax_over_127():
    quantizer = TensorQuantizer()
    quantizer.set_amax(2.54)
    assert float(quantizer.scale) == pytest.approx(0.02) and int(quantizer.zero_point) == 0
    x = torch.tensor([-3.0, -2.56, -0.011, 0.0, 0.009, 0.031, 1.0, 2.54, 9.0])
    expected = (x / 0.02).round().clamp(-128, 127) * 0.02  # round half to even, like ONNX QuantizeLinear
    assert torch.allclose(quantizer(x), expected, atol=1e-6)
    assert float(quantizer(torch.tensor([9.0]))) == pytest.approx(127 * 0.02)
    assert float(quantizer(torch.tensor([-9.0]))) == pytest.approx(-128 * 0.02)


def test_weights_are_per_output_channel_and_never_get_a_zero_scale():
    linear = torch.nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.1, 0.2, -0.3, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    quant = QuantLinear(linear)
    assert quant.weight is linear.weight  # shares the parameter: QAT trains the real weights
    scale = quant.weight_quantizer.scale
    assert scale.shape == (3,) and torch.allclose(scale[:2], torch.tensor([2.0, 0.3]) / 127)
    assert float(scale[2]) > 0  # an all-zero channel: TensorRT needs a positive scale anyway
    quant.input_quantizer.set_amax(1.0)
    x = torch.randn(5, 4)
    expected = torch.nn.functional.linear(quant.input_quantizer(x), quant.weight_quantizer(linear.weight), linear.bias)
    assert torch.allclose(quant(x), expected)
    assert not torch.allclose(quant(x), linear(x), atol=1e-6)  # it really quantizes


def test_percentile_calibration_clips_outliers_and_max_does_not():
    data = [torch.cat([torch.linspace(-1, 1, 10_000), torch.tensor([50.0])]) for _ in range(3)]
    for method, low, high in (("max", 50.0, 50.0), ("percentile", 0.9, 1.1)):
        model = torch.nn.Sequential(torch.nn.Linear(1, 1))
        insert_fake_quant(model, QuantRecipe())
        calibrate(model, [d[:, None] for d in data], lambda m, b: m(b),
                  QuantRecipe(calibration=method, percentile=99.9))
        amax = float(model[0].input_quantizer.amax)
        assert low - 1e-3 <= amax <= high + 1e-3, (method, amax)


def test_histogram_grows_with_later_larger_batches():
    quantizer = TensorQuantizer()
    quantizer.calibrating = True
    quantizer(torch.linspace(0, 1, 1000))
    quantizer(torch.linspace(0, 4, 1000))  # range x4: the first batch's counts move into wider bins
    assert quantizer.finish_calibration("percentile", 50.0)
    # The median of both batches together: below x <= 1 lie 1000x + 250x of the 2000 values, so x = 0.8.
    assert float(quantizer.amax) == pytest.approx(0.8, abs=0.01)


def test_router_and_lm_head_stay_float_and_bn_folds_first():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convolution = torch.nn.Conv2d(1, 2, 3, bias=False)
            self.normalization = torch.nn.BatchNorm2d(2)

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(4, 2)       # an MoE router (DeepSeek's mlp.gate)
            self.gate_proj = torch.nn.Linear(4, 4)  # a dense MLP projection

    model = torch.nn.Module()
    model.block, model.mlp, model.lm_head = Block(), Mlp(), torch.nn.Linear(4, 8)
    with torch.no_grad():
        model.block.normalization.running_mean.fill_(0.5)
    assert fold_batch_norms(model) == 1 and isinstance(model.block.normalization, torch.nn.Identity)
    replaced = insert_fake_quant(model, QuantRecipe())
    assert replaced == ["block.convolution", "mlp.gate_proj"]
    assert isinstance(model.block.convolution, QuantConv2d) and type(model.mlp.gate) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear
    head = torch.nn.Module()
    head.lm_head = torch.nn.Linear(4, 8)
    assert insert_fake_quant(head, QuantRecipe(quantize_lm_head=True)) == ["lm_head"]


def test_calibration_that_misses_a_layer_is_an_error():
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 2), "unused": torch.nn.Linear(2, 2)})
    insert_fake_quant(model, QuantRecipe())
    with pytest.raises(OptimizeError, match=r"calibration never reached 1 quantized input\(s\), first: "
                                            r"unused\.input_quantizer"):
        calibrate(model, [torch.ones(3, 2)], lambda m, b: m["used"](b), QuantRecipe())
    with pytest.raises(OptimizeError, match="no calibration data"):
        calibrate(model, [], lambda m, b: m["used"](b), QuantRecipe())
    assert len(quantizers(model)) == 4


def test_recipe_is_validated_and_sizes_qat():
    recipe = QuantRecipe()
    assert recipe.qat_steps(200) == 20 and recipe.qat_steps(10) == 4 and recipe.qat_lr(2e-4) == pytest.approx(2e-6)
    with pytest.raises(OptimizeError, match="calibration = 'entropy' is not one of max, percentile"):
        QuantRecipe(calibration="entropy")
    with pytest.raises(OptimizeError, match=r"qat_step_fraction = 2 is outside 0\.001\.\.1"):
        QuantRecipe(qat_step_fraction=2)


def test_recipe_file_is_read_strictly(tmp_path):
    path = tmp_path / "quant.toml"
    path.write_text('calibration = "max"\nqat = false\n', encoding="utf-8")
    assert load_quant_recipe(path) == QuantRecipe(calibration="max", qat=False)
    assert load_quant_recipe(None) == QuantRecipe()
    path.write_text("calibraton = 'max'\n", encoding="utf-8")
    with pytest.raises(OptimizeError, match=r"quant\.toml: unknown field\(s\) calibraton"):
        load_quant_recipe(path)
    path.write_text("percentile = 50\n", encoding="utf-8")
    with pytest.raises(OptimizeError, match=r"quant\.toml: quantization recipe: percentile = 50 is outside 90\.\.100"):
        load_quant_recipe(path)
