"""A retrain's LoRA on onnxruntime-genai: merged full export vs base graph + `.onnx_adapter` file (docs/adr/0016).

    .venv/bin/python tests/bench/bench_genai_adapters.py                       # tiny model, int4 and fp32
    .venv/bin/python tests/bench/bench_genai_adapters.py --model 1.5b --variants genai-int4 --new-tokens 16

For one base model and one LoRA adapter (the project's own `build_lora_model`, default recipe: rank 16,
alpha 32, every projection; its B drawn normal(0, 0.02) with a fixed seed so that it changes the outputs as a
trained one does), per variant:

(a) a retrain's re-export time: merged route = merge_lora + save_checkpoint + the builder; adapter route =
    the adapter file only (`lora_tensors` + `write_onnx_adapter`; the base with its LoRA branch is built once per
    base model and LoRA structure, its build time printed apart);
(b) bytes written per retrain: the whole export vs the adapter file;
(c) decode tokens/s, og.Generator, greedy, the same prompts, batch 1 and 8: merged vs base + adapter active;
(d) logits (ONNX Runtime on each graph, prefill of the prompts) against the merged float PyTorch model, and
    og's greedy tokens against the merged export's; on the tiny model also held-out perplexity (the quality gate's
    measure) of each route against the float model's.

The 1.5B model is the random-weight model of R1-Distill-Qwen-1.5B's shape (models/build_random_r1_distill.py,
built once into .cache/): speed and parity only, its text is noise. Heavy steps run in child processes so that
one 1.5B model is in memory at a time. Ratios come from this one run; never fails on time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MODELS = {"tiny": REPO / "models" / "tiny-deepseek-r1", "1.5b": REPO / ".cache" / "r1-distill-qwen-1.5b-random"}
PROMPTS = [[0 if i == 0 else 1 + (97 * i + 31 * j) % 900 for j in range(16)] for i in range(8)]
"""Eight 16-token prompts of ids both tokenizers know (BOS of the tiny model, then spread ids)."""
PPL_RECORDS = slice(600, 640)


def _child(step: str, args: argparse.Namespace, **extra: str) -> dict:
    out = args.work / "step.json"
    command = [sys.executable, __file__, "--step", step, "--model", args.model, "--work", str(args.work),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    for key, value in extra.items():
        command += [f"--{key}", value]
    subprocess.run(command, check=True)
    return json.loads(out.read_text(encoding="utf-8"))


def _write(args: argparse.Namespace, result: dict) -> None:
    (args.work / "step.json").write_text(json.dumps(result), encoding="utf-8")


def _lora_model(args: argparse.Namespace):
    """(peft model, tokenizer) on the base, the project's LoRA code and default recipe, B seeded non-zero."""
    import torch

    from appliance.base_models import resolve_base_model
    from appliance.train.lm import build_lora_model
    from appliance.train.recipe import LoraRecipe

    base = resolve_base_model(str(MODELS[args.model]))  # an absolute path: that folder
    peft_model, tokenizer = build_lora_model(base, LoraRecipe(dropout=0.0, seed=0, precision="fp32"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return peft_model.eval(), tokenizer


def step_prepare(args: argparse.Namespace) -> None:
    """The adapter (peft state + config), the merged float model's reference logits (and perplexity), then the
    merged route's merge_lora + save_checkpoint, timed."""
    import numpy as np
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from appliance.optimize.genai_export import save_checkpoint
    from appliance.optimize.quantize import merge_lora

    torch.set_num_threads(args.threads)
    peft_model, tokenizer = _lora_model(args)
    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(state, str(args.work / "adapter_state.safetensors"))
    peft_model.peft_config["default"].save_pretrained(str(args.work / "lora-config"))
    started = time.perf_counter()
    merged = merge_lora(peft_model)
    save_checkpoint(merged, tokenizer, args.work / "merged-checkpoint")
    merge_s = time.perf_counter() - started
    result = {"merge_and_checkpoint_s": merge_s}
    with torch.inference_mode():
        np.save(args.work / "reference-logits.npy",
                merged(input_ids=torch.tensor(PROMPTS[:3]), use_cache=False).logits.float().numpy())
    if args.model == "tiny":
        from appliance.optimize.genai_validate import held_out_examples, torch_perplexity
        from appliance.train.lm import encode_records
        from tests.appliance.optimize.conftest import corpus_texts

        examples = held_out_examples(encode_records(tokenizer, [{"text": t} for t in corpus_texts()[PPL_RECORDS]],
                                                    96, "q"))
        (args.work / "examples.json").write_text(json.dumps(examples), encoding="utf-8")
        result["float_perplexity"] = torch_perplexity(merged, examples)
    del merged, peft_model
    # the base's own checkpoint for the adapter route (the tiny model's folder is already one)
    if args.model != "tiny":
        shutil.copytree(MODELS[args.model], args.work / "base-checkpoint", dirs_exist_ok=True)
    _write(args, result)


def _lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig.from_pretrained(str(args.work / "lora-config"))


def step_build(args: argparse.Namespace) -> None:
    """One builder run: `merged:<variant>` from the merged checkpoint, or `base:<variant>` with the LoRA branch."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from appliance.optimize.genai_adapters import build_genai_base
    from appliance.optimize.genai_export import build_genai_model
    from appliance.optimize.recipe import QuantRecipe

    route, _, variant = args.target.partition(":")
    work = args.work / route
    work.mkdir(exist_ok=True)
    started = time.perf_counter()
    if route == "merged":
        checkpoint = args.work / "merged-checkpoint"
        shim = SimpleNamespace(config=AutoConfig.from_pretrained(checkpoint))  # only its config is read
        export = build_genai_model(shim, None, work, variant=variant, recipe=QuantRecipe(), checkpoint=checkpoint)
    else:
        checkpoint = MODELS["tiny"] if args.model == "tiny" else args.work / "base-checkpoint"
        shim = SimpleNamespace(config=AutoConfig.from_pretrained(checkpoint))
        state = load_file(str(args.work / "adapter_state.safetensors"))
        export = build_genai_base(shim, None, _lora_config(args), state, work, variant=variant, recipe=QuantRecipe(),
                                  checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    shutil.rmtree(work / "builder-cache", ignore_errors=True)
    _write(args, {"build_s": seconds, "bytes": export.bytes, "files": export.files})


def step_adapter(args: argparse.Namespace) -> None:
    """A retrain's whole adapter-route re-export: the adapter file from the adapter state, checked against the base."""
    from safetensors.torch import load_file

    from appliance.optimize.genai_adapters import lora_inputs_of, lora_tensors, write_onnx_adapter

    variant = args.target
    config = _lora_config(args)  # imports peft: outside the timed part, as a retrain job has it loaded
    started = time.perf_counter()
    tensors = lora_tensors(load_file(str(args.work / "adapter_state.safetensors")), config)
    size = write_onnx_adapter(tensors, args.work / f"{variant}.onnx_adapter",
                              expected=lora_inputs_of(args.work / "base" / variant))
    _write(args, {"adapter_s": time.perf_counter() - started, "bytes": size})


def _decode(folder: Path, adapter: Path | None, batch: int, new_tokens: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    adapters = None
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter), "v")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPTS[0]) + new_tokens + 1, do_sample=False, batch_size=batch)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, "v")
    generator.append_tokens(np.asarray(PROMPTS[:batch], dtype=np.int32))
    generator.generate_next_token()  # the first new token comes from the prefill
    started = time.perf_counter()
    steps = 0
    while steps < new_tokens and not generator.is_done():
        generator.generate_next_token()
        steps += 1
    seconds = time.perf_counter() - started
    rows = [[int(t) for t in generator.get_sequence(i)][len(PROMPTS[0]):] for i in range(batch)]
    return {"tokens_per_s": steps * batch / seconds, "rows": rows}


def step_measure(args: argparse.Namespace) -> None:
    """Decode speed (batch 1, 8) and parity of one route of one variant."""
    import numpy as np
    from safetensors.torch import load_file

    from appliance.optimize.genai_adapters import lora_tensors
    from appliance.optimize.genai_export import GenAIExport
    from appliance.optimize.genai_validate import ort_genai_session, session_logits, session_perplexity

    route, _, variant = args.target.partition(":")
    folder = args.work / route / variant
    adapter_file = args.work / f"{variant}.onnx_adapter" if route == "base" else None
    result: dict = {f"batch{b}": _decode(folder, adapter_file, b, args.new_tokens, args.threads) for b in (1, 8)}
    tensors = (lora_tensors(load_file(str(args.work / "adapter_state.safetensors")), _lora_config(args))
               if route == "base" else None)
    session = ort_genai_session(GenAIExport(variant, folder), adapter=tensors)
    ours = session_logits(session, PROMPTS[:3])
    reference = np.load(args.work / "reference-logits.npy")
    diff = float(np.abs(ours.astype(np.float64) - reference).max())
    result["parity"] = {"max_abs_diff": diff, "max_rel_diff": diff / max(1.0, float(np.abs(reference).max())),
                        "top1_agreement": float((ours.argmax(-1) == reference.argmax(-1)).mean())}
    if route == "base":  # the same graph, no adapter fed: the base model, which the adapter must move
        base_only = session_logits(ort_genai_session(GenAIExport(variant, folder)), PROMPTS[:3])
        result["parity"]["adapter_moves_logits_by"] = float(np.abs(base_only - ours).max())
    if (args.work / "examples.json").is_file():
        examples = [tuple(e) for e in json.loads((args.work / "examples.json").read_text(encoding="utf-8"))]
        result["perplexity"] = session_perplexity(session, examples)
    _write(args, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--variants", default="genai-int4,genai-fp32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--step", default=None)
    parser.add_argument("--target", default="")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.step:
        steps = {"prepare": step_prepare, "build": step_build, "adapter": step_adapter, "measure": step_measure}
        steps[args.step](args)
        return
    args.work = args.work or REPO / ".cache" / f"genai-adapters-{args.model}"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    if args.model != "tiny" and not (MODELS[args.model] / "config.json").is_file():
        print(f"building the random 1.5B-shape model into {MODELS[args.model]} (once)", flush=True)
        subprocess.run([sys.executable, str(REPO / "models" / "build_random_r1_distill.py"), str(MODELS[args.model])],
                       check=True)
    variants = args.variants.split(",")
    prepared = _child("prepare", args)
    rows = {}
    for variant in variants:
        merged = _child("build", args, target=f"merged:{variant}")
        base = _child("build", args, target=f"base:{variant}")
        adapter = _child("adapter", args, target=variant)
        rows[variant] = {"merged": merged, "base": base, "adapter": adapter,
                         "merged_m": _child("measure", args, target=f"merged:{variant}"),
                         "base_m": _child("measure", args, target=f"base:{variant}")}
    print(f"\n{args.model}: LoRA rank 16 on every projection, {args.threads} threads, greedy, {args.new_tokens} new "
          f"tokens after {len(PROMPTS[0])}-token prompts; one run")
    for variant, r in rows.items():
        merged_s = prepared["merge_and_checkpoint_s"] + r["merged"]["build_s"]
        print(f"\n{variant}")
        print(f"  (a) retrain re-export: merged {merged_s:.1f} s (merge+checkpoint "
              f"{prepared['merge_and_checkpoint_s']:.1f} s + builder {r['merged']['build_s']:.1f} s) vs adapter file "
              f"{r['adapter']['adapter_s']:.2f} s: {merged_s / r['adapter']['adapter_s']:.0f}x less time "
              f"(the base with its LoRA branch, built once per base model: {r['base']['build_s']:.1f} s)")
        print(f"  (b) bytes per retrain: merged {r['merged']['bytes'] / 2**20:.1f} MiB vs adapter "
              f"{r['adapter']['bytes'] / 2**20:.2f} MiB: {r['merged']['bytes'] / r['adapter']['bytes']:.0f}x "
              f"(base once: {r['base']['bytes'] / 2**20:.1f} MiB)")
        for batch in ("batch1", "batch8"):
            m, b = r["merged_m"][batch], r["base_m"][batch]
            same = sum(x == y for x, y in zip(m["rows"], b["rows"], strict=True))
            print(f"  (c) decode {batch}: merged {m['tokens_per_s']:.1f} tokens/s vs base+adapter "
                  f"{b['tokens_per_s']:.1f}: adapter route {b['tokens_per_s'] / m['tokens_per_s']:.2f}x; greedy rows "
                  f"identical {same}/{len(m['rows'])}")
        for route in ("merged_m", "base_m"):
            p = r[route]["parity"]
            extra = (f", the adapter moves the base's logits by {p['adapter_moves_logits_by']:.3g}"
                     if "adapter_moves_logits_by" in p else "")
            ppl = (f"; held-out perplexity {r[route]['perplexity']:.4f} vs float {prepared['float_perplexity']:.4f} "
                   f"({(r[route]['perplexity'] / prepared['float_perplexity'] - 1) * 100:+.2f}%)"
                   if "perplexity" in r[route] else "")
            print(f"  (d) {route[:-2]:6s} vs merged float PyTorch: max |diff| {p['max_abs_diff']:.3g} (relative "
                  f"{p['max_rel_diff']:.3g}), top-1 {p['top1_agreement']:.3f}{extra}{ppl}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
