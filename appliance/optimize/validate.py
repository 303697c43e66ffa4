"""Validate an export before anyone serves it: ONNX checker, Q/DQ rules (INT8), parity with PyTorch on ORT CPU.

    report = validate_classifier_export(onnx_bytes, model, (images, labels), variant="int8")
    report = validate_causal_lm_export(onnx_bytes, model, prompts, variant="fp32")
    report["ok"], report["parity"]["max_abs_diff"], report["parity"]["top1_agreement"], ...

The reference is the PyTorch model that was exported (for INT8: the fake-quantized model), run on
held-out inputs. Tolerances are per variant (`TOLERANCES`); a miss raises `ParityError` unless
`strict=False`, and the report says which number missed. For LMs the ONNX side decodes through
its KV cache while PyTorch recomputes the whole sequence each step, so the cache wiring is tested too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from appliance.optimize.errors import ExportError, ParityError

TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max_rel_diff": 1e-4, "top1_agreement": 0.99},
    "fp16": {"max_rel_diff": 2e-2, "top1_agreement": 0.97},
    "int8": {"max_rel_diff": 5e-2, "top1_agreement": 0.95},
}
"""max |onnx - torch| / max(1, max |torch|) over all logits, and the share of positions with the same argmax."""
MAX_ACCURACY_DROP = 0.02
"""Classifiers: the ONNX model's accuracy may trail PyTorch's by at most this much."""


def check_onnx_model(onnx_bytes: bytes) -> Any:
    """onnx.checker with full_check (types and shapes inferred through the whole graph); returns the ModelProto."""
    import onnx

    try:
        model = onnx.load_from_string(onnx_bytes)
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ExportError(f"the ONNX checker rejected the export: {first}",
                          hint="re-export with `airlock optimize`; report the architecture if it repeats") from exc
    return model


def _base_report(onnx_bytes: bytes, variant: str, float_allowed: Sequence[str]) -> dict[str, Any]:
    from appliance.optimize.qdq_rules import check_qdq_rules

    if variant not in TOLERANCES:
        raise ExportError(f"unknown ONNX variant {variant!r}", hint=f"use one of {', '.join(TOLERANCES)}")
    model = check_onnx_model(onnx_bytes)
    qdq = check_qdq_rules(model, float_allowed=float_allowed).to_dict() if variant == "int8" else None
    return {"variant": variant, "bytes": len(onnx_bytes), "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
            "checker": "ok", "qdq": qdq}


def _diffs(onnx_out: Any, torch_out: Any) -> dict[str, float]:
    import numpy as np

    diff = float(np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64)).max())
    scale = max(1.0, float(np.abs(torch_out).max()))
    agreement = float((onnx_out.argmax(-1) == torch_out.argmax(-1)).mean())
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "top1_agreement": agreement}


def _judge(report: dict[str, Any], parity: dict[str, Any], extra: list[str], strict: bool) -> dict[str, Any]:
    tolerance = TOLERANCES[report["variant"]]
    failures = list(extra)
    if not parity["max_rel_diff"] <= tolerance["max_rel_diff"]:  # `not <=` also catches NaN
        failures.append(f"max relative difference {parity['max_rel_diff']:.3g} > {tolerance['max_rel_diff']:g}")
    if parity["top1_agreement"] < tolerance["top1_agreement"]:
        failures.append(f"top-1 agreement {parity['top1_agreement']:.3f} < {tolerance['top1_agreement']:g}")
    parity["tolerance"] = tolerance
    report.update(parity=parity, ok=not failures, failures=failures)
    if failures and strict:
        raise ParityError(f"the {report['variant']} ONNX export differs from PyTorch: {'; '.join(failures)}",
                          hint="keep serving the previous model; re-run quantization with more calibration data, "
                               "or use the fp16/fp32 variant")
    return report


def validate_classifier_export(onnx_bytes: bytes, model: Any, held_out: tuple[Any, Any], *, variant: str,
                               strict: bool = True, float_allowed: Sequence[str] = ()) -> dict[str, Any]:
    """Checker, Q/DQ rules (int8), then logits and accuracy of ONNX Runtime (CPU) vs PyTorch on held-out images."""
    import numpy as np
    import torch

    from appliance.optimize.runners import OrtRunner, ort_session

    report = _base_report(onnx_bytes, variant, float_allowed)
    images, labels = held_out
    pixels = images.float()
    if pixels.shape[1] == 1 and model.config.num_channels != 1:
        pixels = pixels.expand(-1, model.config.num_channels, -1, -1)
    runner = OrtRunner(ort_session(onnx_bytes))
    onnx_logits = runner.run({"pixel_values": pixels.numpy()})["logits"]
    with torch.no_grad():
        torch_logits = model.eval()(pixel_values=pixels.to(next(model.parameters()).dtype)).logits.float().numpy()
    truth = labels.numpy()
    parity = {"samples": int(pixels.shape[0]), **_diffs(onnx_logits, torch_logits),
              "accuracy_pytorch": float((torch_logits.argmax(1) == truth).mean()),
              "accuracy_onnx": float((onnx_logits.argmax(1) == truth).mean())}
    extra = []
    if parity["accuracy_onnx"] < parity["accuracy_pytorch"] - MAX_ACCURACY_DROP:
        extra.append(f"accuracy {parity['accuracy_onnx']:.3f} vs PyTorch {parity['accuracy_pytorch']:.3f}")
    if not np.isfinite(onnx_logits).all():
        extra.append("non-finite logits")
    return _judge(report, parity, extra, strict)


NEAR_TIE_FACTOR = 10.0
"""fp32 greedy decoding may differ from PyTorch only where PyTorch's two candidate logits lie within this many times
the export's measured max logit error: a near-tie that either runtime could break either way."""


def torch_greedy(model: Any, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence each step (no cache): the reference for KV-cache decoding."""
    import torch

    ids = torch.tensor([list(prompt_ids)])
    generated = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return generated


def validate_causal_lm_export(onnx_bytes: bytes, model: Any, prompts: Sequence[Sequence[int]], *, variant: str,
                              decode_tokens: int = 8, strict: bool = True,
                              float_allowed: Sequence[str] = ()) -> dict[str, Any]:
    """Checker, Q/DQ rules (int8), batched prefill logits, and greedy decoding through the ONNX KV cache vs PyTorch.

    `prompts` are held-out token id lists. Greedy tokens must match exactly for fp32 (up to a near-tie, measured and
    reported: see NEAR_TIE_FACTOR); for fp16 and
    int8 they are reported (two near-equal logits may legitimately swap).
    """
    import numpy as np
    import torch

    from appliance.optimize.export_graphs import causal_lm_io_names
    from appliance.optimize.onnx_export import kv_cache_layout
    from appliance.optimize.runners import (
        OrtRunner,
        causal_lm_step,
        empty_past,
        greedy_decode,
        kv_dtype_of,
        ort_session,
    )

    if not prompts or min(len(p) for p in prompts) == 0:
        raise ExportError("LM parity needs at least one non-empty held-out prompt",
                          hint="pass token ids from the validation split")
    report = _base_report(onnx_bytes, variant, float_allowed)
    layout = kv_cache_layout(model.config)
    runner = OrtRunner(ort_session(onnx_bytes))
    expected_inputs, _ = causal_lm_io_names(layout[0])
    if runner.input_names != expected_inputs:
        raise ExportError(f"the ONNX inputs are {runner.input_names[:4]}..., not the flat KV-cache layout",
                          hint="export causal LMs with export_causal_lm_onnx")
    model.eval()
    length = min(len(p) for p in prompts)
    batch = np.asarray([list(p)[:length] for p in prompts], dtype=np.int64)  # one batched prefill, dynamic batch
    onnx_logits, _ = causal_lm_step(runner, batch, empty_past(layout, len(prompts), kv_dtype_of(runner)), 0)
    with torch.no_grad():
        torch_logits = model(input_ids=torch.from_numpy(batch), use_cache=False).logits.float().numpy()
    parity: dict[str, Any] = {"prompts": len(prompts), "positions": int(batch.size),
                              **_diffs(onnx_logits, torch_logits)}
    # Two tokens whose PyTorch logits lie closer than the export's own measured error may swap: a near-tie, not a
    # wrong export. The margin is NEAR_TIE_FACTOR times the prefill's max |ONNX - PyTorch| (fp32: ~1e-5).
    tie_margin = NEAR_TIE_FACTOR * parity["max_abs_diff"]
    greedy = []
    for prompt in prompts:
        ours = greedy_decode(runner, prompt, max_new_tokens=decode_tokens, layout=layout)
        reference = torch_greedy(model, prompt, decode_tokens)
        entry: dict[str, Any] = {"onnx": ours, "pytorch": reference, "equal": ours == reference}
        if not entry["equal"]:
            common = min(len(ours), len(reference))
            at = next((i for i in range(common) if ours[i] != reference[i]), common)
            gap = float("inf")  # one sequence stopped early: no tie to measure
            if at < common:
                ids = torch.tensor([list(prompt) + reference[:at]])
                with torch.no_grad():
                    last = model(input_ids=ids, use_cache=False).logits[0, -1].double()
                gap = float(last[reference[at]] - last[ours[at]])
            entry["first_difference"] = {"position": at, "pytorch_logit_gap": gap, "near_tie": gap <= tie_margin}
        greedy.append(entry)
    parity["greedy"] = greedy
    parity["greedy_equal"] = all(g["equal"] for g in greedy)
    parity["near_tie_margin"] = tie_margin
    extra = []
    wrong = [g for g in greedy if not g["equal"] and not g["first_difference"]["near_tie"]]
    if variant == "fp32" and wrong:
        first = wrong[0]
        extra.append(f"greedy tokens differ (ONNX {first['onnx']} vs PyTorch {first['pytorch']}; PyTorch's logits "
                     f"differ by {first['first_difference']['pytorch_logit_gap']:.2e} there, more than the near-tie "
                     f"margin {tie_margin:.2e})")
    return _judge(report, parity, extra, strict)
