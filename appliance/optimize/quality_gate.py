"""The quality gate: a quantized variant serves only if it stays within the task's tolerance of the float model.

    entry = perplexity_gate(float_ppl=12.1, variant_ppl=12.4, max_increase=0.05)          # LMs
    entry = classifier_gate({"accuracy": .91, "roc_auc": .95}, {"accuracy": .90, ...}, max_drop=0.01)
    entry["ok"], entry["failure"]   # "quality: perplexity 13.1 vs float 12.1 (+8.3%, the task allows +5.0%)"

Parity checks (appliance.optimize.validate, genai_validate) ask whether an export computes what its PyTorch
model computes; this gate asks whether what serves is still as good as the float model on held-out data.
Defaults (QuantRecipe): +5% perplexity, -1 point accuracy and ROC AUC. The optimize job records the entry on
each variant (`quality`) and a failing variant is not stored, so it never serves; the report keeps the numbers.
"""

from __future__ import annotations

import math
from typing import Any


def perplexity_gate(float_ppl: float, variant_ppl: float, *, max_increase: float) -> dict[str, Any]:
    """LMs: the variant's perplexity may exceed the float model's by at most `max_increase` (relative)."""
    increase = variant_ppl / float_ppl - 1 if float_ppl > 0 else math.inf
    ok = math.isfinite(variant_ppl) and increase <= max_increase
    entry: dict[str, Any] = {"metric": "perplexity", "float": float_ppl, "variant": variant_ppl,
                             "increase": increase, "max_increase": max_increase, "ok": ok}
    if not ok:
        entry["failure"] = (f"quality: perplexity {variant_ppl:.4g} vs float {float_ppl:.4g} "
                            f"({increase:+.1%}; the task allows {max_increase:+.1%})")
    return entry


def classifier_gate(float_metrics: dict[str, Any], variant_metrics: dict[str, Any], *,
                    max_drop: float) -> dict[str, Any]:
    """Classifiers: accuracy and ROC AUC may each fall at most `max_drop` (absolute: 0.01 = 1 point)."""
    failures, measured = [], {}
    for metric in ("accuracy", "roc_auc"):
        before, after = float_metrics.get(metric), variant_metrics.get(metric)
        if not isinstance(before, int | float) or not isinstance(after, int | float):
            continue  # e.g. no AUC on a one-class split
        measured[metric] = {"float": before, "variant": after, "drop": before - after}
        if not after >= before - max_drop:  # `not >=` also catches NaN
            failures.append(f"{metric} {after:.4f} vs float {before:.4f} ({(after - before) * 100:+.1f} pt)")
    entry: dict[str, Any] = {"metric": "accuracy/roc_auc", "measured": measured, "max_drop": max_drop,
                             "ok": not failures}
    if failures:
        entry["failure"] = f"quality: {'; '.join(failures)}; the task allows -{max_drop * 100:.1f} pt"
    return entry
