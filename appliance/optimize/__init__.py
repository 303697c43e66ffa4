"""Make a fine-tuned model fast and small for serving: INT8 QAT/PTQ -> ONNX -> TensorRT (or ONNX Runtime), and
LMs through onnxruntime-genai (int4/int8 weight-only, external data) with its runtime decoding.

    recipe.py            QuantRecipe: calibration, QAT length and learning rate, what stays in float
    fake_quant.py        fake-quant modules (per-channel weights, per-tensor activations, symmetric INT8), calibration
    quantize.py          LoRA merge, then PTQ and QAT of classifiers and causal LMs, reported against the float model
    export_graphs.py     what the exporter traces (classifier; causal LM with a flat KV cache)
    onnx_export.py       export to ONNX bytes: fp32, fp16, int8 (Q/DQ); refuses MoE models
    qdq_rules.py         TensorRT's Q/DQ rules, checked on the ONNX graph
    validate.py          ONNX checker + Q/DQ rules + parity with PyTorch on ONNX Runtime (CPU) -> report dict
    runners.py           ONNX Runtime sessions from bytes, greedy decoding over the KV cache
    genai_export.py      LMs through onnxruntime-genai's model builder (genai-fp32/int8/int4, -cuda), scratch folder
    genai_validate.py    genai exports vs PyTorch logits, og.Generator on a batch of 8, perplexity on held-out data
    genai_jobs.py        genai variants in the optimize job: build, gate, store in the vault, load to serve
    quality_gate.py      a quantized variant serves only within the tolerance of the float model (ppl, acc/AUC)
    tensorrt_api.py      the TensorRT 10 / 11 differences, chosen at run time
    tensorrt_engine.py   build an engine (profiles, timing cache) and run it
    engine_sidecar.py    what an engine is bound to (GPU SM, TensorRT, CUDA), checked before loading
    runtime_select.py    TensorRT -> ORT CUDA -> ORT CPU -> PyTorch, with the reason
    triton.py            a Triton Inference Server model repository entry

Errors: `appliance.optimize.errors`. Why explicit Q/DQ and the engine binding: docs/adr/0005; the genai
exports and the quality gate: docs/adr/0016. Nothing here writes a model to disk except `triton.py`, whose
job it is, and the genai builder's private scratch folder (removed when the stage ends); everything else
returns bytes for the caller to encrypt into the vault.
"""
