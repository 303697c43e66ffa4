"""Validate an onnxruntime-genai export before anyone serves it, and measure its quality against the float model.

    report = validate_genai_export(export, model, prompts, decode_tokens=8)
    report["parity"]       prefill logits vs PyTorch (max_rel_diff, top1_agreement), greedy tokens vs PyTorch
    report["generator"]    og.Generator decoding a batch of 8 prompts: tokens, decode tokens/s on this machine
    ppl = session_perplexity(ort_genai_session(export), held_out_examples(test_examples))

The float variants (fp32; fp16/bf16 on CUDA) must match PyTorch's logits within `TOLERANCES` and decode the
same greedy tokens (up to a measured near-tie, as `validate.validate_causal_lm_export`). Weight-only int8/int4
differ from the float model by design: their parity is reported, and what decides whether they serve is the
quality gate, perplexity on held-out examples against the float model's (`appliance.optimize.jobs`).
Logits come from ONNX Runtime itself on the builder's graph (GroupQueryAttention, MatMulNBits: contrib ops of
the CPU build) with an empty past; generation runs through `og.Generator`, the runtime that serves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from appliance.optimize.errors import ExportError
from appliance.optimize.genai_export import FLOAT_GENAI, GENAI_VARIANTS, GenAIExport

TOLERANCES = {"genai-fp32": {"max_rel_diff": 1e-4, "top1_agreement": 0.99},
              "genai-fp16-cuda": {"max_rel_diff": 2e-2, "top1_agreement": 0.97},
              "genai-bf16-cuda": {"max_rel_diff": 5e-2, "top1_agreement": 0.95}}
"""Float exports vs PyTorch (the metrics and numbers of validate.TOLERANCES; measured on the tiny model: fp32 4e-7)."""
GENERATOR_BATCH = 8
MAX_QUALITY_EXAMPLES = 64
"""Held-out examples the quality gate scores (each whole, one at a time): enough to see a broken quantization."""


def decoder_session(folder: Any, decoder: dict[str, Any], provider: str, *, what: str, hint: str,
                    initializers: dict[str, Any] | None = None) -> Any:
    """An ONNX Runtime session over a genai export's decoder graph (`decoder`: genai_config.json's, external data
    read from `folder`) for validation and for the server's batches. Its intra-op threads do not spin after a run (as
    `appliance.optimize.runners.ort_session`); a graph ONNX Runtime cannot load is one line naming `what`.
    `initializers` (name -> numpy array) replace the graph's initializers of those names in this session (a
    version's LoRA tensors over a base graph with a LoRA branch: no feed needed per run)."""
    import onnxruntime as ort

    from appliance.optimize.errors import EngineError

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The OrtValues must outlive the session: they are kept on it.
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in (initializers or {}).items()}
    for name, value in values.items():
        options.add_initializer(name, value)
    try:
        session = ort.InferenceSession(str(folder / decoder["filename"]), sess_options=options, providers=[provider])
        session.airlock_initializers = values
        return session
    except Exception as exc:  # ORT raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise EngineError(f"ONNX Runtime cannot load {what}: {first}", hint=hint) from exc


def ort_genai_session(export: GenAIExport, *, adapter: dict[str, Any] | None = None) -> Any:
    """An ONNX Runtime session over the builder's graph (external data read from its folder).

    `adapter`: LoRA input name -> array (genai_adapters.lora_tensors) fed on every run, for a base graph with a
    LoRA branch; its inputs left unfed keep their zero defaults (the base model)."""
    import json

    decoder = json.loads((export.path / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
    provider = "CUDAExecutionProvider" if GENAI_VARIANTS[export.variant][1] == "cuda" else "CPUExecutionProvider"
    session = decoder_session(export.path, decoder, provider, what=f"the {export.variant} export",
                              hint="re-export it; if it persists, serve the model with PyTorch")
    return _KvSession(session, (int(decoder["num_key_value_heads"]), int(decoder["head_size"])), adapter or {})


class _KvSession:
    """An ORT session, the KV cache's (kv heads, head size), which the graph leaves symbolic, and adapter feeds."""

    def __init__(self, session: Any, kv_shape: tuple[int, int], adapter: dict[str, Any] | None = None) -> None:
        self.session, self.kv_shape, self.adapter = session, kv_shape, adapter or {}

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def run(self, names: Any, feeds: dict[str, Any]) -> Any:
        return self.session.run(names, feeds)


def session_logits(session: Any, input_ids: Any) -> Any:
    """Logits [batch, sequence, vocab] (float32) of a full sequence with an empty KV cache."""
    import numpy as np

    ids = np.asarray(input_ids, dtype=np.int64)
    heads, head_size = session.kv_shape  # from genai_config.json: the graph leaves these dims symbolic
    feeds: dict[str, Any] = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = ids
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones_like(ids)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        elif spec.name.startswith("past_key_values."):
            dtype = {"tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}.get(spec.type, np.float32)
            feeds[spec.name] = np.zeros((ids.shape[0], heads, 0, head_size), dtype=dtype)
        else:
            raise ExportError(f"the genai export has an input {spec.name!r} this validation does not know",
                              hint="report the model architecture and the onnxruntime-genai version")
    # LoRA inputs are initializers too (zero defaults): ONNX Runtime lists them as overridable, not as inputs
    feeds.update(getattr(session, "adapter", {}))
    return np.asarray(session.run(["logits"], feeds)[0], dtype=np.float32)


def _nll(logits: Any, labels: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of the scored labels (shifted by one, -100 = not scored) and their count."""
    import numpy as np

    labels = np.asarray(labels[1:], dtype=np.int64)
    logits = np.asarray(logits[: len(labels)], dtype=np.float64)
    scored = labels != -100
    if not scored.any():
        return 0.0, 0
    rows = logits[scored]
    top = rows.max(axis=1, keepdims=True)
    log_z = (top[:, 0] + np.log(np.exp(rows - top).sum(axis=1)))
    return float((log_z - rows[np.arange(len(rows)), labels[scored]]).sum()), int(scored.sum())


def held_out_examples(examples: Sequence[Any], limit: int = MAX_QUALITY_EXAMPLES) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of up to `limit` held-out examples that score at least one token."""
    chosen = []
    for example in examples:
        labels = list(example.labels)
        if any(label != -100 for label in labels[1:]):
            chosen.append((list(example.input_ids), labels))
        if len(chosen) == limit:
            break
    return chosen


def session_perplexity(session: Any, examples: Sequence[tuple[list[int], list[int]]]) -> float:
    import math

    total, count = 0.0, 0
    for ids, labels in examples:
        nll, n = _nll(session_logits(session, [ids])[0], labels)
        total, count = total + nll, count + n
    if count == 0:
        raise ExportError("the held-out examples have no scored tokens", hint="import records with answers")
    return math.exp(total / count)


def torch_perplexity(model: Any, examples: Sequence[tuple[list[int], list[int]]]) -> float:
    """The float model's perplexity computed exactly as `session_perplexity` (one whole example at a time)."""
    import math

    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
            nll, n = _nll(logits, labels)
            total, count = total + nll, count + n
    if count == 0:
        raise ExportError("the held-out examples have no scored tokens", hint="import records with answers")
    return math.exp(total / count)


def run_generator_batch(model_dir: Any, prompts: Sequence[Sequence[int]], new_tokens: int, *,
                        adapter_file: Any = None) -> dict[str, Any]:
    """og.Generator greedy over a batch of equal-length prompts: the new tokens of each row, and tokens/s.

    `adapter_file`: an `.onnx_adapter` for a base graph with a LoRA branch, loaded through og.Adapters and made
    the generator's active adapter."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    adapters = None
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "candidate")
    batch = np.asarray([list(p) for p in prompts], dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(batch.shape[1] + new_tokens), batch_size=int(batch.shape[0]),
                              do_sample=False)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, "candidate")
    started = time.perf_counter()
    generator.append_tokens(batch)
    prefill_s = time.perf_counter() - started
    steps = 0
    started = time.perf_counter()
    while not generator.is_done() and steps < new_tokens:
        generator.generate_next_token()
        steps += 1
    decode_s = time.perf_counter() - started
    rows = [[int(t) for t in generator.get_sequence(i)][batch.shape[1]:] for i in range(batch.shape[0])]
    del generator, adapters, model
    return {"batch": int(batch.shape[0]), "prompt_tokens": int(batch.shape[1]), "steps": steps, "rows": rows,
            "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens_per_s": (steps * batch.shape[0] / decode_s) if decode_s > 0 else None}


def validate_genai_export(export: GenAIExport, model: Any, prompts: Sequence[Sequence[int]], *,
                          decode_tokens: int = 8, eos_ids: Sequence[int] = (), adapter_tensors: Any = None,
                          adapter_file: Any = None) -> dict[str, Any]:
    """Parity with the PyTorch float model (judged for float variants), og.Generator on a batch of 8 (always).

    For a base graph with a LoRA branch (genai_adapters), `adapter_tensors` feed ONNX Runtime and `adapter_file`
    is og's active adapter: the same checks then judge base + adapter against the merged float model."""
    import torch

    from appliance.optimize.validate import NEAR_TIE_FACTOR, _diffs, torch_greedy

    if not prompts or min(len(p) for p in prompts) == 0:
        raise ExportError("genai validation needs at least one non-empty held-out prompt",
                          hint="pass token ids from the validation split")
    report: dict[str, Any] = {"variant": export.variant, "bytes": export.bytes, "sha256": export.sha256,
                              "files": dict(export.files), "builder": export.options, "runtime": "onnxruntime-genai"}
    failures: list[str] = []
    length = min(len(p) for p in prompts)
    batch = [list(p)[:length] for p in prompts]
    session = ort_genai_session(export, adapter=adapter_tensors)
    onnx_logits = session_logits(session, batch)
    model.eval()
    with torch.no_grad():
        torch_logits = model(input_ids=torch.tensor(batch), use_cache=False).logits.float().numpy()
    parity: dict[str, Any] = {"prompts": len(batch), "positions": len(batch) * length,
                              **_diffs(onnx_logits, torch_logits)}
    del session
    rows = [batch[i % len(batch)] for i in range(GENERATOR_BATCH)]
    generator = run_generator_batch(export.path, rows, decode_tokens, adapter_file=adapter_file)
    stop = set(eos_ids)
    judged = export.variant in FLOAT_GENAI
    tie_margin = NEAR_TIE_FACTOR * parity["max_abs_diff"]
    greedy = []
    for prompt, ours in zip(batch, generator["rows"][: len(batch)], strict=True):
        reference = torch_greedy(model, prompt, decode_tokens)
        cut = next((i + 1 for i, t in enumerate(reference) if t in stop), len(reference))
        reference, ours = reference[:cut], ours[:cut]
        entry: dict[str, Any] = {"equal": ours == reference, "tokens": len(ours)}
        if not entry["equal"]:
            at = next((i for i in range(min(len(ours), len(reference))) if ours[i] != reference[i]),
                      min(len(ours), len(reference)))
            gap = float("inf")
            if at < min(len(ours), len(reference)):
                with torch.no_grad():
                    last = model(input_ids=torch.tensor([prompt + reference[:at]]), use_cache=False).logits[0, -1]
                gap = float(last.double()[reference[at]] - last.double()[ours[at]])
            entry["first_difference"] = {"position": at, "pytorch_logit_gap": gap, "near_tie": gap <= tie_margin}
        greedy.append(entry)
    parity.update(greedy=greedy, greedy_equal=all(g["equal"] for g in greedy), near_tie_margin=tie_margin)
    if generator["steps"] == 0 or len(generator["rows"]) != GENERATOR_BATCH:
        failures.append(f"og.Generator produced {generator['steps']} steps for a batch of {len(generator['rows'])}")
    if judged:
        tolerance = TOLERANCES[export.variant]
        parity["tolerance"] = tolerance
        if not parity["max_rel_diff"] <= tolerance["max_rel_diff"]:
            failures.append(f"max relative difference {parity['max_rel_diff']:.3g} > {tolerance['max_rel_diff']:g}")
        if parity["top1_agreement"] < tolerance["top1_agreement"]:
            failures.append(f"top-1 agreement {parity['top1_agreement']:.3f} < {tolerance['top1_agreement']:g}")
        wrong = [g for g in greedy if not g["equal"] and not g["first_difference"]["near_tie"]]
        if wrong:
            failures.append(f"greedy tokens differ from PyTorch at position {wrong[0]['first_difference']['position']} "
                            f"(logit gap {wrong[0]['first_difference']['pytorch_logit_gap']:.2e} > near-tie margin "
                            f"{tie_margin:.2e})")
    generator.pop("rows")
    report.update(parity=parity, generator=generator, ok=not failures, failures=failures,
                  parity_judged=judged)
    return report
