"""Run an exported model: ONNX Runtime sessions from bytes, and greedy decoding over the flat KV cache.

    runner = OrtRunner(ort_session(onnx_bytes))                 # CPU; providers=("CUDAExecutionProvider", ...) on GPUs
    tokens = greedy_decode(runner, prompt_ids, max_new_tokens=8, layout=kv_cache_layout(config))

A runner is anything with `run(feeds: dict[str, ndarray]) -> dict[str, ndarray]` and `kind`:
ONNX Runtime here, TensorRT in `tensorrt_engine.TensorRTRunner`, so decoding, parity checks and
serving treat them alike. Sessions are made from bytes: the model never touches the disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from appliance.optimize.errors import EngineError


def ort_session(onnx_bytes: bytes, providers: Sequence[Any] = ("CPUExecutionProvider",),
                intra_op_threads: int = 0) -> Any:
    """An ONNX Runtime session over in-memory model bytes (0 threads = ORT's default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 3  # errors only: ORT's warnings are not for operators
    # ORT's intra-op threads spin after each run by default: on a few cores shared with the server's request
    # threads (and the batch scheduler) the spinning takes the cores the next step needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in providers):
        # ORT's CPU kernels run INT8 only for DQ -> op -> Q groups; TensorRT-style Q/DQ (inputs only) has none.
        # Treating Q/DQ as plain ops lets ORT fold the weights' DequantizeLinear into constants and fuse the
        # convolutions as usual: the same numbers, about 4x faster than keeping the Q/DQ structure.
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(onnx_bytes, sess_options=options, providers=list(providers))
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise EngineError(f"ONNX Runtime cannot load this model: {first}",
                          hint="re-export it; if it persists, serve the model with PyTorch") from exc


def _numpy_dtype(ort_type: str) -> Any:
    import numpy as np

    names = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
             "tensor(bool)": "bool"}
    return np.dtype(names.get(ort_type, "float32"))


class OrtRunner:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self.kind = "ort-cuda" if "CUDAExecutionProvider" in self.providers else "ort-cpu"
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_dtypes = {i.name: _numpy_dtype(i.type) for i in session.get_inputs()}

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        outputs = self.session.run(None, {name: feeds[name] for name in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))


def kv_dtype_of(runner: Any) -> Any:
    """numpy dtype of the KV cache inputs (float16 for the fp16 variant)."""
    import numpy as np

    return runner.input_dtypes.get("past_key_0", np.dtype("float32"))


def causal_lm_step(runner: Any, input_ids: Any, past: list[Any], past_length: int) -> tuple[Any, list[Any]]:
    """One forward with the flat KV cache: (logits [batch, sequence, vocab], present tensors)."""
    import numpy as np

    batch, sequence = input_ids.shape
    feeds = {"input_ids": input_ids.astype(np.int64),
             "attention_mask": np.ones((batch, past_length + sequence), dtype=np.int64),
             "position_ids": np.broadcast_to(np.arange(past_length, past_length + sequence, dtype=np.int64),
                                             (batch, sequence)).copy()}
    for i in range(len(past) // 2):
        feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
    out = runner.run(feeds)
    present = []
    for i in range(len(past) // 2):
        present += [out[f"present_key_{i}"], out[f"present_value_{i}"]]
    return out["logits"], present


def empty_past(layout: tuple[int, int, int], batch: int, dtype: Any) -> list[Any]:
    import numpy as np

    layers, kv_heads, head_dim = layout
    return [np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype) for _ in range(2 * layers)]


def greedy_decode(runner: Any, prompt_ids: Sequence[int], *, max_new_tokens: int, layout: tuple[int, int, int],
                  eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation: one prefill over the prompt, then one token per step reading the KV cache."""
    import numpy as np

    past = empty_past(layout, 1, kv_dtype_of(runner))
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    length, generated = 0, []
    for _ in range(max_new_tokens):
        logits, past = causal_lm_step(runner, ids, past, length)
        length += ids.shape[1]
        token = int(logits[0, -1].argmax())
        generated.append(token)
        if token == eos_token_id:
            break
        ids = np.asarray([[token]], dtype=np.int64)
    return generated
