"""LoRA as an ONNX Runtime adapter file over an onnxruntime-genai base graph, measured against the merged export.

    base = build_genai_base(checkpoint, lora_config, shapes, work, variant="genai-int4", recipe=QuantRecipe())
    tensors = lora_tensors(adapter_state, lora_config)       # graph input name -> float32 array
    write_onnx_adapter(tensors, work / "v7.onnx_adapter")    # ~ the adapter's size; no builder run
    adapters = og.Adapters(og.Model(base.path)); adapters.load(path, "v7"); generator.set_active_adapter(adapters, "v7")

The builder's `adapter_path` option (a peft folder) builds the base with a LoRA branch on every targeted
projection (`/model/layers.N/{attn,mlp}/X_proj/lora_{A,B}/MatMul`, B pre-scaled by alpha/r, Q/K/V and gate/up no
longer fused) and the adapter's weights baked in as initializers; with int4 it quantizes the branch too. It writes
no `.onnx_adapter` file: that is ONNX Runtime's `AdapterFormat` (what Olive's ExtractAdapters pass produces).
So here the base is built from a zero adapter of the version's LoRA structure with the branch kept in float
(`nodes_to_exclude`), each branch weight becomes a graph input whose default is that zero initializer (no adapter
active = the base model), and a version's adapter is its own weights, transposed and scaled as the graph expects,
in an `.onnx_adapter` file: a retrain re-exports that file only.

docs/adr/0016 has the measurement (tests/bench/bench_genai_adapters.py) and the decision: int4 versions ship as
adapter files, fp32 merged. `adapter_route_refusal` says which route a variant takes; `base_key_fields` /
`base_key` name what the base graph depends on, so that versions sharing them share one stored base
(appliance.optimize.genai_jobs stores it once, in its own vault object, and serves base + adapter).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from appliance.optimize.errors import ExportError

_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
_BLOCK = {"self_attn": "attn", "mlp": "mlp"}
ADAPTER_FILE = "adapter.onnx_adapter"
ADAPTER_VARIANTS = ("genai-int4",)
"""The variants whose retrains ship an adapter file over a shared base (docs/adr/0016 measured and chose them)."""
BASE_FORMAT = "airlock-genai-base/v1"
"""Changes when what `build_genai_base` makes of the builder's output changes (a new key: bases are rebuilt)."""


def lora_graph_name(peft_key: str) -> tuple[str, str]:
    """(graph initializer/input name, node name) of one peft LoRA weight, as the builder names them."""
    match = _PEFT_KEY.search(peft_key)
    if match is None:
        raise ExportError(f"the adapter weight {peft_key} is not a LoRA projection the builder's LoRA route covers",
                          hint="use the merged export (the default) for this adapter")
    layer, block, proj, which = match.groups()
    node = f"/model/layers.{layer}/{_BLOCK[block]}/{proj}/lora_{which}/MatMul"
    return node[1:].replace("/", ".") + ".weight", node


def lora_tensors(adapter_state: dict[str, Any], lora_config: Any) -> dict[str, Any]:
    """The graph's LoRA inputs from a peft adapter state dict: A as [in, r], B * alpha/r as [r, out], float32.

    The builder's MatMul multiplies by the transposed Linear weight and folds the scaling into B
    (`make_matmul_lora`); rsLoRA, DoRA and per-module rank/alpha patterns are refused (not that formula)."""
    import numpy as np

    if getattr(lora_config, "use_dora", False) or getattr(lora_config, "use_rslora", False) \
            or getattr(lora_config, "rank_pattern", None) or getattr(lora_config, "alpha_pattern", None):
        raise ExportError("this LoRA variant (DoRA, rsLoRA or per-module rank/alpha) has no adapter-file route",
                          hint="use the merged export (the default)")
    scaling = float(lora_config.lora_alpha) / float(lora_config.r)
    tensors: dict[str, Any] = {}
    for key, value in adapter_state.items():
        name, _ = lora_graph_name(key)
        weight = value.detach().float().cpu().numpy()
        if ".lora_B." in key:
            weight = weight * scaling
        tensors[name] = np.ascontiguousarray(weight.T, dtype=np.float32)
    return tensors


def save_zero_adapter(lora_config: Any, adapter_state: dict[str, Any], folder: Path) -> list[str]:
    """A peft folder of the same structure with every weight zero (the base graph then carries no version's
    weights). Returns the builder node names of the LoRA branch (kept float)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    lora_config.save_pretrained(str(folder))
    save_file({k: torch.zeros(tuple(v.shape), dtype=torch.float32) for k, v in adapter_state.items()},
              str(folder / "adapter_model.safetensors"))
    return sorted(lora_graph_name(k)[1] for k in adapter_state)


def expose_lora_inputs(model_path: Path) -> dict[str, list[int]]:
    """Make each LoRA initializer of the builder's graph a graph input (the initializer stays as its default).

    Only the graph proto (model.onnx) is rewritten; the external data file is untouched. Returns name -> shape."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    present = {i.name for i in model.graph.input}
    shapes: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        if ".lora_A.MatMul.weight" in init.name or ".lora_B.MatMul.weight" in init.name:
            if init.data_type != onnx.TensorProto.FLOAT:
                raise ExportError(f"the LoRA weight {init.name} was quantized by the builder",
                                  hint="its node must be in nodes_to_exclude")
            shapes[init.name] = list(init.dims)
            if init.name not in present:
                model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    if not shapes:
        raise ExportError(f"{model_path} has no LoRA branch", hint="build the base with the adapter_path option")
    onnx.save(model, str(model_path))
    return shapes


def write_onnx_adapter(tensors: dict[str, Any], path: Path, *, expected: dict[str, list[int]] | None = None) -> int:
    """ONNX Runtime's adapter format (`onnxruntime.AdapterFormat`). Checked against the base graph's LoRA inputs
    first (every input, its shape), so a mismatched adapter never reaches a generator. Returns the bytes written.

    The file is a version's trained weights in plaintext: write it under `genai_export.scratch_dir` and encrypt
    what is kept into the vault, as the exports are."""
    import onnxruntime as ort

    if expected is not None:
        if set(tensors) != set(expected):
            extra = sorted(set(tensors) ^ set(expected))[0]
            raise ExportError(f"the adapter and the base graph disagree on the LoRA weight {extra}",
                              hint="the LoRA recipe (rank, targets) changed: build a new base")
        wrong = next((n for n in sorted(tensors) if list(tensors[n].shape) != expected[n]), None)
        if wrong:
            raise ExportError(f"the adapter's {wrong} is {list(tensors[wrong].shape)}, the base graph expects "
                              f"{expected[wrong]}", hint="the LoRA rank changed: build a new base")
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in tensors.items()})
    adapter.export_adapter(str(path))
    return path.stat().st_size


def lora_inputs_of(folder: Path) -> dict[str, list[int]]:
    """The LoRA inputs a base folder declares (recorded by `build_genai_base` in lora_inputs.json)."""
    return {k: list(v) for k, v in json.loads((folder / "lora_inputs.json").read_text(encoding="utf-8")).items()}


def build_genai_base(model: Any, tokenizer: Any, lora_config: Any, adapter_state: dict[str, Any], work: Path, *,
                     variant: str, recipe: Any, checkpoint: Path | None = None, log: Any = None) -> Any:
    """The base of `variant` with a float LoRA branch whose weights are graph inputs (zero by default).

    `model`: the base causal LM (not merged); `checkpoint`: its Hugging Face folder if already on disk.
    The returned GenAIExport lists `lora_inputs.json` among its files (name -> shape of each LoRA input)."""
    from appliance.optimize.genai_export import _sha256_file, build_genai_model

    zero = work / "zero-adapter"
    keep_float = save_zero_adapter(lora_config, adapter_state, zero)
    export = build_genai_model(model, tokenizer, work, variant=variant, recipe=recipe, checkpoint=checkpoint,
                               log=log, adapter=zero, keep_float=keep_float)
    shapes = expose_lora_inputs(export.path / "model.onnx")
    (export.path / "lora_inputs.json").write_text(json.dumps(shapes, sort_keys=True), encoding="utf-8")
    for name in ("model.onnx", "lora_inputs.json"):
        export.files[name] = _sha256_file(export.path / name)
    export.options["lora_branch"] = {"inputs": len(shapes), "rank": int(lora_config.r)}
    return export


def adapter_route_refusal(variant: str, lora_config: Any, adapter_state: dict[str, Any]) -> str | None:
    """Why `variant` of this LoRA run is a merged export rather than base + adapter file (one line), or None."""
    if not adapter_state or lora_config is None:
        return "the run has no LoRA adapter"
    if variant not in ADAPTER_VARIANTS:
        why = {"genai-fp32": "its float LoRA branch decodes at 0.37-0.47x the merged model (docs/adr/0016)"}.get(
            variant, "only genai-int4 was measured with an adapter file (docs/adr/0016)")
        return f"{variant} ships merged: {why}"
    try:
        lora_tensors(adapter_state, lora_config)
    except ExportError as exc:
        return exc.message
    return None


def base_key_fields(*, base_model: str, base_hash: str, variant: str, recipe: Any, lora_config: Any,
                    adapter_state: dict[str, Any]) -> dict[str, Any]:
    """Everything the base graph of the adapter route depends on, and nothing a retrain changes: the base model's
    files (their hash), the builder's options for the variant (precision, provider, quantization recipe, the float
    LoRA nodes), the LoRA structure (rank, alpha, targets, every LoRA input's shape), the builder's and ONNX
    Runtime's versions and ours (`BASE_FORMAT`)."""
    import onnxruntime
    import onnxruntime_genai

    from appliance.optimize.genai_export import builder_options

    inputs = {lora_graph_name(k)[0]: list(reversed(list(v.shape))) for k, v in adapter_state.items()}
    keep_float = sorted(lora_graph_name(k)[1] for k in adapter_state)
    precision, provider, extra = builder_options(variant, recipe, keep_float=keep_float)
    targets = getattr(lora_config, "target_modules", None)
    return {"format": BASE_FORMAT, "base_model": base_model, "base_hash": base_hash, "variant": variant,
            "builder": {"precision": precision, "execution_provider": provider, "extra_options": extra},
            "lora": {"r": int(lora_config.r), "alpha": float(lora_config.lora_alpha),
                     "target_modules": sorted(targets) if isinstance(targets, list | set | tuple) else targets,
                     "layers": sorted({int(_PEFT_KEY.search(k).group(1)) for k in adapter_state}),  # type: ignore
                     "inputs": dict(sorted(inputs.items()))},
            "versions": {"onnxruntime-genai": onnxruntime_genai.__version__, "onnxruntime": onnxruntime.__version__}}


def base_key(fields: dict[str, Any]) -> str:
    """SHA-256 of the key fields (canonical JSON): equal for every version that can share one base graph."""
    import hashlib

    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def base_object_id(key: str) -> str:
    """The vault object that holds the base graph of `key` (one per key, referenced by every version using it)."""
    return f"genai-base-{key[:32]}"


def read_onnx_adapter(path: Path) -> dict[str, Any]:
    """The tensors of an `.onnx_adapter` file (graph input name -> float32 numpy array), for an ONNX Runtime session
    over the base graph (the server's batch session takes them as its initializers)."""
    import numpy as np
    import onnxruntime as ort

    adapter = ort.AdapterFormat.read_adapter(str(path))
    # copied: the OrtValues' numpy views point into `adapter`'s buffer, freed with it
    return {name: np.array(value.numpy(), dtype=np.float32, copy=True)
            for name, value in adapter.get_parameters().items()}
