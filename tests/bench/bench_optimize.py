"""INT8 on the CPU: what QAT + ONNX Runtime buys over PyTorch eager, and what it costs in accuracy/perplexity.

    .venv/bin/python tests/bench/bench_optimize.py [--steps 60] [--repeats 30]

Classifier (tiny-resnet-cls trained on disc/square phantoms, 32x32): latency (batch 1) and throughput
(batch 64) of the QAT-INT8 ONNX model on ONNX Runtime CPU vs the FP32 ONNX model vs PyTorch FP32
eager (goal: INT8 >= 2x eager), and accuracy float vs PTQ vs QAT (PyTorch fake quant and the INT8
ONNX model). Language model (tiny-deepseek-r1): held-out perplexity float vs PTQ vs QAT, and greedy
decode tokens/s through the ONNX KV cache. Ratios come from one run on this machine; never fails on time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

LABELS = ["normal", "abnormal"]


def timed(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_classifier(steps: int, repeats: int) -> None:
    import torch

    from appliance.base_models import resolve_base_model
    from appliance.optimize.onnx_export import export_classifier_onnx
    from appliance.optimize.quantize import quantize_classifier
    from appliance.optimize.recipe import QuantRecipe
    from appliance.optimize.runners import OrtRunner, ort_session
    from appliance.train.classifier import ClassifierRecipe, load_classifier, train_classifier
    from tests.appliance.optimize.conftest import phantoms

    train, val, test = phantoms(256, seed=1), phantoms(64, seed=2), phantoms(256, seed=3)
    base = resolve_base_model("tiny-resnet-cls")
    result = train_classifier(base, train, val, ClassifierRecipe(max_steps=steps, batch_size=16, eval_every=steps,
                                                                 lr=3e-3), labels=LABELS)

    def trained() -> torch.nn.Module:
        model = load_classifier(base, len(LABELS), seed=0)
        model.load_state_dict(result.state_dict)
        return model.eval().requires_grad_(False)

    float_model = trained()
    ptq = quantize_classifier(trained(), train=train, val=test, labels=LABELS, recipe=QuantRecipe(qat=False),
                              original_steps=steps, original_lr=3e-3)
    qat = quantize_classifier(trained(), train=train, val=test, labels=LABELS, recipe=QuantRecipe(),
                              original_steps=steps, original_lr=3e-3)
    fp32_onnx = export_classifier_onnx(float_model, variant="fp32", image_shape=(1, 32, 32))
    int8_onnx = export_classifier_onnx(qat.model, variant="int8", image_shape=(1, 32, 32))
    runners = {"onnx fp32": OrtRunner(ort_session(fp32_onnx)), "onnx int8": OrtRunner(ort_session(int8_onnx))}

    truth = test[1].numpy()
    int8_accuracy = float((runners["onnx int8"].run({"pixel_values": test[0].float().numpy()})["logits"].argmax(1)
                           == truth).mean())
    print("classifier accuracy on 256 held-out phantoms")
    print(f"  float {qat.report['float']['accuracy']:.3f}   PTQ {ptq.report['ptq']['accuracy']:.3f}   "
          f"QAT {qat.report['qat']['accuracy']:.3f}   QAT INT8 ONNX on ORT {int8_accuracy:.3f}")
    print(f"  ONNX size: fp32 {len(fp32_onnx) / 1024:.0f} KiB, int8 {len(int8_onnx) / 1024:.0f} KiB")

    for label, batch in (("latency, batch 1", 1), ("throughput, batch 64", 64), ("throughput, batch 256", 256)):
        pixels = torch.rand(batch, 1, 32, 32)
        array = pixels.numpy()
        with torch.inference_mode():
            eager = timed(lambda pixels=pixels: float_model(pixel_values=pixels), repeats)
        times = {"pytorch fp32 eager": eager}
        for name, runner in runners.items():
            times[name] = timed(lambda runner=runner, array=array: runner.run({"pixel_values": array}), repeats)
        print(f"classifier {label}:")
        for name, seconds in times.items():
            print(f"  {name:<20} {seconds * 1000:8.3f} ms   {batch / seconds:10.0f} images/s   "
                  f"{eager / seconds:5.2f}x eager")
        print(f"  int8 vs fp32 ONNX: {times['onnx fp32'] / times['onnx int8']:.2f}x   "
              f"int8 ONNX vs eager: {eager / times['onnx int8']:.2f}x (goal >= 2x)")


def bench_language_model(repeats: int) -> None:
    import torch

    from appliance.base_models import load_causal_lm, resolve_base_model
    from appliance.optimize.onnx_export import export_causal_lm_onnx, kv_cache_layout
    from appliance.optimize.quantize import quantize_causal_lm
    from appliance.optimize.recipe import QuantRecipe
    from appliance.optimize.runners import OrtRunner, greedy_decode, ort_session
    from appliance.train.lm import encode_records, make_batches
    from appliance.train.recipe import LoraRecipe
    from tests.appliance.optimize.conftest import corpus_texts

    model, tokenizer = load_causal_lm(resolve_base_model("tiny-deepseek-r1"))
    texts = corpus_texts()
    recipe = LoraRecipe(batch_size=2, max_length=128)

    def batches(records: list[str]) -> list[dict]:
        examples = encode_records(tokenizer, [{"text": t} for t in records], recipe.max_length, "bench")
        return [b.tensors() for b in make_batches(examples, recipe, tokenizer.pad_token_id, order_seed=None)]

    calibration, train, held_out = batches(texts[:64]), batches(texts[64:256]), batches(texts[800:900])
    print(f"language model perplexity on {len(held_out)} held-out packed rows")
    quantized = {}
    for calibration_method in ("max", "percentile"):
        q = quantize_causal_lm(copy.deepcopy(model), calibration_batches=calibration, train_batches=train,
                               eval_batches=held_out, recipe=QuantRecipe(calibration=calibration_method),
                               original_steps=200, original_lr=2e-4)
        r = q.report
        print(f"  {calibration_method:<10} calibration: float {r['float']['perplexity']:.4f}   "
              f"PTQ {r['ptq']['perplexity']:.4f} ({r['ptq']['perplexity'] / r['float']['perplexity']:.4f}x)   "
              f"QAT {r['qat']['perplexity']:.4f} ({r['qat']['perplexity'] / r['float']['perplexity']:.4f}x, "
              f"{r['qat_steps']} steps at lr {r['qat_lr']:g})")
        quantized[calibration_method] = q.model

    layout = kv_cache_layout(model.config)
    prompt = tokenizer(tokenizer.bos_token + texts[950], add_special_tokens=False)["input_ids"][:16]
    onnx_models = {"onnx fp32": export_causal_lm_onnx(model, variant="fp32"),
                   "onnx int8": export_causal_lm_onnx(quantized["percentile"], variant="int8")}
    new_tokens = 32

    def eager_decode() -> None:
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)

    times = {"pytorch fp32 eager": timed(eager_decode, max(3, repeats // 5), warmup=1)}
    for name, data in onnx_models.items():
        runner = OrtRunner(ort_session(data))
        times[name] = timed(lambda runner=runner: greedy_decode(runner, prompt, max_new_tokens=new_tokens,
                                                                layout=layout), max(3, repeats // 5), warmup=1)
    print(f"language model greedy decode, {len(prompt)}-token prompt + {new_tokens} tokens (KV cache):")
    for name, seconds in times.items():
        size = f"   ONNX {len(onnx_models[name]) / 2**20:.1f} MiB" if name in onnx_models else ""
        print(f"  {name:<20} {new_tokens / seconds:8.1f} tokens/s   "
              f"{times['pytorch fp32 eager'] / seconds:5.2f}x eager{size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="classifier training steps")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (median)")
    args = parser.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    bench_classifier(args.steps, args.repeats)
    bench_language_model(args.repeats)


if __name__ == "__main__":
    main()
