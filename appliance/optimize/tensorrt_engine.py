"""Build a TensorRT engine from ONNX bytes on this GPU, and run one: build, bind, check, load.

    build = build_engine(onnx_bytes, variant="int8", profiles=classifier_profiles((1, 224, 224), max_batch=32),
                         options=EngineBuildOptions(), quant_recipe=report["recipe"])
    build.plan, build.sidecar          # bytes to encrypt into the vault + the JSON that binds it to this machine
    runner = load_engine(build.plan, build.sidecar)   # checks the sidecar first; .run({name: ndarray}) -> dict

The ONNX is parsed from memory (OnnxParser.parse), the plan comes back as bytes
(build_serialized_network): neither touches the disk. Precision comes from the ONNX variant on a
strongly typed network (`tensorrt_api`), so the same variant means the same engine on TensorRT 10
and 11. The timing cache persists per (GPU, SM, CUDA, TensorRT, build flags) under
`$AIRLOCK_HOME/engines/timing-cache/`: it holds kernel timings, not weights, and makes rebuilds of
the same architecture fast. Buffers are torch CUDA tensors; execution is `execute_async_v3` on
torch's current stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.optimize.engine_sidecar import (
    HARDWARE_COMPATIBILITY,
    MachineInfo,
    check_sidecar,
    current_machine,
    make_sidecar,
)
from appliance.optimize.errors import EngineError
from appliance.optimize.tensorrt_api import import_tensorrt, tensorrt_api

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
"""input name -> (min shape, opt shape, max shape)"""


@dataclass(frozen=True)
class EngineBuildOptions:
    workspace_gib: float = 4.0
    """Largest scratch memory a layer may use while running (0.25-256)."""
    builder_optimization_level: int = 3
    """0 (fast build) to 5 (slowest build, fastest engine); TensorRT's default is 3."""
    hardware_compatibility: str = "none"
    """"none" (this GPU's SM only, fastest), "ampere_plus" (any SM >= 8.0), "same_compute_capability"."""
    version_compatible: bool = False
    """Let later TensorRT versions load the engine (embeds the lean runtime; somewhat slower)."""
    weak_fp16: bool = False
    """TensorRT 10.x only: let the builder choose FP16 kernels for an FP32 or Q/DQ ONNX (weak typing)."""
    timing_cache_dir: str | None = None
    """Where timing caches persist; None = $AIRLOCK_HOME/engines/timing-cache."""
    contexts: int = 2
    """Inferences the engine runs at once (1-16; `airlock serve`'s default is 2 workers): one execution context
    each, each on its own copy of the optimization profiles, since concurrent contexts must not share a profile.
    A server's workers beyond this wait for a free context. Each copy adds build time and a little plan size."""

    def __post_init__(self) -> None:
        if not 0.25 <= self.workspace_gib <= 256:
            raise EngineError(f"workspace_gib = {self.workspace_gib} is outside 0.25..256", hint="use e.g. 4")
        if self.builder_optimization_level not in range(6):
            raise EngineError(f"builder_optimization_level = {self.builder_optimization_level} is not 0-5",
                              hint="use 3 (TensorRT's default) or 5 for the fastest engine")
        if not 1 <= self.contexts <= 16:
            raise EngineError(f"contexts = {self.contexts} is outside 1..16",
                              hint="use the number of server workers (2 by default)")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise EngineError(f"hardware_compatibility = {self.hardware_compatibility!r} is not one of "
                              f"{', '.join(HARDWARE_COMPATIBILITY)}",
                              hint='use "none" unless engines move between GPUs')

    def cache_relevant(self) -> dict[str, Any]:
        """The options that change which kernels TensorRT times (the timing cache key)."""
        return {"hardware_compatibility": self.hardware_compatibility,
                "version_compatible": self.version_compatible, "weak_fp16": self.weak_fp16}


@dataclass(frozen=True)
class EngineBuild:
    plan: bytes
    sidecar: dict[str, Any]


def classifier_profiles(image_shape: tuple[int, int, int], *, max_batch: int = 32, opt_batch: int = 8) -> list[Profile]:
    shape = tuple(image_shape)
    return [{"pixel_values": ((1, *shape), (min(opt_batch, max_batch), *shape), (max_batch, *shape))}]


def causal_lm_profiles(config: Any, *, max_batch: int = 4, max_sequence: int = 512,
                       max_past: int = 2048) -> list[Profile]:
    """One profile from a one-token decode step up to a full prefill; tuned for decoding (the common call)."""
    from appliance.optimize.export_graphs import causal_lm_io_names
    from appliance.optimize.onnx_export import kv_cache_layout

    layers, kv_heads, head_dim = kv_cache_layout(config)
    opt_past = min(256, max_past)
    profile: Profile = {
        "input_ids": ((1, 1), (1, 1), (max_batch, max_sequence)),
        "attention_mask": ((1, 1), (1, opt_past + 1), (max_batch, max_past + max_sequence)),
        "position_ids": ((1, 1), (1, 1), (max_batch, max_sequence)),
    }
    for name in causal_lm_io_names(layers)[0][3:]:
        profile[name] = ((1, kv_heads, 0, head_dim), (1, kv_heads, opt_past, head_dim),
                         (max_batch, kv_heads, max_past, head_dim))
    return [profile]


SERVE_MAX_PROMPT_TOKENS = 4096
SERVE_MAX_NEW_TOKENS = 32768
"""`airlock serve`'s default --max-prompt-tokens / --max-tokens (appliance.serve.limits.ServeLimits)."""


def serve_profile_limits(context: int, *, max_prompt_tokens: int = SERVE_MAX_PROMPT_TOKENS,
                         max_new_tokens: int = SERVE_MAX_NEW_TOKENS, rows: int | None = None) -> dict[str, int]:
    """`causal_lm_profiles` sizes that hold every request a server with these limits admits for a model with
    this context: the longest prompt in one prefill call, and the KV cache of the longest request; with `rows`
    (requests per call, appliance.serve.limits.lm_rows_per_call), the batch dimension too.

    A request of P prompt and N new tokens feeds P tokens once, then one token on a past of up to P + N - 2."""
    prompt, total = admitted_lengths(context, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens)
    return {"max_sequence": prompt, "max_past": max(1, total - 2), **({"max_batch": rows} if rows else {})}


def admitted_lengths(context: int, *, max_prompt_tokens: int, max_new_tokens: int) -> tuple[int, int]:
    """(longest prompt, most prompt + generated tokens) a server admits for a model with this context."""
    return min(max_prompt_tokens, context - 1), min(context, max_prompt_tokens + max_new_tokens)


def lm_profile_capacity(profiles: list[Any]) -> tuple[int, int]:
    """(longest prompt, most prompt + generated tokens) one request may reach on profile 0 (the one the runner
    uses) of a causal-LM engine; profiles as built or as a sidecar records them ([min, opt, max] shapes)."""
    profile = profiles[0]
    high = {name: tuple(shapes[2]) for name, shapes in profile.items()}
    prompt = min(high["input_ids"][1], high.get("position_ids", high["input_ids"])[1])
    pasts = [shape[2] for name, shape in high.items() if name.startswith("past_")]
    if not pasts:
        raise EngineError("the engine's profile has no KV-cache inputs (past_key_N)",
                          hint="this is not a causal-LM engine; rebuild it with `airlock engine build`")
    total = min(min(pasts) + 2, high["attention_mask"][1] + 1) if "attention_mask" in high else min(pasts) + 2
    return prompt, total


def lm_profile_rows(profiles: list[Any]) -> int:
    """Most requests (batch rows) one call may carry on profile 0: the smallest max batch over its inputs."""
    return min(int(next(iter(shapes[2]))) for shapes in profiles[0].values())


def check_lm_profile(profiles: list[Any], *, context: int, max_prompt_tokens: int, max_new_tokens: int,
                     run_id: str = "RUN", rows: int = 1, max_batch: int | None = None) -> None:
    """Refuse (EngineError, one line + hint) an engine whose profile cannot hold every request the server admits:
    such a request would fail mid-generation instead of being served.

    `rows`: requests the server puts in one call to this engine (appliance.serve.limits.lm_rows_per_call: the
    server's `--max-batch` where the backend batches, else 1); `max_batch` the server's --max-batch, for the line."""
    can_rows = lm_profile_rows(profiles)
    if rows > can_rows:
        raise EngineError(
            f"the TensorRT engine decodes at most {can_rows} request(s) per call, but this server batches {rows} "
            f"(--max-batch {max_batch if max_batch is not None else rows})",
            hint=f"serve with --max-batch {can_rows}, or rebuild the engine: `airlock engine build {run_id} "
                 f"--max-batch {rows}`")
    can_prompt, can_total = lm_profile_capacity(profiles)
    prompt, total = admitted_lengths(context, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens)
    if prompt <= can_prompt and total <= can_total:
        return
    sizes = serve_profile_limits(context, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens)
    raise EngineError(
        f"the TensorRT engine takes prompts of up to {can_prompt} tokens and {can_total} tokens in all, but this "
        f"server admits prompts of {prompt} and {total} in all (--max-prompt-tokens {max_prompt_tokens}, "
        f"--max-tokens {max_new_tokens}, context {context})",
        hint=f"serve with --max-prompt-tokens {min(can_prompt, max_prompt_tokens)} --max-tokens "
             f"{max(1, can_total - min(can_prompt, max_prompt_tokens))}, or rebuild the engine: `airlock engine "
             f"build {run_id} --max-sequence {sizes['max_sequence']} --max-past {sizes['max_past']}`")


class ContextPool:
    """`slots` objects, each used by one caller at a time: `with pool.checkout() as obj`. Slot i's object is made by
    `factory(i)` on its first use; a caller finding every slot busy waits for one.

    TensorRT's IExecutionContext holds the input shapes and tensor addresses of one inference at a time, and
    execution contexts that run at once must each have an optimization profile of their own (TensorRT's developer
    guide on optimization profiles; NVIDIA/TensorRT#846): worker threads sharing a context, or contexts sharing a
    profile, can mix one request's shapes and buffers into another's. So an engine carries one copy of its profiles
    per context, slot i runs on copy i, and there are never more contexts than copies."""

    def __init__(self, factory: Any, slots: int) -> None:
        import queue
        import threading

        if slots < 1:
            raise ValueError("a context pool needs at least one slot")
        self._factory = factory
        self._free: Any = queue.LifoQueue()  # the slot used last goes out first: its memory is warm
        for slot in reversed(range(slots)):
            self._free.put(slot)
        self._objects: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.slots = slots

    @property
    def made(self) -> int:
        return len(self._objects)

    @contextlib.contextmanager
    def checkout(self) -> Iterator[Any]:
        slot = self._free.get()
        try:
            with self._lock:  # creating contexts concurrently on one engine is not documented as safe
                if slot not in self._objects:
                    self._objects[slot] = self._factory(slot)
            yield self._objects[slot]
        finally:
            self._free.put(slot)


def default_timing_cache_dir() -> Path:
    from appliance.paths import airlock_home

    return airlock_home() / "engines" / "timing-cache"


def timing_cache_key(machine: MachineInfo, variant: str, options: EngineBuildOptions) -> str:
    fields = {"gpu": machine.gpu, "sm": machine.sm, "cuda": machine.cuda, "tensorrt": machine.tensorrt,
              "variant": variant, **options.cache_relevant()}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1].lower()  # DataType.HALF -> "half"


def _check_profiles(network: Any, profiles: list[Profile]) -> None:
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if not profiles:
        raise EngineError("no optimization profile given", hint="use classifier_profiles or causal_lm_profiles")
    for index, profile in enumerate(profiles):
        unknown = sorted(set(profile) - set(inputs))
        if unknown:
            raise EngineError(f"optimization profile {index} names {unknown[0]!r}, which the ONNX model has no "
                              f"input called (inputs: {', '.join(inputs)})", hint="build profiles for this model")
        for name, shape in inputs.items():
            if -1 in shape and name not in profile:
                raise EngineError(f"input {name!r} has dynamic dimensions {list(shape)} and no range in "
                                  f"optimization profile {index}", hint="add it to the profile")
        for name, (low, opt, high) in profile.items():
            if not (len(low) == len(opt) == len(high) == len(inputs[name])) or not all(
                    a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                raise EngineError(f"optimization profile {index}: {name} needs min <= opt <= max of rank "
                                  f"{len(inputs[name])}, got {low} / {opt} / {high}", hint="fix the profile")


def build_engine(onnx_bytes: bytes, *, variant: str, profiles: list[Profile], options: EngineBuildOptions,
                 quant_recipe: dict[str, Any] | None = None, machine: MachineInfo | None = None) -> EngineBuild:
    """Parse, configure, build (minutes on a large model): the plan and its sidecar."""
    trt = import_tensorrt()
    api = tensorrt_api(trt)
    machine = machine or current_machine()
    if machine.sm is None:
        raise EngineError("TensorRT engines are built on the GPU that will run them, and this machine has none",
                          hint="build the engine on the serving GPU; here the model is served through ONNX Runtime")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(api.network_flags(trt, weak_fp16=options.weak_fp16))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT {api.version} cannot parse the ONNX model: {(errors or ['unknown'])[0][:300]}",
                          hint="serve the model through ONNX Runtime; check the export with the Q/DQ checker")
    _check_profiles(network, profiles)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 1024**3))
    config.builder_optimization_level = options.builder_optimization_level
    for flag in api.precision_flags(trt, variant=variant, weak_fp16=options.weak_fp16):
        config.set_flag(flag)
    if options.hardware_compatibility != "none":
        config.hardware_compatibility_level = api.hardware_compatibility(trt, options.hardware_compatibility)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    for profile in profiles * options.contexts:  # one copy per execution context (ContextPool)
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            optimization_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization_profile)

    cache_dir = Path(options.timing_cache_dir) if options.timing_cache_dir else default_timing_cache_dir()
    cache_path = cache_dir / f"timing-{timing_cache_key(machine, variant, options)}.cache"
    cached = cache_path.read_bytes() if cache_path.is_file() else b""
    try:
        timing_cache = config.create_timing_cache(cached)
    except Exception:  # a damaged or foreign cache only costs build time: start empty
        timing_cache = config.create_timing_cache(b"")
    config.set_timing_cache(timing_cache, False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT {api.version} could not build an engine from this model (its messages are in "
                          "the job log)", hint="try builder_optimization_level = 3 and a larger workspace_gib, or "
                                               "serve the model through ONNX Runtime")
    plan_bytes = bytes(plan)
    _write_atomically(cache_path, bytes(config.get_timing_cache().serialize()))

    tensors = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    tensors += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    io = [{"name": t.name, "mode": mode, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for mode, t in tensors]
    sidecar = make_sidecar(machine=machine, onnx_bytes=onnx_bytes, plan_bytes=plan_bytes, variant=variant,
                           profiles=[{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in profiles],
                           io=io, options={**asdict(options), "timing_cache_dir": None, "tensorrt_major": api.major},
                           quant_recipe=quant_recipe)
    return EngineBuild(plan_bytes, sidecar)


def load_engine(plan: bytes, sidecar: dict[str, Any], *, machine: MachineInfo | None = None) -> TensorRTRunner:
    """Check the sidecar against this machine, then deserialize. Plans come from our own vault (authenticated)."""
    machine = machine or current_machine()
    check_sidecar(sidecar, machine, plan_bytes=plan)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if sidecar["options"].get("version_compatible"):
        # A version-compatible plan carries the lean runtime's host code. We only run plans that we built and
        # that come out of the vault with their SHA-256 checked against the sidecar above.
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineError(f"TensorRT {machine.tensorrt} could not load the engine", hint="rebuild with `airlock "
                                                                                         "engine build`")
    # Engines built before `contexts` existed hold one copy of their profiles: one inference at a time.
    return TensorRTRunner(engine, trt, profiles=sidecar.get("profiles"), contexts=sidecar["options"].get("contexts", 1))


class TensorRTRunner:
    """`run({name: ndarray}) -> {name: ndarray}`, with torch CUDA tensors as buffers.

    The server's workers run requests side by side on one engine (its weights are shared): each call checks out one
    of `contexts` execution contexts, each with its own CUDA stream and its own copy of the optimization profiles
    (`ContextPool`); a call finding every context busy waits for one."""

    kind = "tensorrt"

    def __init__(self, engine: Any, trt: Any, profiles: list[Any] | None = None, contexts: int = 1) -> None:
        import numpy as np

        self.engine, self.trt = engine, trt
        self.profiles = profiles or []
        """The optimization profiles of one copy (from the sidecar), for `check_lm_profile`."""
        per_copy = max(1, len(self.profiles))
        if engine.num_optimization_profiles < per_copy * contexts:
            raise EngineError(f"the engine holds {engine.num_optimization_profiles} optimization profiles, its sidecar "
                              f"says {contexts} copies of {per_copy}", hint="rebuild with `airlock engine build`")
        self._per_copy = per_copy
        self._pool = ContextPool(self._new_context, contexts)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        self.input_dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in self.input_names}
        self.output_dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in self.output_names}

    @property
    def contexts(self) -> int:
        """Inferences this engine runs at once (its execution contexts, one profile copy each)."""
        return self._pool.slots

    def _new_context(self, slot: int) -> tuple[Any, Any]:
        import torch

        context = self.engine.create_execution_context()
        if context is None:
            raise EngineError("TensorRT could not create an execution context (GPU memory?)",
                              hint="serve with fewer --workers, or free GPU memory")
        stream = torch.cuda.Stream()
        if not context.set_optimization_profile_async(slot * self._per_copy, stream.cuda_stream):
            raise EngineError(f"TensorRT refused optimization profile {slot * self._per_copy} for context {slot}",
                              hint="rebuild with `airlock engine build`")
        stream.synchronize()
        return context, stream

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        with self._pool.checkout() as (context, stream), torch.cuda.stream(stream):
            # copies, allocations and the engine all on this context's stream
            return self._run(context, stream, feeds)

    def _run(self, context: Any, stream: Any, feeds: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        keep: list[Any] = []  # inputs must live until the stream is done with them

        def address(tensor: Any) -> int:
            if tensor.numel() == 0:  # an empty tensor (e.g. no past yet) still needs a valid address
                tensor = torch.empty(1, dtype=tensor.dtype, device="cuda")
            keep.append(tensor)
            return tensor.data_ptr()

        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name])
            if array.dtype != self.input_dtypes[name]:
                raise EngineError(f"engine input {name} is {array.dtype}, the engine wants {self.input_dtypes[name]}",
                                  hint="feed the dtypes of the exported model")
            tensor = torch.from_numpy(array).to("cuda", non_blocking=False)
            if not context.set_input_shape(name, tuple(array.shape)):
                raise EngineError(f"engine input {name} has shape {list(array.shape)}, outside the engine's "
                                  "optimization profile", hint="rebuild the engine with larger profiles")
            context.set_tensor_address(name, address(tensor))
        outputs = {}
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=self.output_dtypes[name])).dtype
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, address(outputs[name]))
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT failed to run the engine", hint="see the job log for TensorRT's messages")
        stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
