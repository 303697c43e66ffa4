"""The 1.5B shape on the CPU: onnxruntime-genai int4 / fp32 exports (external data) vs PyTorch eager bf16 / fp32.

    .venv/bin/python tests/bench/bench_genai.py [--model-dir DIR] [--new-tokens 32] [--threads N]

Builds (once, into `.cache/`) the random-weight model of DeepSeek-R1-Distill-Qwen-1.5B's exact shape
(models/build_random_r1_distill.py), exports it with the onnxruntime-genai builder to int4 (RTN, block 32,
accuracy level 4: the optimize stage's defaults) and fp32, both with external data (the fp32 export is ~7 GB,
past protobuf's 2 GiB), then measures, each step in its own process so that the 24 GB machine holds one model at
a time:

- PyTorch eager bf16 and fp32: greedy decode through the KV cache (batch 1), tokens/s after the prompt;
- og.Generator over the int4 and fp32 exports: the same prompt, the same number of new tokens;
- parity of the fp32 export with PyTorch fp32 logits on a few prompts (max |diff| / max |logit|, top-1 agreement).

Prints int4 decode tokens/s as ratios to PyTorch bf16 and fp32 (goal: >= 3x), measured in one run. Random
weights: speed, memory and parity only (the text is noise). Never fails on time.
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DEFAULT_MODEL_DIR = REPO / ".cache" / "r1-distill-qwen-1.5b-random"
EXPORTS = REPO / ".cache" / "genai-bench"
PROMPTS = [[151646, 100 + i, 200 + 3 * i, 300 + 5 * i, 17, 42, 99, 311, 512, 640, 700, 800, 901, 950, 960, 970]
           for i in range(3)]
"""Token ids only (the random model's text is noise): BOS then ids the tiny tokenizer knows."""


def _child(step: str, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, __file__, "--step", step, "--model-dir", str(args.model_dir), "--new-tokens",
               str(args.new_tokens), "--threads", str(args.threads), "--out", str(out)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    result = json.loads(out.read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - started
    return result


def step_torch(dtype_name: str, args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, local_files_only=True).eval()
    result: dict = {}
    with torch.inference_mode():
        if dtype_name == "fp32":  # the parity reference for the fp32 export
            logits = model(input_ids=torch.tensor(PROMPTS), use_cache=False).logits.float().numpy()
            np.save(EXPORTS / "torch-fp32-logits.npy", logits)
        ids = torch.tensor([PROMPTS[0]])
        out = model(input_ids=ids, use_cache=True)
        token = out.logits[0, -1].argmax()
        started = time.perf_counter()
        for _ in range(args.new_tokens):
            out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[0, -1].argmax()
        seconds = time.perf_counter() - started
    result["decode_tokens_per_s"] = args.new_tokens / seconds
    return result


def step_genai(variant: str, args: argparse.Namespace) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    folder = EXPORTS / variant
    config = og.Config(str(folder))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPTS[0]) + args.new_tokens + 1, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([PROMPTS[0]], dtype=np.int32))
    generator.generate_next_token()  # the first new token comes from the prefill, as on the PyTorch side
    started = time.perf_counter()
    steps = 0
    while steps < args.new_tokens and not generator.is_done():
        generator.generate_next_token()
        steps += 1
    seconds = time.perf_counter() - started
    result = {"decode_tokens_per_s": steps / seconds, "steps": steps,
              "export_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))}
    del generator, model
    if variant == "genai-fp32":
        from appliance.optimize.genai_export import GenAIExport
        from appliance.optimize.genai_validate import ort_genai_session, session_logits

        session = ort_genai_session(GenAIExport(variant, folder))
        ours = session_logits(session, PROMPTS)
        reference = np.load(EXPORTS / "torch-fp32-logits.npy")
        diff = float(np.abs(ours.astype(np.float64) - reference).max())
        result["parity"] = {"max_abs_diff": diff, "max_rel_diff": diff / max(1.0, float(np.abs(reference).max())),
                            "top1_agreement": float((ours.argmax(-1) == reference.argmax(-1)).mean()),
                            "positions": int(reference.shape[0] * reference.shape[1])}
    return result


def build(variant: str, args: argparse.Namespace) -> float:
    """The builder's own command line, as the optimize job runs it (genai_export.build_genai_model)."""
    from appliance.optimize.genai_export import builder_options
    from appliance.optimize.recipe import QuantRecipe

    out = EXPORTS / variant
    if (out / "genai_config.json").is_file():
        return 0.0
    precision, provider, extra = builder_options(variant, QuantRecipe())
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(args.model_dir), "-o",
                    str(out), "-p", precision, "-e", provider, "-c", str(EXPORTS / "builder-cache"),
                    "--extra_options", *extra], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    shutil.rmtree(EXPORTS / "builder-cache", ignore_errors=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--step", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the exports in .cache/genai-bench")
    args = parser.parse_args()
    EXPORTS.mkdir(parents=True, exist_ok=True)
    if args.step:
        kind, _, name = args.step.partition(":")
        result = step_torch(name, args) if kind == "torch" else step_genai(name, args)
        args.out.write_text(json.dumps(result), encoding="utf-8")
        return
    if not (args.model_dir / "config.json").is_file():
        print(f"building the random 1.5B-shape model into {args.model_dir} (once)", flush=True)
        subprocess.run([sys.executable, str(REPO / "models" / "build_random_r1_distill.py"), str(args.model_dir)],
                       check=True)
    builds = {v: build(v, args) for v in ("genai-int4", "genai-fp32")}
    for variant, seconds in builds.items():
        size = sum(f.stat().st_size for f in (EXPORTS / variant).iterdir() if f.name.startswith("model.onnx"))
        print(f"{variant}: built in {seconds:.0f} s (0 = reused), {size / 1024**3:.2f} GiB with external data",
              flush=True)
    out = EXPORTS / "step.json"
    results = {step: _child(step, args, out) for step in ("torch:bf16", "torch:fp32", "genai:genai-int4",
                                                           "genai:genai-fp32")}
    print(f"\n1.5B shape (random weights), batch 1, {args.new_tokens} new tokens after a {len(PROMPTS[0])}-token "
          f"prompt, {args.threads} threads, greedy; decode tokens/s:")
    for step, result in results.items():
        print(f"  {step:18s} {result['decode_tokens_per_s']:8.2f}")
    int4 = results["genai:genai-int4"]["decode_tokens_per_s"]
    for base in ("torch:bf16", "torch:fp32"):
        print(f"int4 (onnxruntime-genai) vs PyTorch eager {base[6:]}: "
              f"{int4 / results[base]['decode_tokens_per_s']:.2f}x (goal >= 3x)")
    print(f"fp32 (onnxruntime-genai) vs PyTorch eager fp32: "
          f"{results['genai:genai-fp32']['decode_tokens_per_s'] / results['torch:fp32']['decode_tokens_per_s']:.2f}x")
    parity = results["genai:genai-fp32"]["parity"]
    print(f"fp32 export parity with PyTorch fp32 over {parity['positions']} positions: max |diff| "
          f"{parity['max_abs_diff']:.2e} (relative {parity['max_rel_diff']:.2e}), top-1 agreement "
          f"{parity['top1_agreement']:.3f}")
    if not args.keep:
        shutil.rmtree(EXPORTS, ignore_errors=True)


if __name__ == "__main__":
    main()
